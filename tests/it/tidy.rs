//! Tidy: the crate's own source keeps the invariants ARCHITECTURE.md states, in the spirit of
//! rust-analyzer's tidy test. Each rule is a pure function over one file's path and text,
//! unit-tested below with a small snippet that breaks it; the `tree_*` tests run the rules over
//! every `.rs` file under `src/` and name each violation as `path:line: rule: what`.
//!
//! Test code is exempt from rules 1–5: `#[cfg(test)]` items (their braces tracked), files named
//! `tests.rs`, and modules declared `#[cfg(test)] mod name;`. Comments, doc comments and string
//! literals never count as code.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

/// Rules 1–3, the layering of `src/`: which crates and modules each part may name. A path that
/// ends in `/` is a folder, any other a file. `names` are looked for in the code of the files
/// under `checked_in`, except those under `except_in`; a name ending in `*` is a prefix, and a
/// name with `::` a path (also found inside a `crate::{…}` group).
pub const LAYERS: &[Layer] = &[
    Layer {
        rule: "only provider::aws knows the AWS SDK",
        names: &["aws_sdk*", "aws_config"],
        checked_in: &["src/"],
        except_in: &["src/provider/aws.rs", "src/provider/aws/"],
    },
    Layer {
        rule: "only api knows hyper",
        names: &["hyper", "hyper_util", "hyper_rustls", "http_body_util"],
        checked_in: &["src/"],
        except_in: &["src/api/"],
    },
    Layer {
        // `crate::wire` is `api::wire`, re-exported at the crate root.
        rule: "the engine never imports api",
        names: &["crate::api", "crate::wire"],
        checked_in: &["src/orchestrator/"],
        except_in: &[],
    },
    Layer {
        rule: "the layers below the engine know neither the engine nor api",
        names: &["crate::api", "crate::wire", "crate::orchestrator"],
        checked_in: &[
            "src/provider/",
            "src/state/",
            "src/config/",
            "src/metadata/",
            "src/bundle/",
            "src/process/",
        ],
        except_in: &[],
    },
];

/// Rule 4: the comment that allows one `.expect(` (on its line, or alone on the line above),
/// followed by the reason.
pub const ALLOW_EXPECT: &str = "// tidy: allow(expect)";

/// Rule 5: public items must be documented everywhere under `src/` except in these folders.
pub const UNDOCUMENTED_ALLOWED_IN: &[&str] = &["src/bin/"];

/// Rule 6: the contract every `SPEC §N` reference of `src/` points into.
pub const SPEC_PATH: &str = "docs/SPEC.md";

/// One layering rule of [`LAYERS`].
pub struct Layer {
    /// The invariant, as ARCHITECTURE.md words it.
    pub rule: &'static str,
    /// Crates or module paths the code may not name.
    pub names: &'static [&'static str],
    /// Where the names are looked for.
    pub checked_in: &'static [&'static str],
    /// Where they are allowed all the same.
    pub except_in: &'static [&'static str],
}

/// One broken rule, at one line.
#[derive(Debug)]
struct Violation {
    path: String,
    line: usize,
    rule: &'static str,
    what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.path, self.line, self.rule, self.what
        )
    }
}

const RULE_UNWRAP: &str = "no unwrap() or expect() in non-test code";
const RULE_DOCS: &str = "every public item has a doc comment";
const RULE_SPEC: &str = "every SPEC reference names a section of docs/SPEC.md";

/// Rules 1–3 for the file at `path`: every name of `layer` its code uses.
fn check_layer(layer: &Layer, path: &str, text: &str) -> Vec<Violation> {
    if !under(path, layer.checked_in) || under(path, layer.except_in) || is_test_file(path) {
        return Vec::new();
    }
    let source = Source::new(text);
    let mut found = Vec::new();
    for token in source.identifiers() {
        if source.in_test(token.start) {
            continue;
        }
        for name in layer.names {
            if source.names_at(token, name) {
                found.push(Violation {
                    path: path.to_owned(),
                    line: source.line_of(token.start),
                    rule: layer.rule,
                    what: format!("uses `{}`", name.trim_end_matches('*')),
                });
            }
        }
    }
    found
}

