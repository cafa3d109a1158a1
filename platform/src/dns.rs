//! Pointing the host's resolver at mse-vpn's DNS responder, per domain, and undoing it.
//!
//! Two backends, chosen by [`detect`]:
//! - **systemd-resolved** (running, and used by this host's resolv.conf): the TUN link gets
//!   the responder as its DNS server and the split zones as routing-only domains (`~internal`),
//!   and is never the default route, so only those names reach it. Undone by
//!   `resolvectl revert LINK` (and by the link disappearing).
//! - **resolv.conf fallback**: `/etc/resolv.conf` is rewritten to name only the responder
//!   (its `search`/`options` lines are kept); the responder sends every other name to the
//!   original nameservers. The change is journaled *before* the file is touched (by the
//!   shared driver, `host.rs`), then the original bytes are saved to a backup file in the
//!   state directory; undo writes the backup back byte for byte. The file is written in place (truncate, write, fsync): inside
//!   `ip netns exec` it is a bind mount, which a rename cannot replace. A symlink (e.g. to a
//!   resolved stub file while resolved is not running) is replaced by a regular file and the
//!   symlink is put back on undo.
//!
//! Undo never clobbers someone else's edit: a resolv.conf that no longer carries our marker
//! line was rewritten by another tool after us and is left alone (with a warning).
//!
//! The pure parts (parsing, file content, resolvectl command lines, detection rules) are
//! unit-tested; the file edits are tested on temporary files. The Linux backend (`linux.rs`)
//! makes and undoes these changes; this file runs no command but `resolvectl` for
//! [`detect`] (and `doctor`).

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use crate::command;
use crate::error::PlatformError;
use crate::journal::Change;

/// The resolver configuration file.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// First line of a resolv.conf written by mse-vpn.
pub const MARKER: &str = "# mse-vpn split DNS";
/// Where systemd-resolved keeps its runtime state (present while it runs).
pub const RESOLVED_RUN_DIR: &str = "/run/systemd/resolve";

/// How the host resolver is pointed at the responder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsBackend {
    /// systemd-resolved per-link routing domains.
    Resolved,
    /// /etc/resolv.conf rewritten (fallback).
    ResolvConf,
    /// macOS: one `/etc/resolver/DOMAIN` file per split zone.
    ResolverDir,
    /// Windows: a Name Resolution Policy Table rule for the split zones.
    Nrpt,
}

impl DnsBackend {
    /// Short name for `status` and `doctor`.
    pub fn name(self) -> &'static str {
        match self {
            DnsBackend::Resolved => "resolved",
            DnsBackend::ResolvConf => "resolv.conf",
            DnsBackend::ResolverDir => "/etc/resolver",
            DnsBackend::Nrpt => "nrpt",
        }
    }
}

/// Where the DNS responder listens for `backend`, before binding (port 0: the OS picks one).
///
/// - **macOS** (`/etc/resolver`): `127.0.0.1` on a free port, named in the resolver file by
///   its `port` line. Not the utun's own address: XNU adds no loopback route for the local
///   address of a point-to-point interface (BSD `in_ifinit` installs only a host route to the
///   *destination*, which for a utun configured `inet A A` is A itself, through the utun), so
///   mDNSResponder's queries to A would go into the tunnel, not to our socket. configd reads
///   the `port` line of `/etc/resolver` files (dnsinfo_flatfile.c, `TOKEN_PORT`) and
///   mDNSResponder sends to it (mDNSMacOSX.c: `r->port != 0 ? r->port : 53`); port 5353
///   would mean multicast DNS there, which an ephemeral port never is.
/// - **Elsewhere**: the TUN's IPv4 address, port 53 (resolv.conf, systemd-resolved and NRPT
///   rules name a server by address only; Linux and Windows deliver packets to a local
///   address of any interface locally).
pub fn listen_addr_for(backend: DnsBackend, tun_v4: Ipv4Addr) -> SocketAddr {
    match backend {
        DnsBackend::ResolverDir => SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        DnsBackend::Resolved | DnsBackend::ResolvConf | DnsBackend::Nrpt => {
            SocketAddr::from((tun_v4, 53))
        }
    }
}

