//! ssh_config text as `up --proxy ALIAS` reads it: any text is parsed into settings or a
//! typed error, never a panic; the expansion of path-like values never panics either.

#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use mse_vpn::ssh::config::{HostConfig, Sources};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let sources = Sources {
        user_file: None,
        system_file: None,
        home: PathBuf::from("/nonexistent-home"),
        local_user: "dev".into(),
        uid: 1000,
        gid: 1000,
        ssh_client: None, // this parser only: the fuzzer runs no `ssh -G`
    };
    for host in ["bastion", "db.corp", "10.0.0.1"] {
        if let Ok(cfg) = HostConfig::parse_str(text, &sources, host) {
            for raw in cfg.identity_files.iter().chain(cfg.proxy_command.iter()) {
                let _ = HostConfig::expand(raw, &sources, host, host, 22, "user");
            }
        }
    }
});