/// Rule 4 for the file at `path`: every `.unwrap()`, and every `.expect(` without
/// [`ALLOW_EXPECT`], outside test code.
fn check_unwrap(path: &str, text: &str) -> Vec<Violation> {
    if is_test_file(path) {
        return Vec::new();
    }
    let source = Source::new(text);
    let lines: Vec<&str> = text.lines().collect();
    let allowed = |line: usize| {
        let here = lines
            .get(line - 1)
            .is_some_and(|l| l.contains(ALLOW_EXPECT));
        let above = line >= 2
            && lines
                .get(line - 2)
                .is_some_and(|l| l.trim_start().starts_with(ALLOW_EXPECT));
        here || above
    };
    let mut found = Vec::new();
    for token in source.identifiers() {
        let method = &source.code[token.start..token.end];
        if !matches!(method, "unwrap" | "expect") || source.in_test(token.start) {
            continue;
        }
        let called_as_method = source.previous_byte(token.start) == Some(b'.')
            && source.next_byte(token.end) == Some(b'(');
        if !called_as_method {
            continue;
        }
        let line = source.line_of(token.start);
        if method == "expect" && allowed(line) {
            continue;
        }
        found.push(Violation {
            path: path.to_owned(),
            line,
            rule: RULE_UNWRAP,
            what: if method == "unwrap" {
                "`.unwrap()`".to_owned()
            } else {
                format!("`.expect(` without `{ALLOW_EXPECT}` and a reason")
            },
        });
    }
    found
}

/// Rule 5 for the file at `path`: every `pub struct`, `pub enum`, `pub trait` and `pub fn` (not
/// `pub(crate)` and the like) outside test code has a `///` comment directly above it, above
/// its attributes.
fn check_docs(path: &str, text: &str) -> Vec<Violation> {
    if under(path, UNDOCUMENTED_ALLOWED_IN) || is_test_file(path) {
        return Vec::new();
    }
    let source = Source::new(text);
    let lines: Vec<&str> = text.lines().collect();
    let tokens = source.identifiers();
    let mut found = Vec::new();
    for (at, token) in tokens.iter().enumerate() {
        if &source.code[token.start..token.end] != "pub"
            || source.next_byte(token.end) == Some(b'(')
            || source.in_test(token.start)
        {
            continue;
        }
        let words: Vec<&str> = tokens[at + 1..]
            .iter()
            .take(5)
            .map(|t| &source.code[t.start..t.end])
            .collect();
        let Some((kind, name)) = item_kind(&words) else {
            continue;
        };
        let line = source.line_of(token.start);
        if !documented_above(&source, &lines, line) {
            found.push(Violation {
                path: path.to_owned(),
                line,
                rule: RULE_DOCS,
                what: format!("`pub {kind} {name}` has no `///` comment"),
            });
        }
    }
    found
}

/// Rule 6 for the file at `path`: every `SPEC §N` (and `§N–§M`, `§N, §M`) names one of
/// `sections`.
fn check_spec_refs(path: &str, text: &str, sections: &BTreeSet<String>) -> Vec<Violation> {
    let mut found = Vec::new();
    for (index, line) in text.lines().enumerate() {
        for number in spec_refs(line) {
            if !sections.contains(&number) {
                found.push(Violation {
                    path: path.to_owned(),
                    line: index + 1,
                    rule: RULE_SPEC,
                    what: format!("{SPEC_PATH} has no section {number}"),
                });
            }
        }
    }
    found
}

/// The section numbers of the Markdown headings of `spec`: `## 4. HTTP API` gives `4`,
/// `### 4.1 Client endpoints` gives `4.1`.
fn spec_sections(spec: &str) -> BTreeSet<String> {
    spec.lines()
        .filter_map(|line| {
            let title = line.strip_prefix('#')?.trim_start_matches('#');
            let title = title.strip_prefix(' ')?.trim_start();
            let number: String = title
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let number = number.trim_end_matches('.');
            (!number.is_empty()).then(|| number.to_owned())
        })
        .collect()
}

/// The section numbers one line refers to with `SPEC §N`, followed by any `–§M`, `-§M`,
/// `, §M` or ` and §M`.
fn spec_refs(line: &str) -> Vec<String> {
    let mut numbers = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("SPEC §") {
        rest = &rest[at + "SPEC §".len()..];
        loop {
            let number: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let number = number.trim_end_matches('.');
            if number.is_empty() {
                break;
            }
            numbers.push(number.to_owned());
            rest = &rest[number.len()..];
            let next = ["–§", "-§", ", §", " and §"]
                .iter()
                .find_map(|joint| rest.strip_prefix(joint));
            match next {
                Some(after) => rest = after,
                None => break,
            }
        }
    }
    numbers
}

/// The files that `text` (the file at `path`) declares as test-only modules
/// (`#[cfg(test)] mod name;`), as the file and the folder they may live in.
fn test_modules(path: &str, text: &str) -> Vec<String> {
    let source = Source::new(text);
    let folder = match path.rsplit_once('/') {
        Some((dir, "mod.rs" | "lib.rs" | "main.rs")) => format!("{dir}/"),
        _ => format!("{}/", path.trim_end_matches(".rs")),
    };
    source
        .test_mods
        .into_iter()
        .flat_map(|name| [format!("{folder}{name}.rs"), format!("{folder}{name}/")])
        .collect()
}