/// [`listen_addr_for`] this OS.
pub fn listen_addr(tun_v4: Ipv4Addr) -> SocketAddr {
    let backend = if cfg!(target_os = "macos") {
        DnsBackend::ResolverDir
    } else if cfg!(windows) {
        DnsBackend::Nrpt
    } else {
        DnsBackend::ResolvConf
    };
    listen_addr_for(backend, tun_v4)
}

/// What to point at the responder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsPlan {
    /// The responder's address and port, as bound ([`listen_addr`] decides where).
    pub server: SocketAddr,
    /// Zones to route to it, without `~` (domains, then reverse zones).
    pub zones: Vec<String>,
}

/// The `nameserver` addresses of a resolv.conf text, in order (IPv6 zone ids dropped).
pub fn nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then_some(())?;
            let a = w.next()?;
            a.split('%').next()?.parse().ok()
        })
        .collect()
}

/// True if a resolv.conf (its text, and its symlink target if it is one) sends lookups to
/// systemd-resolved's stub.
pub fn points_at_resolved(text: &str, link_target: Option<&Path>) -> bool {
    link_target.is_some_and(|t| t.to_string_lossy().contains("systemd/resolve"))
        || nameservers(text)
            .iter()
            .any(|a| *a == IpAddr::from([127, 0, 0, 53]) || *a == IpAddr::from([127, 0, 0, 54]))
}

/// The resolv.conf mse-vpn writes: the marker, the responder, and the original's `search`,
/// `domain`, `options` and `sortlist` lines unchanged.
pub fn resolv_conf_content(original: &[u8], plan: &DnsPlan, tun: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(original);
    let mut out = format!(
        "{MARKER} (session on {tun}): {} go to the VPC resolver, other names to the original nameservers.\n# `mse-vpn down` (or `mse-vpn down --force` after a crash) restores the original file.\nnameserver {}\n",
        plan.zones
            .iter()
            .filter(|z| !z.ends_with(".arpa"))
            .cloned()
            .collect::<Vec<_>>()
            .join(", "),
        plan.server.ip()
    );
    for line in text.lines() {
        let key = line.split_whitespace().next().unwrap_or("");
        if matches!(key, "search" | "domain" | "options" | "sortlist") {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.into_bytes()
}

/// The `resolvectl` command lines that set up `link` (arguments after `resolvectl`).
pub fn resolved_commands(link: &str, plan: &DnsPlan) -> Vec<Vec<String>> {
    let mut domain = vec!["domain".to_owned(), link.to_owned()];
    domain.extend(plan.zones.iter().map(|z| format!("~{z}")));
    vec![
        vec![
            "dns".to_owned(),
            link.to_owned(),
            plan.server.ip().to_string(),
        ],
        domain,
        vec![
            "default-route".to_owned(),
            link.to_owned(),
            "false".to_owned(),
        ],
    ]
}

/// Which backend this host would use: on macOS its `/etc/resolver` files, on Windows an NRPT
/// rule; on Linux resolved if it is running (its runtime directory exists and `resolvectl
/// status` answers) and resolv.conf sends lookups to it, else the resolv.conf fallback.
#[cfg(target_os = "macos")]
pub async fn detect() -> DnsBackend {
    DnsBackend::ResolverDir
}

/// See the Linux version.
#[cfg(windows)]
pub async fn detect() -> DnsBackend {
    DnsBackend::Nrpt
}

/// See the macOS version.
#[cfg(not(any(target_os = "macos", windows)))]
pub async fn detect() -> DnsBackend {
    if may_use_resolved(Path::new(RESOLV_CONF), Path::new(RESOLVED_RUN_DIR))
        && resolvectl(&["status"]).await.is_ok()
    {
        DnsBackend::Resolved
    } else {
        DnsBackend::ResolvConf
    }
}

/// The file half of Linux's detection: resolved's runtime directory `run_dir` exists and the
/// resolver configuration `file` sends lookups to resolved (then `resolvectl status` must
/// answer too).
pub fn may_use_resolved(file: &Path, run_dir: &Path) -> bool {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let target = std::fs::read_link(file).ok();
    run_dir.is_dir() && points_at_resolved(&text, target.as_deref())
}

/// Runs `resolvectl ARGS` (bounded to 5 s).
pub async fn resolvectl(args: &[&str]) -> Result<String, PlatformError> {
    command::run("resolvectl", args).await
}

/// The links systemd-resolved routes each domain to, from `resolvectl domain` output
/// (`Link 5 (wg0): ~internal corp.example`): (link name, domain without `~`).
pub fn resolved_domain_owners(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("Link ") else {
            continue;
        };
        let (Some(open), Some(close)) = (rest.find('('), rest.find("):")) else {
            continue;
        };
        if close < open {
            continue;
        }
        let link = &rest[open + 1..close];
        for d in rest[close + 2..].split_whitespace() {
            let d = d
                .trim_start_matches('~')
                .trim_end_matches('.')
                .to_ascii_lowercase();
            if !d.is_empty() {
                out.push((link.to_owned(), d));
            }
        }
    }
    out
}

/// The backup file for the resolv.conf of the session on `tun`.
pub fn backup_path(state_dir: &Path, tun: &str) -> PathBuf {
    state_dir.join(format!("{tun}.resolv.conf.orig"))
}

fn write_synced(path: &Path, bytes: &[u8], create: bool) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(create)
        .truncate(true)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
}

