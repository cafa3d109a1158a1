//! End-to-end tests, run as root: each test builds its own network namespaces (laptop, jump
//! host with a real OpenSSH sshd, VPC with real servers) with `scripts/testbed` and tears
//! them down on drop, even when it fails. Linux only: the testbed is Linux network
//! namespaces (other systems' backends are covered by the platform crate's unit tests).

#![cfg(target_os = "linux")]

mod auth;
mod cli;
mod config;
mod dns;
mod flow_control;
mod frameworks;
mod harness;
mod host_keys;
mod hostile;
mod isolation;
mod lifecycle;
mod outbound;
mod reverse;
mod rootless;
mod team;

/// Every test's testbed has a name of its own: two tests that share one tear down each
/// other's namespaces when they run at once (the suite runs three at a time).
#[test]
fn testbed_names_are_unique() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it");
    let mut seen = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("tests/it") {
        let path = entry.expect("an entry").path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("a test file");
        for (i, _) in text.match_indices("Testbed::up(\"") {
            let rest = &text[i + "Testbed::up(\"".len()..];
            let name = &rest[..rest.find('"').expect("a closing quote")];
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            if let Some(first) = seen.insert(name.to_owned(), file.clone()) {
                panic!("testbed name {name:?} is used in {first} and in {file}");
            }
        }
    }
    assert!(seen.len() > 40, "found the testbeds: {seen:?}");
}
