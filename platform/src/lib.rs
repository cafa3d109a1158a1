//! # mse-vpn-platform
//!
//! Host integration for mse-vpn: the [`RoutePlan`] (pure: which prefixes go into the TUN, the
//! TUN's own addresses, which jump-host addresses bypass it), and the OS side that applies it:
//! addresses and routes on the TUN link, bypass host routes, split DNS ([`dns`]: on Linux
//! systemd-resolved routing domains or the resolv.conf fallback, on macOS `/etc/resolver`
//! files, on Windows an NRPT rule), and the on-disk restore journal that lets a crashed session
//! be undone.
//!
//! It knows nothing of smoltcp or russh. The caller creates the TUN device (and holds its fd);
//! this crate configures it. Every change is written to the journal before it is made;
//! [`Host::restore`] undoes them in reverse; [`repair`] undoes what a dead session left.
//!
//! One journaling driver (`host.rs`) for every OS, and one backend file per OS that knows how
//! to read the host's routes and make or undo one change, selected by `cfg`:
//!
//! | OS | file | addresses, routes | split DNS | control channel |
//! |---|---|---|---|---|
//! | Linux | `linux.rs` | iproute2's `ip` (JSON output for reading), policy rules for replies | systemd-resolved or resolv.conf | Unix socket |
//! | macOS | `macos.rs` | `ifconfig`, `route`, `netstat -rn` | `/etc/resolver/DOMAIN` files | Unix socket |
//! | Windows | `windows.rs` + `win32net.rs` | IP Helper API | an NRPT rule | named pipe, owner-only ACL |
//!
//! Each backend's plan/journal/undo logic is unit-tested on every OS against a fake host that
//! answers as the real tools or API do (the exact commands and API calls are asserted). Other
//! systems compile against a stub backend that answers [`PlatformError::Unsupported`]. The
//! small OS adapters the rest of mse-vpn needs live here too: [`account`] (users, file
//! ownership), [`process`] (signals, privileges, running as the invoking user), [`ipc`] (the
//! control channel) and [`rootless`] (`mse-vpn run` without root: the app's own user and
//! network namespace, Linux). `unsafe` code is confined to `sys.rs` (glibc's allocator, the
//! TUN ioctls, descriptor passing), `win32.rs` (Win32 calls: processes, owners, ACLs, pipes) and `win32net.rs` (the IP
//! Helper and registry calls).
//!
//! Modules, in layers: each imports only from the layers below it (no import circles); this
//! file is the top, and nothing imports it.
//!
//! ```text
//!  lib.rs     the face: Host, preflight, repair, leftovers; picks this OS's backend
//!  linux  macos  windows ◀ win32net  (stub)   one backend per OS (win32net: Windows' real Api)
//!  host       the journaling driver: the changes of a plan, journaled, made, undone, repaired
//!  dns        split-DNS files, detection, resolvectl
//!  command    runs the host's tools; the Runner seam the tests fake
//!  error      PlatformError
//!  rootless   the app's own namespace (`run` without root); knows only plan
//!  journal    plan    process    ipc
//!  win32      Win32 calls below everything Windows (processes, owners, ACLs, pipes)
//!  account    sys
//! ```

#![deny(unsafe_code)]

#[cfg(not(any(unix, windows)))]
compile_error!("mse-vpn runs on Linux, macOS and Windows only");

pub mod account;
pub mod dns;
pub mod ipc;
pub mod journal;
pub mod plan;
pub mod process;
pub mod rootless;
pub mod sys;

#[cfg_attr(windows, allow(dead_code))]
mod command;
mod error;
mod host;
#[cfg(any(target_os = "linux", test))]
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
mod linux;
#[cfg(any(target_os = "macos", test))]
#[cfg_attr(not(target_os = "macos"), allow(dead_code))]
mod macos;
#[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
mod stub;
#[cfg(windows)]
mod win32;
#[cfg(windows)]
mod win32net;
#[cfg(any(windows, test))]
#[cfg_attr(not(windows), allow(dead_code))]
mod windows;

#[cfg(target_os = "linux")]
use linux::system;
#[cfg(target_os = "macos")]
use macos::system;
#[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
use stub::system;
#[cfg(windows)]
use win32net::system;

