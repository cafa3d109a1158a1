//! The restore journal: one text file per session, `<state_dir>/<tun>.journal`, listing every
//! host change *before* it is made, fsynced line by line, so that a crashed session's changes
//! can be undone by the next start or by `mse-vpn down --force`.
//!
//! Format (one entry per line, space-separated, versioned by the first line):
//! ```text
//! mse-vpn-journal 1
//! pid 4242
//! link mse0
//! addr 198.18.0.1/32 mse0
//! route 10.0.0.0/16 mse0
//! bypass 10.99.0.2/32 via 10.99.0.1 dev veth0
//! table-default 28123 dev mse0 inet
//! rule from 198.18.0.1 prio 5210 main-nodefault
//! rule from 198.18.0.1 prio 5211 table 28123
//! resolved-link mse0
//! resolv-conf /etc/resolv.conf backup /run/mse-vpn/mse0.resolv.conf.orig
//! not-made rule from 198.18.0.1 prio 5211 table 28123
//! resolver-file /etc/resolver/internal
//! nrpt-rule {6d73652d-7670-6e00-0000-00006d736530}
//! ```
//! (`resolver-file` is macOS's per-domain resolver file, `nrpt-rule` a Windows Name Resolution
//! Policy Table rule; the other entries are shared by every OS that has them.)
//!
//! A change is written before it is made; `not-made <change>` follows it when making it
//! failed, so that undoing never removes something this session did not create (a rule of
//! the same name left by someone else, say). A change with no such line was made, or the
//! session died while making it: undo tolerates "already gone".
//!
//! When undoing fails for some changes, the journal is rewritten with exactly those
//! ([`Journal::keep`]), so `mse-vpn down --force` (or the next start) tries them again.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

/// One change to the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The TUN link (created by the caller; configured and brought up by us).
    Link {
        /// Its name.
        name: String,
    },
    /// An address on a link.
    Addr {
        /// The address, as a host prefix.
        addr: IpNet,
        /// The link.
        dev: String,
    },
    /// A route into a link.
    Route {
        /// The destination.
        dst: IpNet,
        /// The link.
        dev: String,
    },
    /// A default route into the TUN in a table of our own (replies to cloud callers).
    TableDefault {
        /// The routing table.
        table: u32,
        /// The link.
        dev: String,
        /// IPv6 (else IPv4).
        v6: bool,
    },
    /// A policy rule for packets from the TUN's own address: replies to cloud callers
    /// (`--expose`) go back into the TUN even when the caller is outside the routed networks.
    Rule {
        /// The source address it matches (the TUN's address).
        from: IpAddr,
        /// Rule priority.
        priority: u32,
        /// `None`: the main table, ignoring its default route; `Some(t)`: table `t`.
        table: Option<u32>,
    },
    /// A host route keeping the jump host on its pre-TUN path.
    Bypass {
        /// The destination (a host prefix).
        dst: IpNet,
        /// The gateway, if the path had one.
        via: Option<IpAddr>,
        /// The output link.
        dev: String,
    },
    /// systemd-resolved was given per-link DNS settings for a link (undo: `resolvectl
    /// revert`).
    ResolvedLink {
        /// The link.
        link: String,
    },
    /// A resolver configuration file was rewritten in place; its original bytes are in
    /// `backup`.
    ResolvConf {
        /// The file (normally /etc/resolv.conf).
        file: PathBuf,
        /// The saved original.
        backup: PathBuf,
    },
    /// A resolver configuration symlink was replaced by a regular file.
    ResolvConfLink {
        /// The file (normally /etc/resolv.conf).
        file: PathBuf,
        /// Where the symlink pointed.
        target: PathBuf,
    },
    /// macOS: a per-domain resolver file (`/etc/resolver/DOMAIN`) written by mse-vpn (undo:
    /// remove it if it still carries mse-vpn's marker).
    ResolverFile {
        /// The file.
        file: PathBuf,
    },
    /// Windows: a Name Resolution Policy Table rule (a registry key under the DNS client's
    /// `DnsPolicyConfig`) sending the split zones to the responder (undo: delete the key).
    NrptRule {
        /// The rule's key name (GUID-shaped, no whitespace).
        key: String,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Link { name } => write!(f, "link {name}"),
            Change::Addr { addr, dev } => write!(f, "addr {addr} {dev}"),
            Change::Route { dst, dev } => write!(f, "route {dst} {dev}"),
            Change::TableDefault { table, dev, v6 } => {
                let fam = if *v6 { "inet6" } else { "inet" };
                write!(f, "table-default {table} dev {dev} {fam}")
            }
            Change::Rule {
                from,
                priority,
                table: None,
            } => write!(f, "rule from {from} prio {priority} main-nodefault"),
            Change::Rule {
                from,
                priority,
                table: Some(t),
            } => write!(f, "rule from {from} prio {priority} table {t}"),
            Change::Bypass {
                dst,
                via: Some(v),
                dev,
            } => write!(f, "bypass {dst} via {v} dev {dev}"),
            Change::Bypass {
                dst,
                via: None,
                dev,
            } => write!(f, "bypass {dst} dev {dev}"),
            Change::ResolvedLink { link } => write!(f, "resolved-link {link}"),
            Change::ResolvConf { file, backup } => write!(
                f,
                "resolv-conf {} backup {}",
                file.display(),
                backup.display()
            ),
            Change::ResolvConfLink { file, target } => write!(
                f,
                "resolv-conf-link {} target {}",
                file.display(),
                target.display()
            ),
            Change::ResolverFile { file } => write!(f, "resolver-file {}", file.display()),
            Change::NrptRule { key } => write!(f, "nrpt-rule {key}"),
        }
    }
}

