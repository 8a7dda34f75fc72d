//! Unit tests of the server's pure parts.

use super::node::{text_log_lines, unix_seconds};

#[test]
fn text_log_lines_are_numbered_by_byte_position_and_stream() {
    let out = text_log_lines(b"ab\r\ncd\nlast", "stdout", Some(10));
    let lines: Vec<(&str, Option<u64>)> = out
        .lines
        .iter()
        .map(|l| (l.line.as_str(), l.line_no))
        .collect();
    // Lines start at bytes 10, 14 and 17; doubled, stdout even.
    assert_eq!(
        lines,
        [("ab", Some(20)), ("cd", Some(28)), ("last", Some(34))]
    );
    let err = text_log_lines(b"x\n", "stderr", Some(10));
    assert_eq!(err.lines[0].line_no, Some(21), "stderr numbers are odd");
    let unnumbered = text_log_lines(b"x\n", "stdout", None);
    assert_eq!(unnumbered.lines[0].line_no, None);
}

#[test]
fn a_text_bodys_read_time_is_unix_seconds() {
    assert_eq!(
        unix_seconds("1767323045").unwrap(),
        "2026-01-02T03:04:05.000Z"
    );
    for bad in [
        "",
        "-1",
        "1.5",
        "now",
        "253402300800",
        "99999999999999999999",
    ] {
        let err = unix_seconds(bad).unwrap_err();
        assert!(err.is_invalid_input(), "{bad}: {err}");
        assert!(err.to_string().contains(&format!("got `{bad}`")), "{err}");
    }
    assert_eq!(
        unix_seconds("253402300799").unwrap(),
        "9999-12-31T23:59:59.000Z"
    );
}
