//! The OS-neutral half of every backend (Linux, macOS, Windows): which [`Change`]s a plan
//! needs and in what order, each journaled before it is made, undone in reverse, other live
//! sessions' networks refused, dead sessions' leftovers repaired. A [`Backend`] only knows how
//! to read the host's routes and make or undo one change (and, where its OS needs them, a few
//! more: Linux's policy rules for replies to cloud callers, a route someone else already
//! made, a change whose failed making may have left part of it behind); this file never
//! touches the OS itself.

use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use tracing::{debug, warn};

use crate::dns::{DnsBackend, DnsPlan};
use crate::error::PlatformError;
use crate::journal::{self, Change, Journal};
use crate::plan::RoutePlan;

/// The current path to an address (before the TUN exists).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathInfo {
    /// The gateway, if not directly connected.
    pub via: Option<IpAddr>,
    /// The output interface.
    pub dev: String,
}

/// What [`preflight`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preflight {
    /// The current path of each bypass address.
    pub bypass_paths: Vec<(IpAddr, PathInfo)>,
}

/// A route the host already has that overlaps a planned route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExistingRoute {
    /// Its destination.
    pub dst: IpNet,
    /// Its interface.
    pub dev: String,
    /// Its gateway, if any.
    pub via: Option<IpAddr>,
    /// True for a network reached directly through a local interface (a LAN, a Docker
    /// bridge): routing it into the tunnel would cut it off.
    pub local: bool,
    /// The planned route it overlaps.
    pub planned: IpNet,
}

/// A route the host has, as a backend reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteEntry {
    /// Its destination.
    pub dst: IpNet,
    /// Its interface.
    pub dev: String,
    /// Its gateway, if any.
    pub via: Option<IpAddr>,
    /// A network reached directly through a local interface.
    pub local: bool,
}

/// What one OS must provide; everything else is shared.
pub trait Backend {
    /// True if process `pid` is running.
    fn pid_alive(&self, pid: i32) -> bool;
    /// True if the journal at `path` was written by a privileged mse-vpn, not planted by
    /// someone else: only such journals are repaired or count as sessions. Unix: the state
    /// directory is root's and not writable by others (so any journal in it is). Windows: its
    /// owner is SYSTEM or Administrators.
    fn journal_trusted(&self, path: &Path) -> bool {
        let _ = path;
        true
    }
    /// The current path to `addr`.
    async fn path_to(&mut self, addr: IpAddr) -> Result<PathInfo, PlatformError>;
    /// The host's routes, default routes excluded (an address family `plan` routes nothing
    /// of may be left unread).
    async fn routes(&mut self, plan: &RoutePlan) -> Result<Vec<RouteEntry>, PlatformError>;
    /// The changes, made after the routes, that send replies to cloud callers (`--expose`)
    /// into the TUN when the caller is outside the routed networks. None by default: where
    /// callers can only be inside them, the routes already do.
    fn reply_changes(&self, plan: &RoutePlan) -> Vec<Change> {
        let _ = plan;
        Vec::new()
    }
    /// True if the host already has `change`, made by someone else (a host route to the jump
    /// host): it is kept as it is, neither journaled nor made, so never undone. Never, by
    /// default.
    async fn present(&mut self, change: &Change) -> Result<bool, PlatformError> {
        let _ = change;
        Ok(false)
    }
    /// Makes one change of `plan` (already journaled).
    async fn make(&mut self, change: &Change, plan: &RoutePlan) -> Result<(), PlatformError>;
    /// The DNS integration this host uses.
    async fn dns_backend(&mut self) -> DnsBackend;
    /// The changes that point the host resolver (integrated through `dns`) at `plan.server`
    /// for `plan.zones`; a backup of a file may be kept in `state_dir`. Nothing is changed yet.
    fn dns_changes(
        &self,
        dns: DnsBackend,
        tun: &str,
        plan: &DnsPlan,
        state_dir: &Path,
    ) -> Result<Vec<Change>, PlatformError>;
    /// Makes one of [`Backend::dns_changes`] (already journaled).
    async fn make_dns(
        &mut self,
        change: &Change,
        tun: &str,
        plan: &DnsPlan,
    ) -> Result<(), PlatformError>;
    /// True if a failed attempt to make `change` may have made part of it (the first of
    /// several commands, a file half written): it then stays journaled as made, so that undo
    /// cleans up. Otherwise (the default) a failure made nothing and is journaled as not made.
    fn partial(&self, change: &Change) -> bool {
        let _ = change;
        false
    }
    /// Undoes one change if it is still there: `Ok(true)` if something was removed.
    async fn undo(&mut self, change: &Change) -> Result<bool, PlatformError>;
}