impl Change {
    /// Parses one journal line (the inverse of `Display`).
    pub fn parse(line: &str) -> Option<Change> {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["link", name] => Some(Change::Link {
                name: (*name).to_owned(),
            }),
            ["addr", a, dev] => Some(Change::Addr {
                addr: a.parse().ok()?,
                dev: (*dev).to_owned(),
            }),
            ["route", d, dev] => Some(Change::Route {
                dst: d.parse().ok()?,
                dev: (*dev).to_owned(),
            }),
            ["bypass", d, "via", v, "dev", dev] => Some(Change::Bypass {
                dst: d.parse().ok()?,
                via: Some(v.parse().ok()?),
                dev: (*dev).to_owned(),
            }),
            ["table-default", t, "dev", dev, fam @ ("inet" | "inet6")] => {
                Some(Change::TableDefault {
                    table: t.parse().ok()?,
                    dev: (*dev).to_owned(),
                    v6: *fam == "inet6",
                })
            }
            ["rule", "from", a, "prio", p, "main-nodefault"] => Some(Change::Rule {
                from: a.parse().ok()?,
                priority: p.parse().ok()?,
                table: None,
            }),
            ["rule", "from", a, "prio", p, "table", t] => Some(Change::Rule {
                from: a.parse().ok()?,
                priority: p.parse().ok()?,
                table: Some(t.parse().ok()?),
            }),
            ["bypass", d, "dev", dev] => Some(Change::Bypass {
                dst: d.parse().ok()?,
                via: None,
                dev: (*dev).to_owned(),
            }),
            ["resolved-link", link] => Some(Change::ResolvedLink {
                link: (*link).to_owned(),
            }),
            ["resolv-conf", file, "backup", backup] => Some(Change::ResolvConf {
                file: PathBuf::from(file),
                backup: PathBuf::from(backup),
            }),
            ["resolv-conf-link", file, "target", target] => Some(Change::ResolvConfLink {
                file: PathBuf::from(file),
                target: PathBuf::from(target),
            }),
            ["resolver-file", file] => Some(Change::ResolverFile {
                file: PathBuf::from(file),
            }),
            ["nrpt-rule", key] => Some(Change::NrptRule {
                key: (*key).to_owned(),
            }),
            _ => None,
        }
    }
}

const HEADER: &str = "mse-vpn-journal 1";
/// Prefix of the line cancelling a change whose making failed.
const NOT_MADE: &str = "not-made ";

/// An open journal being written by the running session.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
}