/// A file's text with comments and literals blanked out, and where its test code is.
struct Source {
    /// The text with every comment, string and character literal replaced by spaces (newlines
    /// kept), byte for byte, so offsets and lines are the original's.
    code: String,
    /// Where each line starts.
    line_starts: Vec<usize>,
    /// Byte ranges of `#[cfg(test)]` items.
    tests: Vec<(usize, usize)>,
    /// Byte ranges of attributes (`#[…]`).
    attributes: Vec<(usize, usize)>,
    /// `name` of each `#[cfg(test)] mod name;`.
    test_mods: Vec<String>,
}

/// An identifier (or keyword) of the code, by byte range.
#[derive(Debug, Clone, Copy)]
struct Token {
    start: usize,
    end: usize,
}

impl Source {
    fn new(text: &str) -> Source {
        let code = blank_comments_and_literals(text);
        let mut line_starts = vec![0];
        line_starts.extend(code.match_indices('\n').map(|(at, _)| at + 1));
        let mut source = Source {
            code,
            line_starts,
            tests: Vec::new(),
            attributes: Vec::new(),
            test_mods: Vec::new(),
        };
        source.find_attributes_and_tests();
        source
    }

    /// The 1-based line of byte `at`.
    fn line_of(&self, at: usize) -> usize {
        self.line_starts.partition_point(|&start| start <= at)
    }

    /// Whether byte `at` is inside a `#[cfg(test)]` item.
    fn in_test(&self, at: usize) -> bool {
        self.tests
            .iter()
            .any(|&(start, end)| (start..end).contains(&at))
    }

