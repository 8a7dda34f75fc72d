//! The providers `taskflyd` and `taskfly run --advertise-url` both register for nodes on other
//! machines (SSH hosts need nothing beyond the engine's own local provider).

use std::path::Path;

use taskfly::SlurmProvider;

/// The Slurm provider of an engine keeping its data in `data_dir`: the submission folders (the
/// node bootstraps the compute nodes read, so `data_dir` must be on a file system they share)
/// under `<data_dir>/work/slurm`, and every job tagged with `owner`, so that the engine's leak
/// checks keep to its own jobs.
pub(crate) fn slurm(data_dir: &Path, owner: String) -> SlurmProvider {
    SlurmProvider::new(data_dir.join("work").join("slurm")).owner(owner)
}
