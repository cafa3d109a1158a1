//! # mse-vpn
//!
//! Puts this machine inside a private cloud network. Traffic to the routed CIDRs enters a TUN
//! device; a user-space TCP stack (smoltcp) terminates every flow; each flow is carried as an
//! SSH `direct-tcpip` channel to a jump host running a stock OpenSSH sshd, which connects to
//! the private destination. Apps connect by private IP, unchanged.
//!
//! ```text
//!  app ──TCP──▶ kernel ──route 10.0.0.0/16──▶ TUN ──▶ Driver ──▶ Engine (smoltcp, flows)
//!                                              ▲        │  ▲            │
//!                                              └────────┘  └── SSH session: one
//!                                                               direct-tcpip channel
//!                                                               per flow ──▶ jump host ──▶ VPC
//!  VPC caller ──▶ jump host listener (tcpip-forward, --expose) ──forwarded-tcpip──▶ Driver
//!        ──▶ Engine: SYN from the caller's own address ──▶ TUN ──▶ local app
//!  platform crate: TUN address, routes, restore journal (knows nothing of smoltcp or russh)
//! ```
//!
//! With `--dns-domain`, [`dns`] answers DNS on the TUN's own address: names in those domains
//! go to the VPC resolver through the tunnel, every other name to the host's original
//! nameservers.
//!
//! What it does not do: carry UDP or ICMP (they get an ICMP unreachable so apps fail fast),
//! or touch any traffic outside the routed CIDRs.
//!
//! Modules: [`engine`] is sans-IO (no sockets, no clock); [`driver`] is the one task that owns
//! it; [`reverse`] keeps the `--expose` listeners; [`run`] starts a provider app with the
//! registration settings that make it publish the jump host's address; [`ssh`] and [`tun`] are the only modules of this crate that touch the OS.

#![forbid(unsafe_code)]

pub mod cli;
pub mod control;
pub mod dns;
pub mod doctor;
pub mod driver;
pub mod engine;
pub mod fds;
pub mod logging;
pub mod pool;
pub mod repeats;
pub mod reverse;
pub mod run;
pub mod session;
pub mod ssh;
pub mod suggest;
pub mod tun;