    /// Every identifier and keyword of the code, in order.
    fn identifiers(&self) -> Vec<Token> {
        let bytes = self.code.as_bytes();
        let mut tokens = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            if is_ident_start(bytes[at]) && (at == 0 || !is_ident_byte(bytes[at - 1])) {
                let start = at;
                while at < bytes.len() && is_ident_byte(bytes[at]) {
                    at += 1;
                }
                tokens.push(Token { start, end: at });
            } else {
                at += 1;
            }
        }
        tokens
    }

    /// The last byte before `at` that is not whitespace.
    fn previous_byte(&self, at: usize) -> Option<u8> {
        self.code.as_bytes()[..at]
            .iter()
            .rev()
            .copied()
            .find(|b| !b.is_ascii_whitespace())
    }

    /// The first byte from `at` on that is not whitespace.
    fn next_byte(&self, at: usize) -> Option<u8> {
        self.code.as_bytes()[at..]
            .iter()
            .copied()
            .find(|b| !b.is_ascii_whitespace())
    }

    /// The byte offset of the first byte from `at` on that is not whitespace.
    fn skip_blanks(&self, mut at: usize) -> usize {
        let bytes = self.code.as_bytes();
        while at < bytes.len() && bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        at
    }

    /// Whether `name` (see [`LAYERS`]) is named by the code starting at `token`.
    fn names_at(&self, token: Token, name: &str) -> bool {
        let word = &self.code[token.start..token.end];
        let mut segments = name.split("::");
        let first = segments.next().unwrap_or_default();
        let matches_first = match first.strip_suffix('*') {
            Some(prefix) => word.starts_with(prefix),
            None => word == first,
        };
        if !matches_first {
            return false;
        }
        // A lone crate name counts only as the start of a path or a `use`/`extern crate` item,
        // never as a field or method of the same name.
        let rest: Vec<&str> = segments.collect();
        if rest.is_empty() {
            return self.previous_byte(token.start) != Some(b'.')
                && !self.code[..token.start].trim_end().ends_with("::");
        }
        let mut at = token.end;
        for (index, segment) in rest.iter().enumerate() {
            at = self.skip_blanks(at);
            if !self.code[at..].starts_with("::") {
                return false;
            }
            at = self.skip_blanks(at + 2);
            if self.code[at..].starts_with('{') {
                // A group: `crate::{api, config}` names `crate::api`.
                let Some(end) = self.matching(at) else {
                    return false;
                };
                let wanted = rest[index..].join("::");
                return self
                    .group_members(at + 1, end)
                    .iter()
                    .any(|member| member == &wanted || member.starts_with(&format!("{wanted}::")));
            }
            let end = self.code[at..]
                .bytes()
                .take_while(|b| is_ident_byte(*b))
                .count();
            if &self.code[at..at + end] != *segment {
                return false;
            }
            at += end;
        }
        true
    }

    /// The top-level members of the `{…}` group whose content is `start..end`, as paths
    /// without blanks (`api::wire`, `config`).
    fn group_members(&self, start: usize, end: usize) -> Vec<String> {
        let mut members = Vec::new();
        let mut depth = 0usize;
        let mut current = String::new();
        for byte in self.code[start..end].bytes() {
            match byte {
                b'{' => depth += 1,
                b'}' => depth = depth.saturating_sub(1),
                b',' if depth == 0 => members.push(std::mem::take(&mut current)),
                _ if depth == 0 && !byte.is_ascii_whitespace() => current.push(char::from(byte)),
                _ => {}
            }
        }
        members.push(current);
        members
    }

    /// The offset of the bracket closing the one at `open` (`{`, `[` or `(`).
    fn matching(&self, open: usize) -> Option<usize> {
        let bytes = self.code.as_bytes();
        let mut depth = 0usize;
        for (at, byte) in bytes.iter().enumerate().skip(open) {
            match byte {
                b'{' | b'[' | b'(' => depth += 1,
                b'}' | b']' | b')' => {
                    depth = depth.checked_sub(1)?;
                    if depth == 0 {
                        return Some(at);
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// Records every attribute, and the extent of each item carrying `#[cfg(test)]`: up to
    /// its matching `}`, or its `;` for an item without a body.
    fn find_attributes_and_tests(&mut self) {
        let bytes = self.code.as_bytes();
        let mut at = 0;
        while let Some(found) = self.code[at..].find('#') {
            let hash = at + found;
            at = hash + 1;
            let open = self.skip_blanks(hash + 1);
            let open = if bytes.get(open) == Some(&b'!') {
                self.skip_blanks(open + 1)
            } else {
                open
            };
            if bytes.get(open) != Some(&b'[') {
                continue;
            }
            let Some(close) = self.matching(open) else {
                continue;
            };
            self.attributes.push((hash, close + 1));
            let content: String = self.code[open + 1..close]
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            if content == "cfg(test)" {
                if let Some(end) = self.item_end(close + 1) {
                    self.tests.push((hash, end));
                    if let Some(name) = self.module_declaration(close + 1, end) {
                        self.test_mods.push(name);
                    }
                }
            }
            at = close + 1;
        }
    }

    /// The end (exclusive) of the item starting at `from`: its body's closing `}`, or its `;`
    /// when that comes first outside brackets.
    fn item_end(&self, from: usize) -> Option<usize> {
        let bytes = self.code.as_bytes();
        let mut depth = 0usize;
        for (at, byte) in bytes.iter().enumerate().skip(from) {
            match byte {
                b'(' | b'[' => depth += 1,
                b')' | b']' => depth = depth.saturating_sub(1),
                b';' if depth == 0 => return Some(at + 1),
                b'{' if depth == 0 => return self.matching(at).map(|close| close + 1),
                _ => {}
            }
        }
        None
    }

    /// `name` when `from..end` is `[attributes] [pub(…)] mod name;`.
    fn module_declaration(&self, from: usize, end: usize) -> Option<String> {
        let item = self.code[from..end].trim();
        if !item.ends_with(';') {
            return None;
        }
        let words: Vec<&str> = item
            .trim_end_matches(';')
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .filter(|w| !w.is_empty())
            .collect();
        let at = words.iter().position(|w| *w == "mod")?;
        words.get(at + 1).map(|name| (*name).to_owned())
    }

    /// Whether every non-blank byte of line `line` (1-based) belongs to an attribute.
    fn line_is_attribute(&self, line: usize) -> bool {
        let start = self.line_starts[line - 1];
        let end = self
            .line_starts
            .get(line)
            .copied()
            .unwrap_or(self.code.len());
        let mut any = false;
        for (offset, byte) in self.code[start..end].bytes().enumerate() {
            if byte.is_ascii_whitespace() {
                continue;
            }
            any = true;
            let at = start + offset;
            if !self.attributes.iter().any(|&(s, e)| (s..e).contains(&at)) {
                return false;
            }
        }
        any
    }
}

/// The kind and name of the item after `pub`, from the words that follow it: `fn`, `struct`,
/// `enum` or `trait`, after any `const`, `async`, `unsafe` or `extern`; `None` for any other
/// item (a `const`, a `mod`, a field, a `use`).
fn item_kind<'a>(words: &[&'a str]) -> Option<(&'a str, &'a str)> {
    let mut words = words.iter().copied();
    let mut word = words.next()?;
    while matches!(word, "const" | "async" | "unsafe" | "extern") {
        word = words.next()?;
    }
    match word {
        "fn" | "struct" | "enum" | "trait" => Some((word, words.next()?)),
        _ => None,
    }
}

/// Whether the item on line `line` (1-based) has a `///` comment (or `#[doc…]`) directly
/// above it, looking past its attributes.
fn documented_above(source: &Source, lines: &[&str], line: usize) -> bool {
    let mut above = line - 1;
    while above >= 1 {
        let text = lines.get(above - 1).map_or("", |l| l.trim_start());
        if text.starts_with("///") || text.starts_with("#[doc") {
            return true;
        }
        if !source.line_is_attribute(above) {
            return false;
        }
        above -= 1;
    }
    false
}

/// `text` with every comment, string literal and character literal replaced by spaces, byte for
/// byte; newlines are kept, so offsets and line numbers do not move. Lifetimes stay code.
fn blank_comments_and_literals(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = bytes.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for byte in &mut out[from..to.min(bytes.len())] {
            if *byte != b'\n' {
                *byte = b' ';
            }
        }
    };
    let mut at = 0;
    while at < bytes.len() {
        let starts_token = at == 0 || !is_ident_byte(bytes[at - 1]);
        match bytes[at] {
            b'/' if bytes.get(at + 1) == Some(&b'/') => {
                let end = text[at..].find('\n').map_or(bytes.len(), |n| at + n);
                blank(&mut out, at, end);
                at = end;
            }
            b'/' if bytes.get(at + 1) == Some(&b'*') => {
                let mut depth = 0usize;
                let mut end = at;
                while end < bytes.len() {
                    if bytes[end..].starts_with(b"/*") {
                        depth += 1;
                        end += 2;
                    } else if bytes[end..].starts_with(b"*/") {
                        depth -= 1;
                        end += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        end += 1;
                    }
                }
                blank(&mut out, at, end);
                at = end;
            }
            b'r' | b'b' if starts_token => {
                let Some((prefix, hashes)) = raw_string_hashes(&bytes[at..]) else {
                    at += 1;
                    continue;
                };
                let body = at + prefix;
                let closing: Vec<u8> = std::iter::once(b'"')
                    .chain(std::iter::repeat_n(b'#', hashes))
                    .collect();
                let end = bytes[body..]
                    .windows(closing.len())
                    .position(|w| w == closing.as_slice())
                    .map_or(bytes.len(), |n| body + n + closing.len());
                blank(&mut out, at, end);
                at = end;
            }
            b'"' => {
                let mut end = at + 1;
                while end < bytes.len() && bytes[end] != b'"' {
                    end += if bytes[end] == b'\\' { 2 } else { 1 };
                }
                blank(&mut out, at, end + 1);
                at = end + 1;
            }
            b'\'' => match char_literal_end(text, at) {
                Some(end) => {
                    blank(&mut out, at, end);
                    at = end;
                }
                None => at += 1,
            },
            _ => at += 1,
        }
    }
    String::from_utf8(out).unwrap_or_default()
}

/// For a raw string starting here (`r"`, `r#"`, `br##"`…): the length of its opening
/// (prefix, hashes and quote) and the number of hashes.
fn raw_string_hashes(bytes: &[u8]) -> Option<(usize, usize)> {
    let after_b = usize::from(bytes.first() == Some(&b'b'));
    if bytes.get(after_b) != Some(&b'r') {
        return None;
    }
    let hashes = bytes[after_b + 1..]
        .iter()
        .take_while(|b| **b == b'#')
        .count();
    let quote = after_b + 1 + hashes;
    (bytes.get(quote) == Some(&b'"')).then_some((quote + 1, hashes))
}

/// The end (exclusive) of the character literal opening at `at`, or `None` for a lifetime or
/// label (`'a`, `'static`).
fn char_literal_end(text: &str, at: usize) -> Option<usize> {
    let rest = &text[at + 1..];
    if let Some(escaped) = rest.strip_prefix('\\') {
        // `'\n'`, `'\''`, `'\u{1F600}'`: up to the next quote after the escaped character.
        let skip = escaped.chars().next()?.len_utf8();
        let close = escaped[skip..].find('\'')?;
        return Some(at + 2 + skip + close + 1);
    }
    let first = rest.chars().next()?;
    let after = &rest[first.len_utf8()..];
    after
        .starts_with('\'')
        .then(|| at + 1 + first.len_utf8() + 1)
}

fn is_ident_start(byte: u8) -> bool {
    byte.is_ascii_alphabetic() || byte == b'_'
}

fn is_ident_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_'
}

