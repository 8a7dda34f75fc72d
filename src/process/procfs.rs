//! Reading `/proc`: the fields of a process' `stat` line, and the live members of a process
//! group. Finding processes by an environment entry is [`super::Sweeper`]'s.

/// Field `n` after the command name of a `/proc/<pid>/stat` line (0 = state, 1 = ppid,
/// 2 = pgrp). The command name may hold spaces and parentheses, so parsing starts after the
/// last `)`.
pub(crate) fn stat_field(stat: &str, n: usize) -> Option<&str> {
    stat.get(stat.rfind(')')? + 1..)?.split_whitespace().nth(n)
}

/// Whether a process of group `pgid` is alive (not a zombie). Without a readable `/proc`,
/// every process counts as alive.
pub(crate) fn group_has_live_member(pgid: i32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return true;
    };
    let pgid = pgid.to_string();
    dir.flatten().any(|process| {
        let Some(pid) = process
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            return false;
        };
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .is_some_and(|stat| {
                stat_field(&stat, 2) == Some(pgid.as_str())
                    && !matches!(stat_field(&stat, 0), Some("Z" | "X"))
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_tricky_name() {
        let stat = "123 (a) b (c)) S 1 456 456 0 -1";
        assert_eq!(stat_field(stat, 0), Some("S"));
        assert_eq!(stat_field(stat, 1), Some("1"));
        assert_eq!(stat_field(stat, 2), Some("456"));
    }

    #[test]
    fn proc_stat_lines_are_parsed() {
        let stat = "123 (sleep) S 1 120 120 0 -1";
        assert_eq!(stat_field(stat, 0), Some("S"));
        assert_eq!(stat_field(stat, 2), Some("120"));
        let stat = "7 (a (weird) name) Z 1 99 99";
        assert_eq!(stat_field(stat, 0), Some("Z"));
        assert_eq!(stat_field(stat, 2), Some("99"));
        assert_eq!(stat_field("garbage", 0), None);
    }
}
