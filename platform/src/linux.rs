//! Linux: addresses, routes and the TUN link through iproute2's `ip` (JSON output when
//! reading). Each change is journaled before it is made; undo tolerates "already gone".

use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use serde_json::Value;
use tracing::{debug, warn};

use crate::dns::{self, DnsBackend, DnsPlan};
use crate::host;
use crate::journal::{self, Change, Journal};
use crate::{ExistingRoute, PathInfo, PlatformError, Preflight, RoutePlan};

/// The changes one session made, with its open journal.
#[derive(Debug)]
pub struct Applied {
    journal: Journal,
    changes: Vec<Change>,
}

async fn ip(args: &[&str]) -> Result<String, PlatformError> {
    host::run("ip", args).await
}

async fn ip_json(args: &[&str]) -> Result<Vec<Value>, PlatformError> {
    let text = ip(args).await?;
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(&text).map_err(|source| PlatformError::Parse {
        cmd: format!("ip {}", args.join(" ")),
        source,
    })
}

fn family(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "-4",
        IpNet::V6(_) => "-6",
    }
}

/// Parses a route's `dst` ("default", "10.0.0.0/16", or a bare host address).
fn route_dst(v: &Value, fam: &str) -> Option<IpNet> {
    let dst = v.get("dst")?.as_str()?;
    if dst == "default" {
        return None;
    }
    dst.parse::<IpNet>().ok().or_else(|| {
        let a: IpAddr = dst.parse().ok()?;
        let _ = fam;
        Some(IpNet::from(a))
    })
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

/// The current path to `addr`, from the kernel's route lookup.
pub async fn path_to(addr: IpAddr) -> Result<PathInfo, PlatformError> {
    let a = addr.to_string();
    let routes = ip_json(&["-j", "route", "get", &a])
        .await
        .map_err(|_| PlatformError::NoPathTo { addr })?;
    let r = routes.first().ok_or(PlatformError::NoPathTo { addr })?;
    let dev = r
        .get("dev")
        .and_then(Value::as_str)
        .ok_or(PlatformError::NoPathTo { addr })?
        .to_owned();
    let via = r
        .get("gateway")
        .and_then(Value::as_str)
        .and_then(|g| g.parse().ok());
    Ok(PathInfo { via, dev })
}

/// True if `pid` is a running process. A zombie (killed, not yet reaped by its parent) is
/// dead: it holds no TUN and will never undo its changes.
/// Journals in the state directory are trusted: it is root's, mode 0755.
pub(crate) fn journal_trusted(_path: &Path) -> bool {
    true
}

pub(crate) fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    if pid as u32 == std::process::id() {
        return true;
    }
    // EPERM: it exists, and belongs to someone else (`status` run by the session's user).
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => {}
        Err(_) => return false,
    }
    // /proc/PID/stat: "pid (comm) S ..."; comm may contain spaces and parentheses.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state != "Z" && state != "X"),
        Err(_) => true,
    }
}

pub async fn preflight(plan: &RoutePlan, state_dir: &Path) -> Result<Preflight, PlatformError> {
    if let Some(e) =
        host::session_conflict(plan, host::live_sessions(state_dir, pid_alive, |_| true))
    {
        return Err(e);
    }
    // A network this host reaches directly (LAN, Docker bridge, point-to-point VPN link)
    // would be cut off by routing it into the tunnel.
    for existing in overlapping_routes(plan).await? {
        // A host route to a bypass address is the path we keep, not a conflict.
        if !existing.local
            || plan
                .bypass()
                .iter()
                .any(|b| IpNet::from(*b) == existing.dst)
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
        bypass_paths.push((*addr, path_to(*addr).await?));
    }
    Ok(Preflight { bypass_paths })
}