/// Whether `path` is one of `places` or under one of them (those ending in `/`).
fn under(path: &str, places: &[&str]) -> bool {
    places.iter().any(|place| {
        if place.ends_with('/') {
            path.starts_with(place)
        } else {
            path == *place
        }
    })
}

/// Files that hold only tests, by name.
fn is_test_file(path: &str) -> bool {
    path == "tests.rs" || path.ends_with("/tests.rs")
}

/// Every `.rs` file under `src/`, as (path relative to the crate with `/`, text), sorted, with
/// the test-only modules removed.
fn source_files() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    let mut folders = vec![root.join("src")];
    while let Some(folder) = folders.pop() {
        let entries = std::fs::read_dir(&folder)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", folder.display()));
        for entry in entries {
            let path: PathBuf = entry
                .unwrap_or_else(|e| panic!("cannot list {}: {e}", folder.display()))
                .path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                let text = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
                let relative = path
                    .strip_prefix(root)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .replace('\\', "/");
                files.push((relative, text));
            }
        }
    }
    files.sort();
    assert!(
        files.iter().any(|(path, _)| path == "src/lib.rs"),
        "tidy found no src/lib.rs under {}",
        root.display()
    );
    files
}

/// The files of [`source_files`] that are not test-only modules.
fn non_test_files() -> Vec<(String, String)> {
    let files = source_files();
    let test_only: Vec<String> = files
        .iter()
        .flat_map(|(path, text)| test_modules(path, text))
        .collect();
    let test_only: Vec<&str> = test_only.iter().map(String::as_str).collect();
    files
        .into_iter()
        .filter(|(path, _)| !under(path, &test_only))
        .collect()
}

