//! `instance_config.slurm`: how to run nodes as the tasks of a Slurm job array.
//!
//! Every value ends up as one argument of `sbatch` (never through a shell), in the form
//! `--name=value`, so no value can be read as another option; the checks here catch mistakes
//! early, with the field's path, rather than leave them to sbatch's messages.

use std::path::PathBuf;
use std::time::Duration;

use serde_yaml::Value;

use super::diagnostics::{describe, item, Fields, Problems};
use super::values::{duration, integer, string, string_list};
use crate::error::Result;
use crate::provider::ProviderSettings;

/// The fields of `instance_config.slurm`, in the order the documentation lists them.
const SLURM_FIELDS: &[&str] = &[
    "partition",
    "account",
    "qos",
    "time_limit",
    "cpus_per_node",
    "mem",
    "gres",
    "constraint",
    "extra_args",
    "max_parallel",
    "queue_timeout",
    "bin_dir",
];

/// The largest array index Slurm accepts by default is `MaxArraySize - 1`; clusters may raise
/// it, so `max_parallel` is only bounded by what a `u32` array index can be.
const MAX_PARALLEL: u32 = 4_000_000;

/// `sbatch` options `extra_args` may not hold, each with why: they would change what a task
/// runs, where its output goes, or what TaskFly relies on to find and stop its jobs; or a field
/// of `instance_config.slurm` says it already.
const REFUSED_OPTIONS: &[(&str, &str)] = &[
    ("wrap", "it would replace the node's bootstrap"),
    ("export", "the node's environment comes from TaskFly"),
    ("export-file", "the node's environment comes from TaskFly"),
    ("get-user-env", "the node's environment comes from TaskFly"),
    ("uid", "the tasks run as the daemon's user"),
    ("gid", "the tasks run as the daemon's user"),
    ("container", "it would change what runs"),
    ("input", "the bootstrap reads no input"),
    (
        "output",
        "TaskFly keeps each task's output in its work directory",
    ),
    (
        "error",
        "TaskFly keeps each task's output in its work directory",
    ),
    (
        "open-mode",
        "TaskFly keeps each task's output in its work directory",
    ),
    ("chdir", "the tasks start in TaskFly's work directory"),
    ("array", "TaskFly makes the array: one task per node"),
    ("job-name", "TaskFly names its jobs"),
    (
        "comment",
        "TaskFly tags its jobs with --comment to find them again",
    ),
    ("parsable", "TaskFly reads sbatch's answer itself"),
    ("wait", "sbatch must return once the job is queued"),
    ("test-only", "it would queue nothing"),
    ("partition", "use instance_config.slurm.partition"),
    ("account", "use instance_config.slurm.account"),
    ("qos", "use instance_config.slurm.qos"),
    ("time", "use instance_config.slurm.time_limit"),
    ("cpus-per-task", "use instance_config.slurm.cpus_per_node"),
    ("mem", "use instance_config.slurm.mem"),
    ("gres", "use instance_config.slurm.gres"),
    ("constraint", "use instance_config.slurm.constraint"),
];

/// `instance_config.slurm`, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SlurmConfig {
    /// `--partition`.
    pub(crate) partition: Option<String>,
    /// `--account`.
    pub(crate) account: Option<String>,
    /// `--qos`.
    pub(crate) qos: Option<String>,
    /// `--time`, in Slurm's own format (`30`, `1:30:00`, `2-00:00:00`, `UNLIMITED`).
    pub(crate) time_limit: Option<String>,
    /// `--cpus-per-task`: every node is one task of its own.
    pub(crate) cpus_per_node: Option<u32>,
    /// `--mem`, in Slurm's format (`4G`, `512M`, `2048`).
    pub(crate) mem: Option<String>,
    /// `--gres`.
    pub(crate) gres: Option<String>,
    /// `--constraint`.
    pub(crate) constraint: Option<String>,
    /// More `sbatch` options, each one `--name` or `--name=value`.
    pub(crate) extra_args: Vec<String>,
    /// At most this many tasks of the array run at once (`--array=…%P`).
    pub(crate) max_parallel: Option<u32>,
    /// How long a node may wait in Slurm's queue before it fails; `None`: as long as it takes.
    pub(crate) queue_timeout: Option<Duration>,
    /// The folder holding `sbatch`, `squeue` and `scancel`; `None`: found on `PATH`.
    pub(crate) bin_dir: Option<PathBuf>,
}

