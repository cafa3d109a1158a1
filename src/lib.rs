//! # mse-vpn
//!
//! Puts this machine inside a private cloud network. Traffic to the routed CIDRs enters a TUN
//! device; a user-space TCP stack (smoltcp) terminates every flow; each flow is carried as an
//! SSH `direct-tcpip` channel to a jump host running a stock OpenSSH sshd, which connects to
//! the private destination. Apps connect by private IP, unchanged.
//!
//! ```text
//!  app ──TCP──▶ kernel ──route 10.0.0.0/16──▶ TUN ◀──▶ Driver ◀──▶ SSH session: one direct-tcpip
//!                                                      │    │      channel per flow ──▶ jump host ──▶ VPC
//!                         Engine (sans-IO) ◀───────────┘    └───────────▶ Relay (sans-IO)
//!                         packets ↔ byte streams                          flows ↔ channels,
//!                         (smoltcp, the flow table)                       every decision about them
//!  VPC caller ──▶ jump host listener (tcpip-forward, --expose) ──forwarded-tcpip──▶ Driver
//!        ──▶ Relay routes it ──▶ Engine: SYN from the caller's own address ──▶ TUN ──▶ local app
//!  platform crate: TUN address, routes, restore journal (knows nothing of smoltcp or russh)
//! ```
//!
//! Two sans-IO cores and one loop: the [`engine`] turns packets into byte streams and back;
//! the [`relay`] owns each flow's channel side and every decision about it (admission,
//! placement, deadlines, what a lost link or a refused open does, cloud callers, warnings);
//! neither has a socket, a task or a clock, and both are tested on virtual time. The
//! [`driver`] is the one task between them and the world: it waits on the TUN, the channels
//! ([`channel`]) and one timer, hands each event to its core and carries out the relay's
//! commands, deciding nothing.
//!
//! With `--dns-domain`, [`dns`] answers DNS on the TUN's own address: names in those domains
//! go to the VPC resolver through the tunnel, every other name to the host's original
//! nameservers.
//!
//! What it does not do: carry UDP or ICMP into the VPC (they get an ICMP unreachable so apps
//! fail fast), or, in `up`, touch any traffic outside the routed CIDRs.
//!
//! The direct path (`mse-vpn run` without root, where the TUN is the app's only way out): a
//! flow outside the VPC bypasses SSH entirely, on a host TCP connection that the relay treats
//! like a channel ([`channel::HostStream`]); UDP outside the VPC goes through a NAT table of
//! host UDP sockets ([`relay::direct`], [`udp`]), pings through unprivileged ICMP sockets where
//! the host allows them; the TUN's peer address stands for the host's loopback, and DNS to
//! the DNS address goes to the split-DNS responder.
//!
//! ```text
//!  app ─▶ TUN ─▶ Engine ─▶ Relay: route(dst) ─┬─ VPC CIDR ─▶ SSH channel ─▶ jump host ─▶ VPC
//!                                             └─ otherwise ─▶ host socket (TCP, UDP NAT) ─▶ dst
//! ```
//!
//! Modules, in layers: each imports only from the layers below it (no import circles), and
//! nothing outside [`cli`] imports [`cli`].
//!
//! ```text
//!  main.rs    parse and dispatch
//!  cli        clap, one file per command; prints, maps errors to exit statuses
//!  doctor     read-only checks of what `up` needs
//!  session    `up` as a library type: checks, connections, host changes, teardown
//!  driver     the loop between the two cores and the world (TUN, channels, one timer)
//!  channel    a flow's channel (SSH, or a host connection) behind a small trait; wakers;
//!             opens, connects and writes in flight; udp: the direct path's UDP sockets
//!  control    the control socket: typed protocol, status board, server, client, table
//!  relay      sans-IO: flows ↔ channels, every decision about them
//!  reverse    --expose listeners;   dns   split-DNS responder and tunnel
//!  pool       the SSH connections; publishes link events (the status board follows them)
//!  engine, ssh, tun, fds, logging, repeats, suggest, run, registry, budget (the memory
//!  budget)
//! ```
//!
//! [`engine`] and [`relay`] are sans-IO (no sockets, no clock); [`driver`] is the one task
//! that owns them; [`reverse`] keeps the `--expose` listeners; [`run`] makes the registration settings for a
//! provider app that should publish the jump host's address (tagged, or not at all), and
//! [`registry`] reads the team's registry (ZooKeeper, Nacos) to confirm what it published. The OS is reached through
//! [`tun`], [`ssh`], the sockets of [`control`] and [`dns`], and the platform crate (routes,
//! DNS configuration, processes); `unsafe` is forbidden in this crate. Library code returns
//! values and logs through `tracing`; only [`cli`] prints (and [`ssh`]'s password prompt, on the
//! terminal, as OpenSSH's does).

#![forbid(unsafe_code)]

pub mod budget;
pub mod channel;
pub mod cli;
pub mod control;
pub mod dns;
pub mod doctor;
pub mod driver;
pub mod engine;
pub mod fds;
pub mod logging;
pub mod pool;
pub mod registry;
pub mod relay;
pub mod repeats;
pub mod reverse;
pub mod run;
pub mod session;
pub mod ssh;
pub mod suggest;
pub mod tun;
pub mod udp;