/// Fails with every violation, one a line.
fn assert_none(rule: &str, violations: Vec<Violation>) {
    if violations.is_empty() {
        return;
    }
    let list: Vec<String> = violations.iter().map(ToString::to_string).collect();
    panic!(
        "tidy: {} violation(s) of \"{rule}\":\n{}",
        violations.len(),
        list.join("\n")
    );
}

fn tree_layer(rule: &str) {
    let layer = LAYERS
        .iter()
        .find(|layer| layer.rule == rule)
        .unwrap_or_else(|| panic!("no layer rule {rule:?}"));
    let violations = non_test_files()
        .iter()
        .flat_map(|(path, text)| check_layer(layer, path, text))
        .collect();
    assert_none(layer.rule, violations);
}

#[test]
fn tree_aws_sdk_only_in_provider_aws() {
    tree_layer(LAYERS[0].rule);
}

#[test]
fn tree_hyper_only_in_api() {
    tree_layer(LAYERS[1].rule);
}

#[test]
fn tree_orchestrator_never_imports_api() {
    tree_layer(LAYERS[2].rule);
}

#[test]
fn tree_no_unwrap_or_expect_outside_tests() {
    let violations = non_test_files()
        .iter()
        .flat_map(|(path, text)| check_unwrap(path, text))
        .collect();
    assert_none(RULE_UNWRAP, violations);
}

#[test]
fn tree_public_items_are_documented() {
    let violations = non_test_files()
        .iter()
        .flat_map(|(path, text)| check_docs(path, text))
        .collect();
    assert_none(RULE_DOCS, violations);
}

/// The rules are only as good as the reading of the source: with comments and literals blanked
/// out, every file's brackets must balance (a brace in a string or a `'{'` would not).
#[test]
fn tree_sources_are_read_with_balanced_brackets() {
    let mut unbalanced = Vec::new();
    for (path, text) in source_files() {
        let code = blank_comments_and_literals(&text);
        let mut open = Vec::new();
        for (at, byte) in code.bytes().enumerate() {
            let expected = match byte {
                b'(' | b'[' | b'{' => {
                    open.push((byte, at));
                    continue;
                }
                b')' => b'(',
                b']' => b'[',
                b'}' => b'{',
                _ => continue,
            };
            if open.pop().map(|(b, _)| b) != Some(expected) {
                unbalanced.push(format!(
                    "{path}: unbalanced `{}` at byte {at}",
                    char::from(byte)
                ));
                break;
            }
        }
        if let Some((byte, at)) = open.pop() {
            unbalanced.push(format!(
                "{path}: `{}` at byte {at} is never closed",
                char::from(byte)
            ));
        }
    }
    assert!(
        unbalanced.is_empty(),
        "tidy misreads:\n{}",
        unbalanced.join("\n")
    );
}