pub async fn overlapping_routes(plan: &RoutePlan) -> Result<Vec<ExistingRoute>, PlatformError> {
    let mut out = Vec::new();
    for fam in ["-4", "-6"] {
        let wanted: Vec<&IpNet> = plan.routes().iter().filter(|r| family(r) == fam).collect();
        if wanted.is_empty() {
            continue;
        }
        for r in ip_json(&[fam, "-j", "route", "show", "table", "main"]).await? {
            let Some(dst) = route_dst(&r, fam) else {
                continue;
            };
            let dev = r.get("dev").and_then(Value::as_str).unwrap_or("?");
            if dev == plan.tun_name() || dst.prefix_len() == 0 {
                continue;
            }
            if let Some(planned) = wanted.iter().find(|w| overlaps(w, &dst)) {
                out.push(ExistingRoute {
                    planned: **planned,
                    dst,
                    dev: dev.to_owned(),
                    via: r
                        .get("gateway")
                        .and_then(Value::as_str)
                        .and_then(|g| g.parse().ok()),
                    local: r.get("scope").and_then(Value::as_str) == Some("link")
                        || r.get("protocol").and_then(Value::as_str) == Some("kernel"),
                });
            }
        }
    }
    Ok(out)
}

pub async fn apply(plan: &RoutePlan, state_dir: &Path) -> Result<Applied, PlatformError> {
    let path = journal::path_for(state_dir, plan.tun_name());
    if let Ok(rec) = journal::read(&path)
        && let Some(pid) = rec
            .pid
            .filter(|p| pid_alive(*p) && *p as u32 != std::process::id())
    {
        return Err(PlatformError::Busy {
            tun: plan.tun_name().to_owned(),
            pid,
        });
    }
    // Paths for bypass addresses are looked up before any route of ours exists.
    let mut bypass = Vec::new();
    for addr in plan.bypass() {
        bypass.push((*addr, path_to(*addr).await?));
    }
    let jerr = |source| PlatformError::Journal {
        path: path.clone(),
        source,
    };
    let journal = Journal::create(&path, std::process::id()).map_err(jerr)?;
    let mut applied = Applied {
        journal,
        changes: Vec::new(),
    };
    match configure(plan, &bypass, &mut applied).await {
        Ok(()) => {
            debug!(tun = plan.tun_name(), routes = ?plan.routes(), "host routes applied");
            Ok(applied)
        }
        Err(e) => {
            warn!("setting up the host failed ({e}); undoing what was done");
            let _ = restore(applied).await;
            Err(e)
        }
    }
}

/// Journals `change`, makes it with `ip args`, and journals a failure as "not made" (so that
/// undo never removes what this session did not create).
async fn make(applied: &mut Applied, change: Change, args: &[&str]) -> Result<(), PlatformError> {
    record(applied, change)?;
    if let Err(e) = ip(args).await {
        if let Some(change) = applied.changes.pop() {
            // If even this fails, the change stays journaled and undo tolerates its absence.
            if applied.journal.record_not_made(&change).is_err() {
                applied.changes.push(change);
            }
        }
        return Err(e);
    }
    Ok(())
}