/// The changes of one session, with its open journal.
#[derive(Debug)]
pub struct Applied {
    journal: Journal,
    changes: Vec<Change>,
}

impl Applied {
    fn record(&mut self, change: Change) -> Result<(), PlatformError> {
        self.journal
            .record(&change)
            .map_err(|source| PlatformError::Journal {
                path: self.journal.path().to_owned(),
                source,
            })?;
        self.changes.push(change);
        Ok(())
    }

    /// The last recorded change was not made (making it failed): journal that, so that undo
    /// never removes something of the same name this session did not create. If even that
    /// cannot be written, the change stays journaled and undo tolerates its absence.
    fn not_made(&mut self) {
        if let Some(change) = self.changes.pop()
            && self.journal.record_not_made(&change).is_err()
        {
            self.changes.push(change);
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
impl Applied {
    /// Changes recorded in `journal` (tests give it one that fails: /dev/full).
    pub fn on(journal: Journal) -> Applied {
        Applied {
            journal,
            changes: Vec::new(),
        }
    }
}

/// Journals `change`, then makes it with `make`. A failure is journaled as "not made" unless
/// the backend says it may have made part of it ([`Backend::partial`]).
async fn journaled<B: Backend>(
    b: &mut B,
    applied: &mut Applied,
    change: &Change,
    make: impl AsyncFnOnce(&mut B) -> Result<(), PlatformError>,
) -> Result<(), PlatformError> {
    applied.record(change.clone())?;
    let made = make(b).await;
    if made.is_err() && !b.partial(change) {
        applied.not_made();
    }
    made
}

/// The changes a plan needs, in the order they are made: the link (MTU, up), its addresses,
/// the bypass host routes (before any route could capture the jump host), then the routes.
pub fn changes_for(plan: &RoutePlan, bypass: &[(IpAddr, PathInfo)]) -> Vec<Change> {
    let tun = plan.tun_name();
    let mut out = vec![Change::Link {
        name: tun.to_owned(),
    }];
    out.extend(plan.tun_addrs().into_iter().map(|addr| Change::Addr {
        addr,
        dev: tun.to_owned(),
    }));
    out.extend(bypass.iter().map(|(addr, path)| Change::Bypass {
        dst: IpNet::from(*addr),
        via: path.via,
        dev: path.dev.clone(),
    }));
    out.extend(plan.routes().iter().map(|dst| Change::Route {
        dst: *dst,
        dev: tun.to_owned(),
    }));
    out
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

/// Journals of other live sessions in `state_dir`: (tun, pid, routed networks). Journals that
/// are not `trusted` are not sessions.
pub fn live_sessions(
    state_dir: &Path,
    alive: impl Fn(i32) -> bool,
    trusted: impl Fn(&Path) -> bool,
) -> Vec<(String, i32, Vec<IpNet>)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(state_dir) else {
        return out;
    };
    for entry in dir.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "journal") || !trusted(&path) {
            continue;
        }
        let Ok(rec) = journal::read(&path) else {
            continue;
        };
        let Some(pid) = rec
            .pid
            .filter(|p| alive(*p) && *p as u32 != std::process::id())
        else {
            continue;
        };
        let tun = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let routes = rec
            .changes
            .iter()
            .filter_map(|c| match c {
                Change::Route { dst, .. } => Some(*dst),
                _ => None,
            })
            .collect();
        out.push((tun, pid, routes));
    }
    out
}

/// The first conflict of `plan` with another live session: its TUN name, or an overlapping
/// network.
pub fn session_conflict(
    plan: &RoutePlan,
    live: Vec<(String, i32, Vec<IpNet>)>,
) -> Option<PlatformError> {
    for (tun, pid, routes) in live {
        if tun == plan.tun_name() {
            return Some(PlatformError::Busy { tun, pid });
        }
        for ours in plan.routes() {
            if let Some(other) = routes.iter().find(|r| overlaps(r, ours)) {
                return Some(PlatformError::Overlap {
                    cidr: *ours,
                    other: *other,
                    tun,
                    pid,
                });
            }
        }
    }
    None
}

/// Every existing route that overlaps a planned one (read-only).
pub async fn overlapping_routes<B: Backend>(
    b: &mut B,
    plan: &RoutePlan,
) -> Result<Vec<ExistingRoute>, PlatformError> {
    let mut out = Vec::new();
    for r in b.routes(plan).await? {
        if r.dev == plan.tun_name() || r.dst.prefix_len() == 0 {
            continue;
        }
        if let Some(planned) = plan.routes().iter().find(|w| overlaps(w, &r.dst)) {
            out.push(ExistingRoute {
                planned: *planned,
                dst: r.dst,
                dev: r.dev,
                via: r.via,
                local: r.local,
            });
        }
    }
    Ok(out)
}

/// Read-only checks: other live sessions, networks reached directly, paths to the bypass
/// addresses.
pub async fn preflight<B: Backend>(
    b: &mut B,
    plan: &RoutePlan,
    state_dir: &Path,
) -> Result<Preflight, PlatformError> {
    let live = live_sessions(state_dir, |p| b.pid_alive(p), |j| b.journal_trusted(j));
    if let Some(e) = session_conflict(plan, live) {
        return Err(e);
    }
    // A network this host reaches directly (LAN, Docker bridge, point-to-point VPN link)
    // would be cut off by routing it into the tunnel.
    for existing in overlapping_routes(b, plan).await? {
        // A host route to a bypass address is the path we keep, not a conflict.
        if !existing.local
            || plan
                .bypass()
                .iter()
                .any(|a| IpNet::from(*a) == existing.dst)
        {
            continue;
        }
        return Err(PlatformError::RouteConflict {
            cidr: existing.planned,
            existing: existing.dst,
            dev: existing.dev,
        });
    }
    let mut bypass_paths = Vec::new();
    for addr in plan.bypass() {
        bypass_paths.push((*addr, b.path_to(*addr).await?));
    }
    Ok(Preflight { bypass_paths })
}

/// Applies `plan`, journaling each change before it is made; on failure undoes what was done.
pub async fn apply<B: Backend>(
    b: &mut B,
    plan: &RoutePlan,
    state_dir: &Path,
) -> Result<Applied, PlatformError> {
    let path = journal::path_for(state_dir, plan.tun_name());
    if b.journal_trusted(&path)
        && let Ok(rec) = journal::read(&path)
        && let Some(pid) = rec
            .pid
            .filter(|p| b.pid_alive(*p) && *p as u32 != std::process::id())
    {
        return Err(PlatformError::Busy {
            tun: plan.tun_name().to_owned(),
            pid,
        });
    }
    // Paths for bypass addresses are looked up before any route of ours exists.
    let mut bypass = Vec::new();
    for addr in plan.bypass() {
        bypass.push((*addr, b.path_to(*addr).await?));
    }
    let journal =
        Journal::create(&path, std::process::id()).map_err(|source| PlatformError::Journal {
            path: path.clone(),
            source,
        })?;
    let mut applied = Applied {
        journal,
        changes: Vec::new(),
    };
    let mut changes = changes_for(plan, &bypass);
    changes.extend(b.reply_changes(plan));
    for change in changes {
        let made = match b.present(&change).await {
            Ok(true) => {
                debug!(%change, "already on the host, made by someone else: keeping it as it is");
                continue;
            }
            Ok(false) => {
                journaled(b, &mut applied, &change, async |b| {
                    b.make(&change, plan).await
                })
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = made {
            warn!("setting up the host failed ({e}); undoing what was done");
            if let Err(undo) = restore(b, applied).await {
                // Kept in the journal for `down --force` or the next start; said, not hidden.
                warn!("{undo}");
            }
            return Err(e);
        }
    }
    debug!(tun = plan.tun_name(), routes = ?plan.routes(), "host routes applied");
    Ok(applied)
}

/// Points the host resolver at the responder, journaling each change first.
pub async fn apply_dns<B: Backend>(
    b: &mut B,
    applied: &mut Applied,
    tun: &str,
    plan: &DnsPlan,
    state_dir: &Path,
) -> Result<DnsBackend, PlatformError> {
    let dns = b.dns_backend().await;
    for change in b.dns_changes(dns, tun, plan, state_dir)? {
        journaled(b, applied, &change, async |b| {
            b.make_dns(&change, tun, plan).await
        })
        .await?;
    }
    debug!(backend = dns.name(), zones = ?plan.zones, "host DNS pointed at the responder");
    Ok(dns)
}

/// Undoes `changes` in reverse order: what was removed, and the changes whose undo failed (in
/// journal order) with the failure of the first of them.
async fn undo_all<B: Backend>(
    b: &mut B,
    changes: &[Change],
) -> (Vec<Change>, Vec<Change>, Option<PlatformError>) {
    let (mut removed, mut left, mut first) = (Vec::new(), Vec::new(), None);
    for change in changes.iter().rev() {
        match b.undo(change).await {
            Ok(true) => removed.push(change.clone()),
            Ok(false) => debug!(%change, "nothing to undo"),
            Err(e) => {
                warn!(%change, "could not undo: {e}");
                left.insert(0, change.clone());
                first = Some(e);
            }
        }
    }
    (removed, left, first)
}

/// Keeps `left` in the journal and reports them, or deletes the journal when all is undone.
pub fn settle(
    journal: Journal,
    left: Vec<Change>,
    failure: Option<PlatformError>,
) -> Result<(), PlatformError> {
    let path = journal.path().to_owned();
    journal
        .keep(&left)
        .map_err(|source| PlatformError::Journal {
            path: path.clone(),
            source,
        })?;
    match (left.first(), failure) {
        (Some(first), Some(source)) => Err(PlatformError::Undo {
            count: left.len(),
            first: first.clone(),
            path,
            source: Box::new(source),
        }),
        _ => Ok(()),
    }
}

/// Undoes every change in reverse order (the link goes with the TUN the caller closes); the
/// journal is deleted, or keeps what could not be undone.
pub async fn restore<B: Backend>(b: &mut B, applied: Applied) -> Result<(), PlatformError> {
    let changes: Vec<Change> = applied
        .changes
        .into_iter()
        .filter(|c| !matches!(c, Change::Link { .. }))
        .collect();
    let (_, left, failure) = undo_all(b, &changes).await;
    settle(applied.journal, left, failure)
}

/// Undoes what dead sessions left (per their journals); returns what was actually undone.
pub async fn repair<B: Backend>(b: &mut B, state_dir: &Path) -> Result<Vec<Change>, PlatformError> {
    let mut undone = Vec::new();
    let Ok(dir) = std::fs::read_dir(state_dir) else {
        return Ok(undone);
    };
    for entry in dir.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "journal") {
            continue;
        }
        // A journal someone else wrote would make us undo what it says (delete the default
        // route, an NRPT rule): not ours to act on, nor to delete.
        if !b.journal_trusted(&path) {
            warn!(
                journal = %path.display(),
                "not repairing this journal: it was not written by an administrator's mse-vpn (planted?); delete it if you know where it came from"
            );
            continue;
        }
        let rec = journal::read(&path).map_err(|source| PlatformError::Journal {
            path: path.clone(),
            source,
        })?;
        if rec.pid.is_some_and(|p| b.pid_alive(p)) {
            continue;
        }
        let (removed, left, failure) = undo_all(b, &rec.changes).await;
        undone.extend(removed);
        let journal = Journal::open(&path).map_err(|source| PlatformError::Journal {
            path: path.clone(),
            source,
        })?;
        settle(journal, left, failure)?;
    }
    Ok(undone)
}

/// What the backends' tests share: a plan, a scratch directory, journal lines, a session
/// killed with SIGKILL.
#[cfg(test)]
pub mod testing {
    use std::path::{Path, PathBuf};

