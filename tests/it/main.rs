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
mod harness;
mod host_keys;
mod hostile;
mod lifecycle;
mod outbound;
mod reverse;
mod team;