async fn configure(
    plan: &RoutePlan,
    bypass: &[(IpAddr, PathInfo)],
    applied: &mut Applied,
) -> Result<(), PlatformError> {
    let tun = plan.tun_name();
    let mtu = plan.mtu().to_string();
    make(
        applied,
        Change::Link {
            name: tun.to_owned(),
        },
        &["link", "set", "dev", tun, "mtu", &mtu, "up"],
    )
    .await?;
    for addr in plan.tun_addrs() {
        let a = addr.to_string();
        let mut args = vec![family(&addr), "addr", "add", &a, "dev", tun];
        if matches!(addr, IpNet::V6(_)) {
            args.push("nodad");
        }
        make(
            applied,
            Change::Addr {
                addr,
                dev: tun.to_owned(),
            },
            &args,
        )
        .await?;
    }
    for (addr, path) in bypass {
        let dst = IpNet::from(*addr);
        let d = dst.to_string();
        let existing = ip(&[family(&dst), "route", "show", "exact", &d]).await?;
        if !existing.trim().is_empty() {
            debug!(%dst, "a host route to the jump host already exists: keeping it");
            continue;
        }
        let via = path.via.map(|v| v.to_string());
        let mut args = vec![family(&dst), "route", "add", &d];
        if let Some(v) = &via {
            args.extend(["via", v.as_str()]);
        }
        args.extend(["dev", path.dev.as_str()]);
        make(
            applied,
            Change::Bypass {
                dst,
                via: path.via,
                dev: path.dev.clone(),
            },
            &args,
        )
        .await?;
    }
    let v4 = plan.tun_v4().to_string();
    let v6 = plan.tun_v6().map(|a| a.to_string());
    for dst in plan.routes() {
        let d = dst.to_string();
        let src = match dst {
            IpNet::V4(_) => Some(v4.as_str()),
            IpNet::V6(_) => v6.as_deref(),
        };
        let mut args = vec![family(dst), "route", "add", &d, "dev", tun];
        if let Some(s) = src {
            args.extend(["src", s]);
        }
        make(
            applied,
            Change::Route {
                dst: *dst,
                dev: tun.to_owned(),
            },
            &args,
        )
        .await?;
    }
    // Replies to cloud callers (`--expose`) leave from the TUN's address. Callers inside the
    // routed networks are reached through the routes above; for the others, packets from the
    // TUN's address that the main table could only send along its default route (or not at
    // all) go into the TUN instead. Nothing else on the host is sourced from that address.
    let table = plan.reply_table();
    let t = table.to_string();
    for addr in plan.tun_addrs() {
        let v6 = matches!(addr, IpNet::V6(_));
        let fam = family(&addr);
        make(
            applied,
            Change::TableDefault {
                table,
                dev: tun.to_owned(),
                v6,
            },
            &[fam, "route", "add", "default", "dev", tun, "table", &t],
        )
        .await?;
        let from = addr.addr();
        let a = from.to_string();
        let (p1, p2) = (
            REPLY_RULE_PRIORITY.to_string(),
            (REPLY_RULE_PRIORITY + 1).to_string(),
        );
        make(
            applied,
            Change::Rule {
                from,
                priority: REPLY_RULE_PRIORITY,
                table: None,
            },
            &[
                fam,
                "rule",
                "add",
                "from",
                &a,
                "priority",
                &p1,
                "lookup",
                "main",
                "suppress_prefixlength",
                "0",
            ],
        )
        .await?;
        make(
            applied,
            Change::Rule {
                from,
                priority: REPLY_RULE_PRIORITY + 1,
                table: Some(table),
            },
            &[
                fam, "rule", "add", "from", &a, "priority", &p2, "lookup", &t,
            ],
        )
        .await?;
    }
    Ok(())
}

/// Priority of the reply rules (the second one has this + 1); below the main table's 32766.
const REPLY_RULE_PRIORITY: u32 = 5210;

/// What undoing one change came to.
#[derive(Debug)]
enum Undone {
    /// It was there and is gone now.
    Removed,
    /// It was not there (any more).
    Absent,
    /// It may still be there: undoing it failed (out of descriptors, `ip` missing...).
    Failed(PlatformError),
}

/// True when a failed `ip ... del` says the thing to delete does not exist.
fn says_absent(e: &PlatformError) -> bool {
    const ABSENT: [&str; 6] = [
        "No such process",                 // route del
        "No such file or directory",       // rule del
        "Cannot assign requested address", // addr del
        "Cannot find device",              // any, once the link is gone
        "does not exist",                  // link show: Device "mse0" does not exist.
        "No such device",
    ];
    matches!(e, PlatformError::Command { stderr, .. } if ABSENT.iter().any(|a| stderr.contains(a)))
}

