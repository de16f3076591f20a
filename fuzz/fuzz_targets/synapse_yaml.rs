//! Fuzz target for the loaders of Synapse's YAML files, without the file system:
//! `Registration::from_yaml` (an appservice registration) and `HomeserverConfig::from_yaml`
//! (homeserver.yaml and its conf.d files, merged). Both must return `Ok` or `Err`, never panic,
//! and their errors must never quote a token.
//!
//! Input: UTF-8 text (other bytes are replaced); a NUL byte splits it into two config files,
//! merged in order.
//!
//! Run: `cargo fuzz run --sanitizer none synapse_yaml fuzz/seeds/synapse_yaml`
//! (or `.ci/fuzz-smoke.sh`). Seeds: `python3 fuzz/write_seeds.py`.
#![no_main]

use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use synapse_account_data_relay::synapse::files::{HomeserverConfig, Registration};

/// A token the seeds use: no error may show it.
const SEED_TOKEN: &str = "SeedTokenNeverQuoted";

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match Registration::from_yaml(&text, Path::new("/etc/matrix-synapse/appservices/fuzz.yaml")) {
        Ok(reg) => {
            assert!(!reg.id.is_empty() && !reg.sender_localpart.is_empty());
            let _ = reg.sender_user_id("example.org");
        }
        Err(e) => assert!(!e.to_string().contains(SEED_TOKEN), "an error quoted a token: {e}"),
    }
    let files: Vec<(PathBuf, String)> = text
        .split('\0')
        .enumerate()
        .map(|(i, part)| {
            (
                PathBuf::from(format!("/etc/matrix-synapse/conf.d/{i}.yaml")),
                part.to_owned(),
            )
        })
        .collect();
    match HomeserverConfig::from_yaml(&files, std::path::Path::new("/var/lib/matrix-synapse")) {
        Ok(config) => {
            assert!(!config.server_name.is_empty());
            let _ = config.client_url;
        }
        Err(e) => assert!(!e.to_string().contains(SEED_TOKEN), "an error quoted a password: {e}"),
    }
});