    use crate::journal::{self, Change, Journal};
    use crate::plan::{PlanSpec, RoutePlan};

    /// A plan routing `cidrs` into `tun`, whose jump host is at `jump`.
    pub fn plan(tun: &str, mtu: u32, cidrs: &[&str], jump: &[&str]) -> RoutePlan {
        RoutePlan::new(PlanSpec {
            cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            excludes: Vec::new(),
            jump_addrs: jump.iter().map(|a| a.parse().unwrap()).collect(),
            tun_name: tun.into(),
            mtu,
        })
        .unwrap()
    }

    /// An empty directory of its own for the test `name` of the backend `os`, removed with
    /// what is in it when the test is done (passed or failed).
    pub fn scratch(os: &str, name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("mse-vpn-{os}-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// A test's scratch directory ([`scratch`]): a path, removed when dropped.
    pub struct Scratch(PathBuf);

    impl std::ops::Deref for Scratch {
        type Target = Path;

        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl AsRef<Path> for Scratch {
        fn as_ref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The changes as journal lines.
    pub fn lines(changes: &[Change]) -> Vec<String> {
        changes.iter().map(ToString::to_string).collect()
    }

    /// Rewrites the journal of `tun` in `dir` under a pid that cannot run, as a session killed
    /// with SIGKILL leaves it (its own journal must be closed first); returns its changes.
    pub fn killed(dir: &Path, tun: &str) -> Vec<Change> {
        let path = journal::path_for(dir, tun);
        let recorded = journal::read(&path).unwrap();
        let mut j = Journal::create(&path, i32::MAX as u32).unwrap();
        for c in &recorded.changes {
            j.record(c).unwrap();
        }
        recorded.changes
    }
}
