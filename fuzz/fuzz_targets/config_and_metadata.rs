//! `taskfly.yml` text → `DeploymentConfig::from_yaml` → `MetadataGenerator` → node environments.
//! See `taskfly_fuzz::config::check` for what is checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() > taskfly_fuzz::config::MAX_INPUT {
        return;
    }
    taskfly_fuzz::config::check(&String::from_utf8_lossy(data));
});
