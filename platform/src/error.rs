//! [`PlatformError`]: every failure of host integration, one enum for the crate, each message
//! saying what to do. Below everything that can fail; it knows only the journal's [`Change`]
//! (named by [`PlatformError::Undo`]).

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use thiserror::Error;

use crate::journal::Change;

/// Failures of host integration. Messages say what to do.
#[derive(Debug, Error)]
pub enum PlatformError {
    /// This OS is not supported.
    #[error("this operating system is not supported: mse-vpn runs on Linux, macOS and Windows")]
    Unsupported,
    /// A routed CIDR overlaps a network the host already reaches through a local interface.
    #[error(
        "{cidr} overlaps {existing}, which this host already reaches directly through {dev}: routing it into the tunnel would cut that network off. Pick the VPC's exact CIDR, or --exclude {existing}"
    )]
    RouteConflict {
        /// The plan's prefix.
        cidr: IpNet,
        /// The existing route's destination.
        existing: IpNet,
        /// Its interface.
        dev: String,
    },
    /// No current path to a jump-host address that must bypass the tunnel.
    #[error("there is no route to the jump host {addr}: check the network connection")]
    NoPathTo {
        /// The address.
        addr: IpAddr,
    },
    /// Another live session owns the TUN name.
    #[error(
        "another mse-vpn session (pid {pid}) is using {tun}: stop it with `mse-vpn down`, or pick another --tun"
    )]
    Busy {
        /// The TUN name.
        tun: String,
        /// The other session's pid.
        pid: i32,
    },
    /// Another live session already routes an overlapping network.
    #[error(
        "{cidr} overlaps {other}, already routed by the mse-vpn session on {tun} (pid {pid}): stop it first, or exclude the overlap"
    )]
    Overlap {
        /// Our prefix.
        cidr: IpNet,
        /// Theirs.
        other: IpNet,
        /// Their TUN.
        tun: String,
        /// Their pid.
        pid: i32,
    },
    /// The journal could not be written or read.
    #[error("restore journal {path}: {source}")]
    Journal {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// `ip` could not be run.
    #[error("cannot run `{cmd}` (is iproute2 installed?): {source}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// `ip` failed.
    #[error("`{cmd}` failed: {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// macOS: the kernel refused a route change that `route` reported on its output while
    /// exiting 0 (route.c). "File exists": the host already routes that destination.
    #[error(
        "`{cmd}` was refused by the kernel: {reason}. If that is \"File exists\", the host already has a route to that destination (another VPN's?): `netstat -rn` shows whose; stop that tool, or --exclude the overlap"
    )]
    Refused {
        /// The command line.
        cmd: String,
        /// What `route` printed after the gateway (`File exists`, `not in table`, ...).
        reason: String,
    },
    /// Windows: the TUN adapter never got an IPv6 interface (IPv6 is disabled on this host or
    /// unbound from the adapter), but IPv6 networks were to be routed.
    #[error(
        "the adapter {tun} has no IPv6 interface (is IPv6 disabled on this host?): drop the IPv6 --cidr, or enable IPv6"
    )]
    NoIpv6 {
        /// The TUN name.
        tun: String,
    },
    /// The resolver configuration could not be changed.
    #[error("cannot point {path} at the DNS responder: {source}")]
    Dns {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// macOS: another tool, or another running mse-vpn session, already resolves a split
    /// domain through `/etc/resolver`.
    #[error(
        "{path} exists and is not this session's (another VPN's split DNS, or another mse-vpn session with that --dns-domain?): stop that one or remove the file, or drop that --dns-domain"
    )]
    ResolverTaken {
        /// The resolver file.
        path: PathBuf,
    },
    /// Windows: a system call failed.
    #[error("{call} failed: {source}")]
    Os {
        /// The call (and its argument, where it helps).
        call: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A path that must be written to the journal contains whitespace.
    #[error(
        "{path} contains whitespace, which the restore journal cannot record: use a --state-dir without spaces"
    )]
    UnsafePath {
        /// The path.
        path: PathBuf,
    },
    /// Some changes could not be undone; they stay in the journal for a later repair.
    #[error(
        "could not undo {count} host change(s), kept in {path} so that `mse-vpn down --force` (or the next start) tries again; the first: `{first}`"
    )]
    Undo {
        /// How many changes are left.
        count: usize,
        /// The first of them.
        first: Change,
        /// The journal that keeps them.
        path: PathBuf,
        /// Why undoing the first failed.
        #[source]
        source: Box<PlatformError>,
    },
    /// `ip -j` printed something unexpected.
    #[error("cannot parse the output of `{cmd}`: {source}")]
    Parse {
        /// The command line.
        cmd: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}