/// Undoes one change if it is still there.
async fn undo(change: &Change) -> Undone {
    let r = match change {
        Change::Route { dst, dev } => {
            let d = dst.to_string();
            ip(&[family(dst), "route", "del", &d, "dev", dev]).await
        }
        Change::Bypass { dst, via, dev } => {
            let d = dst.to_string();
            let v = via.map(|v| v.to_string());
            let mut args = vec![family(dst), "route", "del", &d];
            if let Some(v) = &v {
                args.extend(["via", v.as_str()]);
            }
            args.extend(["dev", dev.as_str()]);
            ip(&args).await
        }
        Change::Addr { addr, dev } => {
            let a = addr.to_string();
            ip(&[family(addr), "addr", "del", &a, "dev", dev]).await
        }
        Change::TableDefault { table, dev, v6 } => {
            let t = table.to_string();
            let fam = if *v6 { "-6" } else { "-4" };
            ip(&[fam, "route", "del", "default", "dev", dev, "table", &t]).await
        }
        Change::Rule {
            from,
            priority,
            table,
        } => {
            let fam = family(&IpNet::from(*from));
            let a = from.to_string();
            let p = priority.to_string();
            let t = table.map(|t| t.to_string());
            let mut args = vec![fam, "rule", "del", "from", &a, "priority", &p];
            match &t {
                Some(t) => args.extend(["lookup", t.as_str()]),
                None => args.extend(["lookup", "main", "suppress_prefixlength", "0"]),
            }
            ip(&args).await
        }
        // The TUN of a live session goes away when its fd closes; a dead session's TUN can
        // only remain if something else holds it: delete it only if it is a tun device.
        Change::Link { name } => match ip(&["-d", "link", "show", "dev", name]).await {
            Ok(out) if out.contains(" tun ") => ip(&["link", "del", "dev", name]).await,
            Ok(_) => return Undone::Absent,
            Err(e) => Err(e),
        },
        // resolved forgets a link's settings when the link goes; revert covers a link that
        // is still there.
        Change::ResolvedLink { link } => dns::resolvectl(&["revert", link]).await,
        Change::ResolvConf { .. } | Change::ResolvConfLink { .. } => {
            return match dns::undo_resolv_conf(change) {
                true => Undone::Removed,
                false => Undone::Absent,
            };
        }
        // Other systems' entries; never written on Linux.
        Change::ResolverFile { .. } | Change::NrptRule { .. } => return Undone::Absent,
    };
    match r {
        Ok(_) => Undone::Removed,
        Err(e) if says_absent(&e) => {
            debug!(%change, "nothing to undo: {e}");
            Undone::Absent
        }
        Err(e) => {
            warn!(%change, "could not undo: {e}");
            Undone::Failed(e)
        }
    }
}

/// Undoes `changes` in reverse order with `undo`; returns what was removed, and the changes
/// whose undo failed (in journal order) with the failure of the first of them.
async fn undo_all<F, Fut>(
    changes: &[Change],
    mut undo: F,
) -> (Vec<Change>, Vec<Change>, Option<PlatformError>)
where
    F: FnMut(Change) -> Fut,
    Fut: std::future::Future<Output = Undone>,
{
    let (mut removed, mut left, mut first) = (Vec::new(), Vec::new(), None);
    for change in changes.iter().rev() {
        match undo(change.clone()).await {
            Undone::Removed => removed.push(change.clone()),
            Undone::Absent => {}
            Undone::Failed(e) => {
                // Undone last to first: this one is first in the journal so far.
                left.insert(0, change.clone());
                first = Some(e);
            }
        }
    }
    (removed, left, first)
}

pub async fn restore(applied: Applied) -> Result<(), PlatformError> {
    // The caller closes the TUN, which removes the link.
    let changes: Vec<Change> = applied
        .changes
        .into_iter()
        .filter(|c| !matches!(c, Change::Link { .. }))
        .collect();
    let (_, left, failure) = undo_all(&changes, |c| async move { undo(&c).await }).await;
    host::settle(applied.journal, left, failure)
}

pub async fn repair(state_dir: &Path) -> Result<Vec<Change>, PlatformError> {
    let mut undone = Vec::new();
    let Ok(dir) = std::fs::read_dir(state_dir) else {
        return Ok(undone);
    };
    for entry in dir.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "journal") {
            continue;
        }
        let rec = journal::read(&path).map_err(|source| PlatformError::Journal {
            path: path.clone(),
            source,
        })?;
        if rec.pid.is_some_and(pid_alive) {
            continue;
        }
        let (removed, left, failure) =
            undo_all(&rec.changes, |c| async move { undo(&c).await }).await;
        undone.extend(removed);
        let journal = Journal::open(&path).map_err(|source| PlatformError::Journal {
            path: path.clone(),
            source,
        })?;
        host::settle(journal, left, failure)?;
    }
    Ok(undone)
}