#[test]
fn tree_spec_references_name_sections_of_docs_spec() {
    let spec_file = Path::new(env!("CARGO_MANIFEST_DIR")).join(SPEC_PATH);
    let spec = std::fs::read_to_string(&spec_file).unwrap_or_else(|e| {
        panic!(
            "tidy: \"{RULE_SPEC}\": {} cannot be read ({e}); the contract lives in the repo",
            spec_file.display()
        )
    });
    let sections = spec_sections(&spec);
    let violations = source_files()
        .iter()
        .flat_map(|(path, text)| check_spec_refs(path, text, &sections))
        .collect();
    assert_none(RULE_SPEC, violations);
}

/// Where each violation is, as `path:line`.
fn places(violations: &[Violation]) -> Vec<String> {
    violations
        .iter()
        .map(|v| format!("{}:{}", v.path, v.line))
        .collect()
}

#[test]
fn aws_sdk_is_reported_outside_provider_aws_only() {
    let snippet =
        "use std::sync::Arc;\nuse aws_sdk_ec2::Client;\nfn f() { let _ = aws_config::defaults; }\n";
    let aws = &LAYERS[0];
    let found = check_layer(aws, "src/orchestrator/mod.rs", snippet);
    assert_eq!(
        places(&found),
        ["src/orchestrator/mod.rs:2", "src/orchestrator/mod.rs:3"]
    );
    assert_eq!(
        found[0].to_string(),
        "src/orchestrator/mod.rs:2: only provider::aws knows the AWS SDK: uses `aws_sdk`"
    );
    assert!(check_layer(aws, "src/provider/aws.rs", snippet).is_empty());
    assert!(check_layer(aws, "src/provider/aws/client.rs", snippet).is_empty());
    // The daemon may name the provider, not the SDK.
    let daemon = "let p = taskfly::AwsProvider::new(); // not aws_sdk_ec2 itself\n";
    assert!(check_layer(aws, "src/bin/taskflyd.rs", daemon).is_empty());
    assert_eq!(
        places(&check_layer(aws, "src/bin/taskflyd.rs", snippet)),
        ["src/bin/taskflyd.rs:2", "src/bin/taskflyd.rs:3"]
    );
}

#[test]
fn hyper_is_reported_outside_api_but_not_in_comments_strings_or_tests() {
    let hyper = &LAYERS[1];
    let snippet = "//! Nothing here knows hyper.\n\
                   /// Not even hyper::Request.\n\
                   const NOTE: &str = \"hyper::Body\";\n\
                   use http_body_util::Full;\n\
                   fn f(r: hyper::Request<()>) { r.hyper(); }\n\
                   #[cfg(test)]\n\
                   mod tests {\n    use hyper_util::rt::TokioIo;\n}\n";
    let found = check_layer(hyper, "src/agent/mod.rs", snippet);
    assert_eq!(places(&found), ["src/agent/mod.rs:4", "src/agent/mod.rs:5"]);
    assert!(check_layer(hyper, "src/api/server/mod.rs", snippet).is_empty());
}

#[test]
fn api_is_reported_in_the_orchestrator_also_inside_groups_and_through_wire() {
    let engine = &LAYERS[2];
    let snippet = "use crate::config::Config;\n\
                   use crate::{api::tls, state};\n\
                   fn serve() { crate::api::server::serve(); }\n\
                   use crate::wire::DeploymentView;\n\
                   use crate::apis::Other;\n";
    let found = check_layer(engine, "src/orchestrator/nodes.rs", snippet);
    assert_eq!(
        places(&found),
        [
            "src/orchestrator/nodes.rs:2",
            "src/orchestrator/nodes.rs:3",
            "src/orchestrator/nodes.rs:4"
        ]
    );
    assert!(check_layer(engine, "src/api/server.rs", snippet).is_empty());
}

#[test]
fn unwrap_and_unexplained_expect_are_reported_outside_test_code() {
    let snippet = "/// ```\n/// let x = f().unwrap();\n/// ```\n\
                   fn f() -> Option<u8> {\n\
                   \x20   let a = Some(1).unwrap();\n\
                   \x20   let b = Some(2).unwrap_or(0);\n\
                   \x20   let c = Some(3)\n        .unwrap();\n\
                   \x20   let d = Some(4).expect(\"always set\");\n\
                   \x20   let e = Some(5).expect(\"set above\"); // tidy: allow(expect) set above\n\
                   \x20   // tidy: allow(expect) the lock is never poisoned: nothing panics in it\n\
                   \x20   let g = Some(6).expect(\"x\");\n\
                   \x20   let s = \".unwrap()\";\n\
                   \x20   Some(a + b + c + d + e + g)\n}\n\
                   #[cfg(test)]\n\
                   mod tests {\n    fn t() { let s = \"}\"; Some(1).unwrap(); }\n}\n\
                   fn after() { None::<u8>.unwrap(); }\n";
    let found = check_unwrap("src/config.rs", snippet);
    assert_eq!(
        places(&found),
        [
            "src/config.rs:5",
            "src/config.rs:8",
            "src/config.rs:9",
            "src/config.rs:20"
        ]
    );
    assert!(
        found[2].what.contains("tidy: allow(expect)"),
        "{}",
        found[2]
    );
    assert!(check_unwrap("src/config/tests.rs", snippet).is_empty());
}

