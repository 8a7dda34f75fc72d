//! Reading `/proc`: the fields of a process' `stat` line, the live members of a process group,
//! and what a group uses (CPU time, resident memory). Finding processes by an environment entry
//! is [`super::Sweeper`]'s.

use std::path::Path;

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

/// What the processes of one group use, read in one pass over `/proc/*/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct GroupUsage {
    /// CPU time of the members and of the children they waited for, in clock ticks.
    pub(crate) cpu_ticks: u64,
    /// Resident memory of the members, in bytes.
    pub(crate) rss_bytes: u64,
    /// How many live members were found.
    pub(crate) members: usize,
}

/// What group `pgid` uses now; `None` without a readable `/proc`.
pub(crate) fn group_usage(pgid: i32) -> Option<GroupUsage> {
    let dir = std::fs::read_dir("/proc").ok()?;
    let page_size = page_size();
    let pgid = pgid.to_string();
    let mut usage = GroupUsage::default();
    for process in dir.flatten() {
        let name = process.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if stat_field(&stat, 2) != Some(pgid.as_str())
            || matches!(stat_field(&stat, 0), Some("Z" | "X"))
        {
            continue;
        }
        add_stat(&mut usage, &stat, page_size);
    }
    Some(usage)
}

/// Adds one member's `stat` line: utime, stime, cutime and cstime (fields 11 to 14 after the
/// name) and rss in pages (field 21).
fn add_stat(usage: &mut GroupUsage, stat: &str, page_size: u64) {
    let number = |n| {
        stat_field(stat, n)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    usage.cpu_ticks += (11..=14).map(number).sum::<u64>();
    usage.rss_bytes += number(21) * page_size;
    usage.members += 1;
}

/// Clock ticks per second of `/proc` times.
pub(crate) fn clock_ticks() -> u64 {
    sysconf(nix::unistd::SysconfVar::CLK_TCK).unwrap_or(100)
}

fn page_size() -> u64 {
    sysconf(nix::unistd::SysconfVar::PAGE_SIZE).unwrap_or(4096)
}

fn sysconf(var: nix::unistd::SysconfVar) -> Option<u64> {
    nix::unistd::sysconf(var)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
        .filter(|v| *v > 0)
}

/// The disk space the files under `root` take, in bytes (as `du`: allocated blocks, each file
/// once, symbolic links not followed); entries that cannot be read are left out.
pub(crate) fn disk_usage(root: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut seen = std::collections::HashSet::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        total += meta.blocks() * 512;
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                pending.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_adds_its_cpu_times_and_resident_pages() {
        // pid (name) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime cutime cstime priority nice threads itrealvalue starttime vsize rss
        let stat =
            "42 (my (odd) job) S 1 42 42 0 -1 4194304 10 0 0 0 7 3 20 5 20 0 1 0 100 5000 25";
        let mut usage = GroupUsage::default();
        add_stat(&mut usage, stat, 4096);
        add_stat(&mut usage, stat, 4096);
        assert_eq!(
            usage,
            GroupUsage {
                cpu_ticks: 70,
                rss_bytes: 2 * 25 * 4096,
                members: 2
            }
        );
    }

    #[test]
    fn this_process_group_is_found_using_memory() {
        let usage = group_usage(nix::unistd::getpgrp().as_raw()).expect("/proc");
        assert!(usage.members >= 1 && usage.rss_bytes > 0, "{usage:?}");
        assert!(clock_ticks() > 0);
    }

    #[test]
    fn disk_usage_counts_the_files_under_a_folder() {
        let dir = tempfile::tempdir().expect("temp dir");
        let empty = disk_usage(dir.path());
        std::fs::write(dir.path().join("data"), vec![7u8; 64 * 1024]).expect("write");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("sub/more"), vec![7u8; 64 * 1024]).expect("write");
        assert!(disk_usage(dir.path()) >= empty + 128 * 1024);
        assert_eq!(disk_usage(&dir.path().join("missing")), 0);
    }

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