/// A journal read back from disk.
#[derive(Debug, PartialEq, Eq)]
pub struct Recorded {
    /// The session's process id.
    pub pid: Option<i32>,
    /// The changes, in the order they were made.
    pub changes: Vec<Change>,
}

/// Creates the state directory `dir` (journals, control sockets, logs) if needed, writable by
/// the administrator only: on Unix mode 0755 (root's, as `up` runs as root); on Windows an
/// explicit ACL for SYSTEM and Administrators (read-only for Users), since C:\ProgramData
/// lets every user create files in new subdirectories (`win32.rs`, `STATE_DIR_SDDL`).
pub fn prepare_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(windows)]
    return crate::win32::secure_dir(dir);
    #[cfg(unix)]
    {
        std::fs::create_dir_all(dir)?;
        crate::account::set_mode(dir, 0o755)
    }
}

/// The journal's directory, created if needed (on Windows with the state directory's ACL).
fn ensure_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(windows)]
    return crate::win32::secure_dir(dir);
    #[cfg(unix)]
    return std::fs::create_dir_all(dir);
}

/// Windows: makes Administrators the owner of a journal file just written (journals owned by
/// anyone else are not acted on). Nothing to do on Unix.
fn claim(path: &Path) -> std::io::Result<()> {
    #[cfg(windows)]
    return crate::win32::claim_for_administrators(path);
    #[cfg(unix)]
    {
        let _ = path;
        Ok(())
    }
}

/// The journal path for a TUN name.
pub fn path_for(state_dir: &Path, tun: &str) -> PathBuf {
    state_dir.join(format!("{tun}.journal"))
}