/// The typed `instance_config.slurm` of `settings`, validated as [`super::DeploymentConfig`]
/// does; errors name the fields (`instance_config.slurm.time_limit`).
pub(crate) fn slurm_settings(settings: &ProviderSettings) -> Result<SlurmConfig> {
    let mut problems = Problems::default();
    let slurm = match settings.section() {
        Value::Null => SlurmConfig::default(),
        section => parse_slurm(section, &settings.path(), &mut problems),
    };
    problems.into_result(slurm)
}

pub(super) fn parse_slurm(value: &Value, path: &str, problems: &mut Problems) -> SlurmConfig {
    let mut slurm = SlurmConfig::default();
    let Some(fields) = Fields::read(value, path, SLURM_FIELDS, problems) else {
        return slurm;
    };
    let word = |name: &str, extra: &str, what: &str, problems: &mut Problems| {
        let path = fields.path(name);
        let value = fields
            .get(name)
            .and_then(|value| scalar_string(value, &path, problems))?;
        if is_word(&value, extra) {
            Some(value)
        } else {
            problems.add(&path, format!("{value:?} is not {what}"));
            None
        }
    };
    slurm.partition = word(
        "partition",
        "-_.,",
        "a partition name, or names separated by `,` (letters, digits, `-`, `_`, `.`)",
        problems,
    );
    slurm.account = word(
        "account",
        "-_.",
        "an account name (letters, digits, `-`, `_`, `.`)",
        problems,
    );
    slurm.qos = word(
        "qos",
        "-_.,",
        "a QOS name (letters, digits, `-`, `_`, `.`)",
        problems,
    );
    slurm.gres = word(
        "gres",
        "-_.,:/",
        "a generic resource list like gpu:1 or gpu:a100:2",
        problems,
    );
    slurm.constraint = word(
        "constraint",
        "-_.,:&|[]*()!",
        "a feature expression like avx2 or \"intel&ib\" (no spaces)",
        problems,
    );
    if let Some(value) = fields.get("time_limit") {
        let path = fields.path("time_limit");
        if let Some(limit) = scalar_string(value, &path, problems) {
            if is_time_limit(&limit) {
                slurm.time_limit = Some(limit);
            } else {
                problems.add(
                    &path,
                    format!(
                        "{limit:?} is not a Slurm time limit: minutes, minutes:seconds, \
                         hours:minutes:seconds, days-hours, days-hours:minutes, \
                         days-hours:minutes:seconds, or UNLIMITED (e.g. 30, 1:30:00, 2-00:00:00)"
                    ),
                );
            }
        }
    }
    if let Some(value) = fields.get("cpus_per_node") {
        slurm.cpus_per_node = integer(value, &fields.path("cpus_per_node"), 1, 100_000, problems);
    }
    if let Some(value) = fields.get("mem") {
        let path = fields.path("mem");
        if let Some(mem) = scalar_string(value, &path, problems) {
            if is_memory(&mem) {
                slurm.mem = Some(mem);
            } else {
                problems.add(
                    &path,
                    format!(
                        "{mem:?} is not an amount of memory: a whole number with an optional \
                         unit K, M, G or T (e.g. 4G, 512M; no unit is megabytes)"
                    ),
                );
            }
        }
    }
    if let Some(value) = fields.get("extra_args") {
        let path = fields.path("extra_args");
        let args = string_list(value, &path, "sbatch options", problems);
        for (index, arg) in args.iter().enumerate() {
            if let Err(why) = check_extra_arg(arg) {
                problems.add(&item(&path, index), why);
            }
        }
        slurm.extra_args = args;
    }
    if let Some(value) = fields.get("max_parallel") {
        slurm.max_parallel = integer(
            value,
            &fields.path("max_parallel"),
            1,
            MAX_PARALLEL,
            problems,
        );
    }
    if let Some(value) = fields.get("queue_timeout") {
        slurm.queue_timeout = duration(value, &fields.path("queue_timeout"), problems);
    }
    if let Some(value) = fields.get("bin_dir") {
        let path = fields.path("bin_dir");
        if let Some(dir) = string(value, &path, problems) {
            if dir.starts_with('/') {
                slurm.bin_dir = Some(PathBuf::from(dir));
            } else {
                problems.add(
                    &path,
                    format!("{dir:?} must be an absolute path, like /opt/slurm/bin"),
                );
            }
        }
    }
    slurm
}