/// The default TUN name: macOS names its utun devices itself (`utunN`); elsewhere any name.
#[cfg(target_os = "macos")]
pub const DEFAULT_TUN: &str = "utun9";
/// The default TUN name: macOS names its utun devices itself (`utunN`); elsewhere any name.
#[cfg(not(target_os = "macos"))]
pub const DEFAULT_TUN: &str = "mse0";

/// The default state directory (journals, control sockets, daemon logs).
#[cfg(target_os = "linux")]
pub const DEFAULT_STATE_DIR: &str = "/run/mse-vpn";
/// The default state directory (journals, control sockets, daemon logs).
#[cfg(all(unix, not(target_os = "linux")))]
pub const DEFAULT_STATE_DIR: &str = "/var/run/mse-vpn";
/// The default state directory (journals, daemon logs).
#[cfg(windows)]
pub const DEFAULT_STATE_DIR: &str = r"C:\ProgramData\mse-vpn";

use std::path::Path;

use host::Backend;

pub use error::PlatformError;
pub use host::{ExistingRoute, PathInfo, Preflight};
pub use journal::Change;
pub use plan::{PlanError, PlanSpec, RoutePlan};
/// Windows: the wintun adapter GUID for a TUN name (fixed per name; see `windows.rs`).
#[cfg(windows)]
pub use windows::adapter_guid;

/// Read-only checks of a plan against the host: conflicts with existing interface routes and
/// with other live sessions, and a path to every bypass address.
pub async fn preflight(plan: &RoutePlan, state_dir: &Path) -> Result<Preflight, PlatformError> {
    host::preflight(&mut system(), plan, state_dir).await
}

/// Every existing route (main table, other than the default route) that overlaps a planned
/// route: read-only, for `doctor`.
pub async fn overlapping_routes(plan: &RoutePlan) -> Result<Vec<ExistingRoute>, PlatformError> {
    host::overlapping_routes(&mut system(), plan).await
}

/// The changes this session made; undo them with [`Host::restore`].
#[derive(Debug)]
pub struct Host {
    inner: host::Applied,
}

impl Host {
    /// Configures the existing TUN link `plan.tun_name()` and adds the routes, journaling
    /// every change first. On failure, whatever was done is undone.
    pub async fn apply(plan: &RoutePlan, state_dir: &Path) -> Result<Host, PlatformError> {
        Ok(Host {
            inner: host::apply(&mut system(), plan, state_dir).await?,
        })
    }

    /// Points the host resolver at the DNS responder `plan.server` for `plan.zones` only
    /// (Linux: systemd-resolved when it runs, else the resolv.conf fallback; macOS: one
    /// `/etc/resolver` file per zone; Windows: an NRPT rule), journaled like every
    /// other change and undone by [`Host::restore`] / [`repair`].
    pub async fn apply_dns(
        &mut self,
        tun: &str,
        plan: &dns::DnsPlan,
        state_dir: &Path,
    ) -> Result<dns::DnsBackend, PlatformError> {
        host::apply_dns(&mut system(), &mut self.inner, tun, plan, state_dir).await
    }

    /// Undoes every change in reverse order and deletes the journal.
    pub async fn restore(self) -> Result<(), PlatformError> {
        host::restore(&mut system(), self.inner).await
    }
}

/// Undoes what sessions that are no longer running left behind (per their journals) and
/// returns the changes actually undone. Live sessions are left alone.
pub async fn repair(state_dir: &Path) -> Result<Vec<Change>, PlatformError> {
    host::repair(&mut system(), state_dir).await
}

/// A session that is no longer running but left host changes behind (its journal is still
/// there): what `status` reports and `down` undoes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leftover {
    /// Its TUN name.
    pub tun: String,
    /// Its process id, as journaled.
    pub pid: Option<i32>,
    /// What it changed and did not undo, in the order it was done.
    pub changes: Vec<Change>,
}