/// The change that points `file` (normally /etc/resolv.conf) at the responder, by what `file`
/// is now: a symlink is replaced by a regular file ([`Change::ResolvConfLink`]), a regular
/// file is rewritten in place with its original kept in `backup` ([`Change::ResolvConf`]).
/// Read-only: [`write_resolv_conf`] makes it, once it is journaled.
pub fn resolv_conf_change(file: &Path, backup: &Path) -> std::io::Result<Change> {
    let meta = std::fs::symlink_metadata(file)?;
    Ok(match meta.file_type().is_symlink() {
        true => Change::ResolvConfLink {
            file: file.to_owned(),
            target: std::fs::read_link(file)?,
        },
        false => Change::ResolvConf {
            file: file.to_owned(),
            backup: backup.to_owned(),
        },
    })
}

/// Makes a [`resolv_conf_change`] (journaled already): the original saved to the backup
/// first, then the file rewritten in place; or the symlink replaced by a regular file.
pub fn write_resolv_conf(change: &Change, plan: &DnsPlan, tun: &str) -> std::io::Result<()> {
    match change {
        Change::ResolvConfLink { file, .. } => {
            let original = std::fs::read(file).unwrap_or_default();
            // Replace the symlink itself (not what it points to) by a regular file.
            let tmp = file.with_extension("mse-vpn.tmp");
            write_synced(&tmp, &resolv_conf_content(&original, plan, tun), true)?;
            std::fs::rename(&tmp, file)?;
            sync_dir(file);
        }
        Change::ResolvConf { file, backup } => {
            let original = std::fs::read(file)?;
            if original.starts_with(MARKER.as_bytes()) {
                warn!(
                    file = %file.display(),
                    "resolv.conf already carries mse-vpn's marker but no journal claims it: treating it as the original"
                );
            }
            write_synced(backup, &original, true)?;
            sync_dir(backup);
            write_synced(file, &resolv_conf_content(&original, plan, tun), false)?;
        }
        _ => {}
    }
    Ok(())
}