/// A string, or a number written as one (`partition: 2`, `time_limit: 30`).
fn scalar_string(value: &Value, path: &str, problems: &mut Problems) -> Option<String> {
    match value {
        Value::Number(n) if n.is_u64() => Some(n.to_string()),
        Value::String(_) => string(value, path, problems).map(|s| s.trim().to_owned()),
        other => {
            problems.add(path, format!("expected a string, got {}", describe(other)));
            None
        }
    }
}

/// Letters, digits and the characters of `extra`, not starting with `-`.
fn is_word(value: &str, extra: &str) -> bool {
    !value.is_empty()
        && !value.starts_with('-')
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
}

/// Slurm's time formats: `M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`, or unlimited.
pub(crate) fn is_time_limit(limit: &str) -> bool {
    if matches!(
        limit.to_ascii_lowercase().as_str(),
        "unlimited" | "infinite"
    ) {
        return true;
    }
    let numbers = |text: &str, most: usize| {
        let parts: Vec<&str> = text.split(':').collect();
        parts.len() <= most
            && parts.iter().all(|part| {
                !part.is_empty() && part.len() <= 9 && part.bytes().all(|b| b.is_ascii_digit())
            })
    };
    match limit.split_once('-') {
        Some((days, rest)) => numbers(days, 1) && numbers(rest, 3),
        None => numbers(limit, 3),
    }
}

/// A whole number with an optional unit `K`, `M`, `G` or `T`.
fn is_memory(mem: &str) -> bool {
    let digits = mem.trim_end_matches(['K', 'M', 'G', 'T', 'k', 'm', 'g', 't']);
    mem.len() - digits.len() <= 1
        && !digits.is_empty()
        && digits.len() <= 12
        && digits.bytes().all(|b| b.is_ascii_digit())
}