impl Leftover {
    /// What is left, in a few words ("routes and DNS settings").
    pub fn describe(&self) -> String {
        let mut kinds: Vec<&str> = Vec::new();
        for c in &self.changes {
            let kind = match c {
                Change::Link { .. } | Change::Addr { .. } => continue,
                Change::Route { .. } | Change::TableDefault { .. } | Change::Rule { .. } => {
                    "routes"
                }
                Change::Bypass { .. } => "a host route to the jump host",
                Change::ResolvedLink { .. }
                | Change::ResolvConf { .. }
                | Change::ResolvConfLink { .. }
                | Change::ResolverFile { .. }
                | Change::NrptRule { .. } => "DNS settings",
            };
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        match kinds.as_slice() {
            [] => "a restore journal".to_owned(),
            [one] => (*one).to_owned(),
            [init @ .., last] => format!("{} and {last}", init.join(", ")),
        }
    }
}

/// True while the session on `tun` runs, by the pid in its journal (no journal: nothing
/// runs that could still change the host). A stopping session removes its control socket a
/// moment before it exits; what it could not undo is final only once it has exited.
pub fn session_running(state_dir: &Path, tun: &str) -> bool {
    let path = journal::path_for(state_dir, tun);
    let b = system();
    if !b.journal_trusted(&path) {
        return false;
    }
    journal::read(&path)
        .ok()
        .and_then(|rec| rec.pid)
        .is_some_and(|pid| b.pid_alive(pid))
}

/// The sessions that are no longer running but left changes behind, by their journals in
/// `state_dir` (read-only: [`repair`] undoes them). The same test as [`repair`]'s decides
/// what is dead.
pub fn leftovers(state_dir: &Path) -> Result<Vec<Leftover>, PlatformError> {
    let b = system();
    leftovers_where(state_dir, |path| b.journal_trusted(path))
}

/// [`leftovers`] among the journals that are `trusted` (see the backends' `journal_trusted`).
fn leftovers_where(
    state_dir: &Path,
    trusted: impl Fn(&Path) -> bool,
) -> Result<Vec<Leftover>, PlatformError> {
    let Ok(dir) = std::fs::read_dir(state_dir) else {
        return Ok(Vec::new());
    };
    let mut left = Vec::new();
    for entry in dir.flatten() {
        let path = entry.path();
        let (Some(tun), Some("journal")) = (
            path.file_stem().and_then(|s| s.to_str()),
            path.extension().and_then(|e| e.to_str()),
        ) else {
            continue;
        };
        if !trusted(&path) {
            continue;
        }
        let rec = match journal::read(&path) {
            Ok(rec) => rec,
            // Removed by its session in the meantime, or not ours to read: nothing to say.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                ) =>
            {
                continue;
            }
            Err(source) => return Err(PlatformError::Journal { path, source }),
        };
        if rec.pid.is_some_and(|pid| system().pid_alive(pid)) {
            continue;
        }
        left.push(Leftover {
            tun: tun.to_owned(),
            pid: rec.pid,
            changes: rec.changes,
        });
    }
    left.sort_by(|a, b| a.tun.cmp(&b.tun));
    Ok(left)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_are_the_journals_of_dead_sessions() {
        let dir = std::env::temp_dir().join(format!("mse-vpn-left-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let all = |_: &Path| true;
        assert_eq!(
            leftovers_where(&dir, all).unwrap(),
            [],
            "no state dir: nothing left"
        );
        // A live session (this process) and a dead one (a pid that cannot exist).
        let mut live =
            journal::Journal::create(&journal::path_for(&dir, "mvlive"), std::process::id())
                .unwrap();
        live.record(&Change::Route {
            dst: "10.0.0.0/16".parse().unwrap(),
            dev: "mvlive".into(),
        })
        .unwrap();
        let mut dead =
            journal::Journal::create(&journal::path_for(&dir, "mvdead"), i32::MAX as u32).unwrap();
        for c in [
            Change::Link {
                name: "mvdead".into(),
            },
            Change::Route {
                dst: "10.0.0.0/16".parse().unwrap(),
                dev: "mvdead".into(),
            },
            Change::ResolvConf {
                file: "/etc/resolv.conf".into(),
                backup: dir.join("mvdead.resolv.conf.orig"),
            },
        ] {
            dead.record(&c).unwrap();
        }
        std::fs::write(dir.join("other.sock"), "").unwrap();
        // (The real trust test is the OS's: on Windows the journal's owner, which Wine does
        // not keep; see the Windows backend's tests.)
        let left = leftovers_where(&dir, all).unwrap();
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(
            (left[0].tun.as_str(), left[0].pid),
            ("mvdead", Some(i32::MAX))
        );
        assert_eq!(left[0].changes.len(), 3);
        assert_eq!(left[0].describe(), "routes and DNS settings");
        let planted = |p: &Path| !p.ends_with("mvdead.journal");
        assert_eq!(
            leftovers_where(&dir, planted).unwrap(),
            [],
            "an untrusted journal is no leftover"
        );
        // (Closed first: Windows deletes no open file.)
        drop((live, dead));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