impl Journal {
    /// Creates (truncates) the journal and records the pid.
    pub fn create(path: &Path, pid: u32) -> std::io::Result<Journal> {
        if let Some(dir) = path.parent() {
            ensure_dir(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)?;
        claim(path)?;
        let mut j = Journal {
            file,
            path: path.to_owned(),
        };
        j.append_line(HEADER)?;
        j.append_line(&format!("pid {pid}"))?;
        Ok(j)
    }

    /// Opens an existing journal (of a dead session, for [`Journal::keep`]).
    pub fn open(path: &Path) -> std::io::Result<Journal> {
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(Journal {
            file,
            path: path.to_owned(),
        })
    }

    fn append_line(&mut self, line: &str) -> std::io::Result<()> {
        writeln!(self.file, "{line}")?;
        self.file.sync_data()
    }

    /// Records a change; returns once it is on disk.
    pub fn record(&mut self, change: &Change) -> std::io::Result<()> {
        self.append_line(&change.to_string())
    }

    /// Records that making `change` (recorded just before) failed: it is not to be undone.
    pub fn record_not_made(&mut self, change: &Change) -> std::io::Result<()> {
        self.append_line(&format!("{NOT_MADE}{change}"))
    }

    /// Rewrites the journal with only `left` (changes whose undo failed), still under the
    /// session's pid, so that a later repair tries them again. With nothing left, deletes it.
    pub fn keep(self, left: &[Change]) -> std::io::Result<()> {
        if left.is_empty() {
            return self.remove();
        }
        // Closed first: Windows refuses to replace or delete a file that is still open.
        let Journal { file, path } = self;
        drop(file);
        let tmp = path.with_extension("journal.tmp");
        let mut text = format!("{HEADER}\npid {}\n", std::process::id());
        for c in left {
            text.push_str(&format!("{c}\n"));
        }
        {
            let mut f = File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_data()?;
        }
        claim(&tmp)?;
        std::fs::rename(&tmp, &path)
    }

    /// Deletes the journal (everything was undone).
    pub fn remove(self) -> std::io::Result<()> {
        let Journal { file, path } = self;
        drop(file);
        std::fs::remove_file(&path)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads a journal; unknown lines are skipped (a torn last line after a crash included).
pub fn read(path: &Path) -> std::io::Result<Recorded> {
    let f = BufReader::new(File::open(path)?);
    let mut rec = Recorded {
        pid: None,
        changes: Vec::new(),
    };
    for line in f.lines() {
        let line = line?;
        if let Some(pid) = line.strip_prefix("pid ") {
            rec.pid = pid.trim().parse().ok();
        } else if let Some(c) = line.strip_prefix(NOT_MADE).and_then(Change::parse) {
            // Cancels the latest record of that change: it was never made.
            if let Some(i) = rec.changes.iter().rposition(|r| *r == c) {
                rec.changes.remove(i);
            }
        } else if let Some(c) = Change::parse(&line) {
            rec.changes.push(c);
        }
    }
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_torn_lines_are_skipped() {
        let dir = std::env::temp_dir().join(format!("mse-vpn-journal-{}", std::process::id()));
        let path = path_for(&dir, "mvj0");
        let changes = vec![
            Change::Link {
                name: "mvj0".into(),
            },
            Change::Addr {
                addr: "198.18.0.1/32".parse().unwrap(),
                dev: "mvj0".into(),
            },
            Change::Route {
                dst: "10.0.0.0/16".parse().unwrap(),
                dev: "mvj0".into(),
            },
            Change::Route {
                dst: "fd00:1::/64".parse().unwrap(),
                dev: "mvj0".into(),
            },
            Change::Bypass {
                dst: "10.99.0.2/32".parse().unwrap(),
                via: Some("10.99.0.1".parse().unwrap()),
                dev: "veth0".into(),
            },
            Change::Bypass {
                dst: "10.99.0.3/32".parse().unwrap(),
                via: None,
                dev: "veth0".into(),
            },
            Change::TableDefault {
                table: 28123,
                dev: "mvj0".into(),
                v6: true,
            },
            Change::Rule {
                from: "198.18.0.1".parse().unwrap(),
                priority: 5210,
                table: None,
            },
            Change::Rule {
                from: "fd6d:7365:7670:6e00::1".parse().unwrap(),
                priority: 5211,
                table: Some(28123),
            },
            Change::ResolvedLink {
                link: "mvj0".into(),
            },
            Change::ResolvConf {
                file: "/etc/resolv.conf".into(),
                backup: "/run/mse-vpn/mvj0.resolv.conf.orig".into(),
            },
            Change::ResolvConfLink {
                file: "/etc/resolv.conf".into(),
                target: "../run/systemd/resolve/stub-resolv.conf".into(),
            },
            Change::ResolverFile {
                file: "/etc/resolver/internal".into(),
            },
            Change::NrptRule {
                key: "{6d73652d-7670-6e00-0000-00006d736530}".into(),
            },
        ];
        for c in &changes {
            assert_eq!(Change::parse(&c.to_string()).as_ref(), Some(c), "{c}");
        }
        let mut j = Journal::create(&path, 4242).unwrap();
        for c in &changes {
            j.record(c).unwrap();
        }
        // A crash in the middle of a write leaves a torn line.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"route 10.1.")
            .unwrap();
        let rec = read(&path).unwrap();
        assert_eq!(rec.pid, Some(4242));
        assert_eq!(rec.changes, changes);
        j.remove().unwrap();
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn rule(priority: u32) -> Change {
        Change::Rule {
            from: "198.18.0.1".parse().unwrap(),
            priority,
            table: None,
        }
    }

    #[test]
    fn a_change_that_failed_is_not_undone_and_failed_undos_are_kept() {
        let dir = std::env::temp_dir().join(format!("mse-vpn-journal-nm-{}", std::process::id()));
        let path = path_for(&dir, "mvj1");
        let mut j = Journal::create(&path, 4243).unwrap();
        j.record(&rule(5210)).unwrap();
        // `ip rule add` failed ("File exists"): someone else's rule, not ours to delete.
        j.record(&rule(5211)).unwrap();
        j.record_not_made(&rule(5211)).unwrap();
        assert_eq!(read(&path).unwrap().changes, vec![rule(5210)]);

        // Undoing 5210 failed (out of descriptors, say): the journal keeps it, and only it.
        j.keep(&[rule(5210)]).unwrap();
        let rec = read(&path).unwrap();
        assert_eq!(rec.changes, vec![rule(5210)]);
        assert_eq!(rec.pid, Some(std::process::id() as i32));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