/// One `extra_args` item: a long option `--name` or `--name=value` that is not refused.
fn check_extra_arg(arg: &str) -> std::result::Result<(), String> {
    let Some(option) = arg.strip_prefix("--") else {
        return Err(format!(
            "{arg:?} is not a long sbatch option: write each option as one item, --name or \
             --name=value (e.g. --nodes=1, --mail-type=END)"
        ));
    };
    let name = option.split_once('=').map_or(option, |(name, _)| name);
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(format!("{arg:?} is not an sbatch option name"));
    }
    if arg.chars().any(char::is_control) {
        return Err(format!("{arg:?} holds a control character"));
    }
    // sbatch takes unambiguous prefixes of long options (`--out` for `--output`).
    let refused = REFUSED_OPTIONS
        .iter()
        .find(|(refused, _)| *refused == name || (name.len() >= 3 && refused.starts_with(name)));
    match refused {
        Some((refused, why)) => Err(format!("--{refused} is not allowed here: {why}")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> (SlurmConfig, Vec<String>) {
        let value: Value = serde_yaml::from_str(yaml).expect("test YAML");
        let mut problems = Problems::default();
        let slurm = parse_slurm(&value, "instance_config.slurm", &mut problems);
        (slurm, problems.0)
    }

    #[test]
    fn every_field_is_read() {
        let (slurm, problems) = parse(
            "partition: debug\naccount: proj-1\nqos: normal\ntime_limit: '1-02:30:00'\n\
             cpus_per_node: 4\nmem: 4G\ngres: 'gpu:1'\nconstraint: 'avx2&ib'\n\
             extra_args: ['--nodes=1', '--mail-type=END', '--hold']\nmax_parallel: 50\n\
             queue_timeout: 10m\nbin_dir: /opt/slurm/bin\n",
        );
        assert_eq!(problems, Vec::<String>::new());
        assert_eq!(
            slurm,
            SlurmConfig {
                partition: Some("debug".into()),
                account: Some("proj-1".into()),
                qos: Some("normal".into()),
                time_limit: Some("1-02:30:00".into()),
                cpus_per_node: Some(4),
                mem: Some("4G".into()),
                gres: Some("gpu:1".into()),
                constraint: Some("avx2&ib".into()),
                extra_args: vec![
                    "--nodes=1".into(),
                    "--mail-type=END".into(),
                    "--hold".into()
                ],
                max_parallel: Some(50),
                queue_timeout: Some(Duration::from_secs(600)),
                bin_dir: Some(PathBuf::from("/opt/slurm/bin")),
            }
        );
    }

    #[test]
    fn slurm_time_formats_are_accepted_and_others_refused() {
        for good in [
            "30",
            "30:15",
            "1:30:00",
            "2-0",
            "2-12:30",
            "2-12:30:00",
            "UNLIMITED",
            "infinite",
        ] {
            assert!(is_time_limit(good), "{good}");
        }
        for bad in [
            "",
            "1h",
            "1:2:3:4",
            "-5",
            "2-",
            "1:-1",
            "a-1",
            "1-1:2:3:4",
            "1.5",
        ] {
            assert!(!is_time_limit(bad), "{bad}");
        }
        let (_, problems) = parse("time_limit: 1h\n");
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0]
                .starts_with("instance_config.slurm.time_limit: \"1h\" is not a Slurm time limit"),
            "{problems:?}"
        );
        let (slurm, problems) = parse("time_limit: 45\n");
        assert!(problems.is_empty());
        assert_eq!(slurm.time_limit.as_deref(), Some("45"));
    }

    #[test]
    fn options_that_change_what_runs_or_where_output_goes_are_refused() {
        let (_, problems) = parse(
            "extra_args: ['--wrap=rm -rf /', '--export=ALL', '--output=/tmp/x', '-o', \
             '--out=/x', '--chdir=/', '--array=0-9', '--partition=x', 'END', '--comment=x']\n",
        );
        assert_eq!(
            problems,
            vec![
                "instance_config.slurm.extra_args[0]: --wrap is not allowed here: it would replace the node's bootstrap",
                "instance_config.slurm.extra_args[1]: --export is not allowed here: the node's environment comes from TaskFly",
                "instance_config.slurm.extra_args[2]: --output is not allowed here: TaskFly keeps each task's output in its work directory",
                "instance_config.slurm.extra_args[3]: \"-o\" is not a long sbatch option: write each option as one item, --name or --name=value (e.g. --nodes=1, --mail-type=END)",
                "instance_config.slurm.extra_args[4]: --output is not allowed here: TaskFly keeps each task's output in its work directory",
                "instance_config.slurm.extra_args[5]: --chdir is not allowed here: the tasks start in TaskFly's work directory",
                "instance_config.slurm.extra_args[6]: --array is not allowed here: TaskFly makes the array: one task per node",
                "instance_config.slurm.extra_args[7]: --partition is not allowed here: use instance_config.slurm.partition",
                "instance_config.slurm.extra_args[8]: \"END\" is not a long sbatch option: write each option as one item, --name or --name=value (e.g. --nodes=1, --mail-type=END)",
                "instance_config.slurm.extra_args[9]: --comment is not allowed here: TaskFly tags its jobs with --comment to find them again",
            ]
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        let (_, problems) = parse(
            "partition: '--wrap'\naccount: 'a b'\nmem: 4GB\ncpus_per_node: 0\nmax_parallel: -1\n\
             queue_timeout: soon\nbin_dir: bin\npartiton: x\n",
        );
        let paths: Vec<&str> = problems
            .iter()
            .map(|p| p.split(':').next().unwrap_or_default())
            .collect();
        assert_eq!(
            paths,
            [
                "instance_config.slurm.partiton",
                "instance_config.slurm.partition",
                "instance_config.slurm.account",
                "instance_config.slurm.cpus_per_node",
                "instance_config.slurm.mem",
                "instance_config.slurm.max_parallel",
                "instance_config.slurm.queue_timeout",
                "instance_config.slurm.bin_dir",
            ],
            "{problems:?}"
        );
        assert!(
            problems[0].contains("did you mean `partition`"),
            "{problems:?}"
        );
    }

    #[test]
    fn an_absent_section_is_all_defaults() {
        let settings = ProviderSettings::new("slurm", Value::Null);
        assert_eq!(slurm_settings(&settings).ok(), Some(SlurmConfig::default()));
    }
}