/// Points the host resolver at the responder (see [`crate::dns`]), journaling first.
pub async fn apply_dns(
    applied: &mut Applied,
    tun: &str,
    plan: &DnsPlan,
    state_dir: &Path,
) -> Result<DnsBackend, PlatformError> {
    let backend = dns::detect().await;
    match backend {
        DnsBackend::Resolved => {
            record(
                applied,
                Change::ResolvedLink {
                    link: tun.to_owned(),
                },
            )?;
            for args in dns::resolved_commands(tun, plan) {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                dns::resolvectl(&args).await?;
            }
        }
        // (`detect` answers the other systems' backends only on those systems.)
        DnsBackend::ResolvConf | DnsBackend::ResolverDir | DnsBackend::Nrpt => {
            let file = Path::new(dns::RESOLV_CONF);
            let backup = dns::backup_path(state_dir, tun);
            if backup.to_string_lossy().contains(char::is_whitespace) {
                return Err(PlatformError::UnsafePath { path: backup });
            }
            let mut recorded = None;
            let result = dns::rewrite_resolv_conf(file, &backup, plan, tun, |c| {
                applied.journal.record(c)?;
                recorded = Some(c.clone());
                Ok(())
            });
            // Whatever was journaled is undone on restore, even if the write failed after.
            if let Some(c) = recorded {
                applied.changes.push(c);
            }
            result.map_err(|source| PlatformError::Dns {
                path: file.to_owned(),
                source,
            })?;
        }
    }
    debug!(backend = backend.name(), zones = ?plan.zones, "host DNS pointed at the responder");
    Ok(backend)
}

fn record(applied: &mut Applied, change: Change) -> Result<(), PlatformError> {
    applied
        .journal
        .record(&change)
        .map_err(|source| PlatformError::Journal {
            path: applied.journal.path().to_owned(),
            source,
        })?;
    applied.changes.push(change);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(n: u8) -> Change {
        Change::Route {
            dst: format!("10.{n}.0.0/16").parse().unwrap(),
            dev: "mvt0".into(),
        }
    }

    #[tokio::test]
    async fn restore_keeps_what_it_failed_to_undo_and_says_so() {
        let dir = std::env::temp_dir().join(format!("mse-vpn-restore-{}", std::process::id()));
        let path = journal::path_for(&dir, "mvt0");
        let mut journal = Journal::create(&path, std::process::id()).unwrap();
        let changes = vec![route(1), route(2), route(3)];
        for c in &changes {
            journal.record(c).unwrap();
        }
        // Undoing routes 2 and 4 fails; 1 is gone already; 3 is removed.
        journal.record(&route(4)).unwrap();
        let changes = [changes, vec![route(4)]].concat();
        let (removed, left, failure) = undo_all(&changes, |c| async move {
            match c {
                c if c == route(2) || c == route(4) => Undone::Failed(PlatformError::Command {
                    cmd: format!("ip route del {}", c.to_string().split(' ').nth(1).unwrap()),
                    stderr: "Too many open files".into(),
                }),
                c if c == route(1) => Undone::Absent,
                _ => Undone::Removed,
            }
        })
        .await;
        assert_eq!(removed, vec![route(3)]);
        let err = host::settle(journal, left, failure).expect_err("a failed undo is reported");
        // The change named and the failure quoted are the same one.
        let PlatformError::Undo {
            count,
            first,
            source,
            ..
        } = &err
        else {
            panic!("{err:?}");
        };
        assert_eq!((*count, first), (2, &route(2)), "{err}");
        assert!(source.to_string().contains("10.2.0.0/16"), "{err}");
        assert_eq!(
            journal::read(&path).unwrap().changes,
            vec![route(2), route(4)]
        );
        // All undone: the journal goes.
        let journal = Journal::open(&path).unwrap();
        host::settle(journal, Vec::new(), None).unwrap();
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_a_missing_object_counts_as_already_undone() {
        let failed = |stderr: &str| PlatformError::Command {
            cmd: "ip".into(),
            stderr: stderr.into(),
        };
        assert!(says_absent(&failed("RTNETLINK answers: No such process")));
        assert!(says_absent(&failed(
            "RTNETLINK answers: No such file or directory"
        )));
        assert!(says_absent(&failed("Device \"mvt0\" does not exist.")));
        assert!(!says_absent(&failed(
            "RTNETLINK answers: Operation not permitted"
        )));
        let spawn = PlatformError::Spawn {
            cmd: "ip".into(),
            source: std::io::Error::from_raw_os_error(24),
        };
        assert!(!says_absent(&spawn), "EMFILE is not 'already gone'");
    }
}