#[test]
fn public_items_without_a_doc_comment_are_reported() {
    let snippet = "/// Documented.\npub struct A;\n\
                   pub struct B;\n\
                   /// Documented, above its attributes.\n\
                   #[derive(Debug,\n    Clone)]\n#[must_use]\npub enum C {}\n\
                   #[derive(Debug)]\npub enum D {}\n\
                   pub(crate) fn crate_only() {}\n\
                   impl A {\n    pub async fn e(&self) {}\n\
                   \x20   /// Documented.\n    pub const fn f() {}\n}\n\
                   pub trait G {}\n\
                   pub const H: u8 = 1;\n\
                   pub mod i;\n\
                   // A comment is not a doc comment.\npub unsafe fn j() {}\n\
                   #[cfg(test)]\nmod tests {\n    pub fn helper() {}\n}\n";
    let found = check_docs("src/state/model.rs", snippet);
    let what: Vec<&str> = found.iter().map(|v| v.what.as_str()).collect();
    assert_eq!(
        what,
        [
            "`pub struct B` has no `///` comment",
            "`pub enum D` has no `///` comment",
            "`pub fn e` has no `///` comment",
            "`pub trait G` has no `///` comment",
            "`pub fn j` has no `///` comment",
        ]
    );
    assert_eq!(places(&found)[0], "src/state/model.rs:3");
    assert!(check_docs("src/bin/taskflyd.rs", snippet).is_empty());
}

#[test]
fn spec_references_to_missing_sections_are_reported() {
    let spec = "# TaskFly\n## 1. `taskfly.yml`\n## 4. HTTP API\n### 4.1 Client endpoints\n";
    let sections = spec_sections(spec);
    assert_eq!(
        sections.iter().map(String::as_str).collect::<Vec<_>>(),
        ["1", "4", "4.1"]
    );
    let snippet = "//! The API (SPEC §4).\n\
                   /// See SPEC §4.1 and SPEC §7.\n\
                   // SPEC §1–§3, then SPEC §4.2.\n";
    let found = check_spec_refs("src/api/mod.rs", snippet, &sections);
    let what: Vec<&str> = found.iter().map(|v| v.what.as_str()).collect();
    assert_eq!(
        what,
        [
            "docs/SPEC.md has no section 7",
            "docs/SPEC.md has no section 3",
            "docs/SPEC.md has no section 4.2",
        ]
    );
    assert_eq!(
        places(&found),
        ["src/api/mod.rs:2", "src/api/mod.rs:3", "src/api/mod.rs:3"]
    );
    assert_eq!(
        found[0].to_string(),
        "src/api/mod.rs:2: every SPEC reference names a section of docs/SPEC.md: \
         docs/SPEC.md has no section 7"
    );
}

#[test]
fn test_only_modules_are_found_beside_their_parent() {
    let text = "#[cfg(test)]\npub(crate) mod conformance;\npub(crate) mod memory;\n\
                #[cfg(test)]\nmod tests;\n";
    assert_eq!(
        test_modules("src/state/mod.rs", text),
        [
            "src/state/conformance.rs",
            "src/state/conformance/",
            "src/state/tests.rs",
            "src/state/tests/"
        ]
    );
    assert_eq!(
        test_modules("src/config.rs", "#[cfg(test)]\nmod tests;\n"),
        ["src/config/tests.rs", "src/config/tests/"]
    );
}

#[test]
fn comments_and_literals_are_blanked_without_moving_anything() {
    let text = "let a = \"x // y\"; // note\nlet b = r#\"raw \"quoted\" {\"#;\n\
                let c = '{'; let d: &'static str = \"\\\"}\";\n\
                /* one /* nested */ two */ let e = b'\\'';\n";
    let code = blank_comments_and_literals(text);
    assert_eq!(code.len(), text.len());
    assert_eq!(code.lines().count(), text.lines().count());
    assert!(!code.contains('{') && !code.contains('"'), "{code}");
    assert!(code.contains("&'static str"), "lifetimes stay code: {code}");
    assert!(code.contains("let e ="), "{code}");
}