/// Undoes a [`Change::ResolvConf`] or [`Change::ResolvConfLink`]; true if something was
/// restored.
pub fn undo_resolv_conf(change: &Change) -> bool {
    match change {
        Change::ResolvConf { file, backup } => {
            let Ok(original) = std::fs::read(backup) else {
                debug!(backup = %backup.display(), "no resolv.conf backup: nothing to restore");
                return false;
            };
            let current = std::fs::read(file).unwrap_or_default();
            let restored = if current == original {
                false
            } else if current.starts_with(MARKER.as_bytes()) {
                match write_synced(file, &original, false) {
                    Ok(()) => true,
                    Err(e) => {
                        warn!(file = %file.display(), "cannot restore resolv.conf: {e}; the original is kept in {}", backup.display());
                        return false;
                    }
                }
            } else {
                warn!(
                    file = %file.display(),
                    "resolv.conf was changed by another tool since mse-vpn rewrote it: leaving it as it is (the pre-mse-vpn version was {} bytes)",
                    original.len()
                );
                false
            };
            let _ = std::fs::remove_file(backup);
            restored
        }
        Change::ResolvConfLink { file, target } => {
            if std::fs::read_link(file).is_ok_and(|t| t == *target) {
                return false;
            }
            let current = std::fs::read(file).unwrap_or_default();
            if !current.starts_with(MARKER.as_bytes()) {
                warn!(file = %file.display(), "resolv.conf was changed by another tool since mse-vpn replaced it: leaving it");
                return false;
            }
            let tmp = file.with_extension("mse-vpn.tmp");
            let _ = std::fs::remove_file(&tmp);
            let ok = crate::account::symlink(target, &tmp)
                .and_then(|()| std::fs::rename(&tmp, file))
                .is_ok();
            sync_dir(file);
            ok
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> DnsPlan {
        DnsPlan {
            server: "198.18.0.1:53".parse().unwrap(),
            zones: vec![
                "internal".into(),
                "rds.example.com".into(),
                "0.10.in-addr.arpa".into(),
            ],
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mse-vpn-dns-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_responder_listens_where_each_resolver_can_reach_it() {
        let tun = Ipv4Addr::new(198, 18, 0, 1);
        // macOS: loopback and a free port (the resolver file names the port).
        assert_eq!(
            listen_addr_for(DnsBackend::ResolverDir, tun),
            "127.0.0.1:0".parse().unwrap()
        );
        // The others name a server by address only: port 53 on the TUN's address.
        for b in [
            DnsBackend::Resolved,
            DnsBackend::ResolvConf,
            DnsBackend::Nrpt,
        ] {
            assert_eq!(listen_addr_for(b, tun), "198.18.0.1:53".parse().unwrap());
        }
    }

    #[test]
    fn nameservers_are_read_in_order() {
        let t = "# c\nnameserver 10.0.0.2\nnameserver   fe80::1%eth0\nsearch a b\nnameserver bogus\n nameserver 1.1.1.1\n";
        let ns: Vec<String> = nameservers(t).iter().map(ToString::to_string).collect();
        assert_eq!(ns, ["10.0.0.2", "fe80::1", "1.1.1.1"]);
    }

    #[test]
    fn resolved_is_recognised_by_stub_address_or_link() {
        assert!(points_at_resolved("nameserver 127.0.0.53\n", None));
        assert!(points_at_resolved(
            "",
            Some(Path::new("../run/systemd/resolve/stub-resolv.conf"))
        ));
        assert!(!points_at_resolved("nameserver 10.0.0.2\n", None));
        assert!(!points_at_resolved(
            "nameserver 127.0.0.1\n",
            Some(Path::new("/run/resolvconf/resolv.conf"))
        ));
    }

    #[test]
    fn resolvectl_commands_route_only_the_zones() {
        let cmds = resolved_commands("mse0", &plan());
        assert_eq!(cmds[0], ["dns", "mse0", "198.18.0.1"]);
        assert_eq!(
            cmds[1],
            [
                "domain",
                "mse0",
                "~internal",
                "~rds.example.com",
                "~0.10.in-addr.arpa"
            ]
        );
        assert_eq!(cmds[2], ["default-route", "mse0", "false"]);
    }

    #[test]
    fn resolved_domain_owners_are_read_per_link() {
        let text =
            "Global:\nLink 2 (eth0): ~.\nLink 5 (wg0): ~internal corp.example.\nLink 7 (mse0):\n";
        assert_eq!(
            resolved_domain_owners(text),
            [
                ("wg0".to_owned(), "internal".to_owned()),
                ("wg0".to_owned(), "corp.example".to_owned())
            ]
        );
        assert!(resolved_domain_owners("garbage\nLink x): (y\n").is_empty());
    }

    #[test]
    fn new_content_keeps_search_and_options_only() {
        let orig = b"# from dhcp\nnameserver 192.168.1.1\nsearch corp.example\noptions ndots:2 edns0\nnameserver 8.8.8.8\n";
        let text = String::from_utf8(resolv_conf_content(orig, &plan(), "mse0")).unwrap();
        assert!(text.starts_with(MARKER));
        assert!(text.contains("internal, rds.example.com go to the VPC"));
        assert_eq!(nameservers(&text), [IpAddr::from([198, 18, 0, 1])]);
        assert!(text.contains("\nsearch corp.example\n"));
        assert!(text.contains("\noptions ndots:2 edns0\n"));
        assert!(!text.contains("from dhcp"));
    }

    #[test]
    fn a_regular_file_is_rewritten_in_place_and_restored_byte_for_byte() {
        let dir = tmp("file");
        let file = dir.join("resolv.conf");
        let backup = dir.join("state/t.resolv.conf.orig");
        std::fs::create_dir_all(backup.parent().unwrap()).unwrap();
        // No trailing newline, odd bytes: must come back exactly.
        let original = b"nameserver 127.0.0.1\nsearch x\n# \xff no newline".to_vec();
        std::fs::write(&file, &original).unwrap();
        #[cfg(unix)]
        let inode = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&file).unwrap().ino()
        };
        let change = resolv_conf_change(&file, &backup).unwrap();
        assert_eq!(
            change,
            Change::ResolvConf {
                file: file.clone(),
                backup: backup.clone()
            }
        );
        // Reading what to change changes nothing (the driver journals it first).
        assert_eq!(std::fs::read(&file).unwrap(), original);
        assert!(!backup.exists());
        write_resolv_conf(&change, &plan(), "t").unwrap();
        assert_eq!(std::fs::read(&backup).unwrap(), original);
        let now = std::fs::read_to_string(&file).unwrap();
        assert!(now.starts_with(MARKER));
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let now = std::fs::metadata(&file).unwrap().ino();
            assert_eq!(now, inode, "written in place");
        }
        assert!(undo_resolv_conf(&change));
        assert_eq!(std::fs::read(&file).unwrap(), original);
        assert!(!backup.exists());
        assert!(!undo_resolv_conf(&change), "a second undo finds nothing");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_changed_by_another_tool_after_us_is_left_alone() {
        let dir = tmp("other");
        let file = dir.join("resolv.conf");
        let backup = dir.join("orig");
        std::fs::write(&file, "nameserver 10.9.9.9\n").unwrap();
        let change = resolv_conf_change(&file, &backup).unwrap();
        write_resolv_conf(&change, &plan(), "t").unwrap();
        std::fs::write(&file, "nameserver 192.0.2.53\n").unwrap();
        assert!(!undo_resolv_conf(&change));
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "nameserver 192.0.2.53\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_is_replaced_and_put_back() {
        let dir = tmp("link");
        let real = dir.join("stub-resolv.conf");
        std::fs::write(&real, "nameserver 127.0.0.53\n").unwrap();
        let file = dir.join("resolv.conf");
        std::os::unix::fs::symlink("stub-resolv.conf", &file).unwrap();
        let change = resolv_conf_change(&file, &dir.join("orig")).unwrap();
        assert_eq!(
            change,
            Change::ResolvConfLink {
                file: file.clone(),
                target: "stub-resolv.conf".into()
            }
        );
        assert!(std::fs::symlink_metadata(&file).unwrap().is_symlink());
        write_resolv_conf(&change, &plan(), "t").unwrap();
        assert!(!std::fs::symlink_metadata(&file).unwrap().is_symlink());
        assert_eq!(
            std::fs::read_to_string(&real).unwrap(),
            "nameserver 127.0.0.53\n",
            "the link's target is not touched"
        );
        assert!(undo_resolv_conf(&change));
        assert_eq!(
            std::fs::read_link(&file).unwrap(),
            PathBuf::from("stub-resolv.conf")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
