//! End-to-end tests of what a user reads and what scripts see: completions run in real
//! shells (bash `compgen` machinery, zsh through a pseudo-terminal, fish `complete -C`), the
//! man page rendered by groff, every row of the README's exit-status table produced by a real
//! invocation (each failure one line), a non-root `up` that touches nothing, a quiet `up`
//! and a useful `-v`, an outage that costs two lines, and `status`/`down` after a session
//! with split DNS was killed with SIGKILL.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::harness::{TestUser, Testbed, Vpn, bin, curl_within, keygen, pub_path, root, s};
use crate::harness::{stderr, stdout, strs};
use crate::lifecycle::status;

/// The CIDR the tests route.
const VPC: &str = "10.0.0.0/16";

/// `mse-vpn ARGS` outside any namespace (for what needs no network).
fn local(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("MSE_VPN_STATE_DIR", "/nonexistent/mse-vpn-cli-tests")
        .output()
        .expect("run mse-vpn")
}

/// Writes the completion script for `shell` to `dir` (as `file`); its path.
fn script(shell: &str, dir: &Path, file: &str) -> String {
    let out = local(&["completions", shell]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(file);
    std::fs::write(&path, &out.stdout).unwrap();
    s(&path)
}

/// Fails with what to install when `shell` is missing (scripts/setup installs it).
fn need(shell: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {shell}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(found, "{shell} is not installed: run `bash scripts/setup`");
}

#[test]
fn completions_complete_options_of_subcommands_in_bash_zsh_and_fish() {
    let dir = std::env::temp_dir().join(format!("mse-vpn-compl-{}", std::process::id()));
    // bash: what pressing TAB runs, with the words bash would pass.
    need("bash");
    let bash = script("bash", &dir, "mse-vpn.bash");
    let complete = |words: &[&str]| {
        let cword = words.len() - 1;
        let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
        let snippet = format!(
            "source '{bash}'; COMP_WORDS=({}); COMP_CWORD={cword}; \
             _mse__vpn mse-vpn '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            quoted.join(" "),
            words[cword],
            words[cword - 1]
        );
        let out = Command::new("bash")
            .args(["--norc", "-c", &snippet])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    assert_eq!(complete(&["mse-vpn", "up", "--pr"]), "--proxy\n");
    assert_eq!(complete(&["mse-vpn", "up", "--dns-d"]), "--dns-domain\n");
    assert_eq!(complete(&["mse-vpn", "status", "--j"]), "--json\n");
    assert_eq!(
        complete(&["mse-vpn", "config", "check", "--he"]),
        "--help\n"
    );
    assert_eq!(complete(&["mse-vpn", "do"]), "down\ndoctor\n");
    let shells = complete(&["mse-vpn", "completions", ""]);
    assert!(
        shells.contains("fish") && shells.contains("zsh"),
        "{shells}"
    );

    // fish: `complete -C` prints what TAB would offer.
    need("fish");
    let fish = script("fish", &dir, "mse-vpn.fish");
    let out = Command::new("fish")
        .args([
            "--no-config",
            "-c",
            &format!("source '{fish}'; complete -C 'mse-vpn up --pr'; complete -C 'mse-vpn unex'"),
        ])
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(text.starts_with("--proxy\t"), "{text}{}", stderr(&out));
    assert!(text.contains("\nunexpose\t"), "{text}");

    // zsh: an interactive shell on a pseudo-terminal, compinit with the script in $fpath,
    // and a real TAB.
    need("zsh");
    script("zsh", &dir, "_mse-vpn");
    let driver = format!(
        r#"zmodload zsh/zpty
zpty z zsh -f -i
zpty -w z 'PS1="%% "; fpath=({dir} $fpath); autoload -Uz compinit; compinit -u -D'
zpty -w -n z $'mse-vpn up --pr\t'
sleep 1
out=""
while zpty -r -t z chunk; do out+=$chunk; done
print -r -- "$out"
zpty -d z
"#,
        dir = s(&dir)
    );
    let out = Command::new("timeout")
        .args(["20", "zsh", "-f", "-c", &driver])
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(
        text.contains("mse-vpn up --proxy"),
        "zsh did not complete --pr to --proxy: {text:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_man_page_describes_every_command_and_the_options_of_up() {
    let out = local(&["man"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = std::env::temp_dir().join(format!("mse-vpn-man-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let page = dir.join("mse-vpn.1");
    std::fs::write(&page, &out.stdout).unwrap();
    // groff with all warnings: the page is valid roff.
    let rendered = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-P", "-cbou"])
        .arg(&page)
        .output()
        .expect("groff");
    assert!(
        rendered.status.success() && rendered.stderr.is_empty(),
        "groff: {}",
        stderr(&rendered)
    );
    let text = stdout(&rendered);
    for needle in [
        "mse-vpn up",
        "--proxy",
        "--connect-timeout",
        "--dns-domain",
        "--daemon",
        "mse-vpn doctor",
        "mse-vpn config check",
        "mse-vpn man",
        "EXIT STATUS",
        "MSE_VPN_STATE_DIR",
    ] {
        assert!(text.contains(needle), "the man page lacks {needle}");
    }
    assert!(!text.contains("mse-vpn-up(1)"), "points to a missing page");
    let help = stdout(&local(&["--help"]));
    assert!(help.contains("  man "), "`man` is listed in --help: {help}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The README's exit-status table: status → meaning.
fn readme_exit_statuses() -> BTreeMap<i32, String> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let table = readme
        .split("### Exit status")
        .nth(1)
        .expect("an Exit status section");
    table
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| {
            let mut cells = l.trim_matches('|').split('|');
            let code = cells.next()?.trim().parse().ok()?;
            Some((code, cells.next()?.trim().to_owned()))
        })
        .collect()
}

/// One row of the exit-status test: a real invocation and what it must produce.
struct Case {
    /// What is being done.
    what: &'static str,
    /// The command.
    cmd: Command,
    /// The exit status.
    code: i32,
    /// A piece of its message on stderr ("" for success).
    says: &'static str,
}

impl Case {
    /// Usage mistakes found by clap keep clap's own format (the error, a tip, the usage).
    fn clap_error(&self) -> bool {
        matches!(
            self.what,
            "an unknown flag" | "a CIDR without its prefix length"
        )
    }
}

#[test]
fn every_exit_status_of_the_readme_is_produced_by_a_real_invocation() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("cl1", &[]);
    let before = tb.snapshot();
    let table = readme_exit_statuses();
    assert_eq!(
        table.keys().copied().collect::<Vec<_>>(),
        [0, 1, 2, 3, 4, 5],
        "{table:?}"
    );
    let user = TestUser::create("mvcli1", None);
    let up = |extra: &[&str], cidr: &str| tb.mse_vpn(&strs(&quiet(tb.up_args(&[cidr], extra))));
    // An ssh config alias, to mistype.
    let config = tb.dir.join("ssh_config_cli");
    std::fs::write(
        &config,
        format!("Host uxjump\n  HostName {}\n  User root\n", tb.jump_addr),
    )
    .unwrap();
    let alias_typo = {
        let mut a = quiet(tb.up_args(&[VPC], &["-F", &s(&config)]));
        let p = a.iter().position(|x| x == "--proxy").unwrap();
        a[p + 1] = "uxjmp".into();
        tb.mse_vpn(&strs(&a))
    };
    let proxy = |to: String| {
        let mut a = quiet(tb.up_args(&[VPC], &["--connect-timeout", "3"]));
        let p = a.iter().position(|x| x == "--proxy").unwrap();
        a[p + 1] = to;
        tb.mse_vpn(&strs(&a))
    };
    let other_key = tb.dir.join("unauthorized");
    keygen(&other_key, "", &["-t", "ed25519"]);
    let empty_kh = tb.dir.join("known_hosts_empty");
    std::fs::write(&empty_kh, "").unwrap();
    let mut as_user = tb.mse_vpn_with_env(
        &[],
        &[
            "setpriv",
            &format!("--reuid={}", user.uid),
            &format!("--regid={}", user.gid),
            "--clear-groups",
        ],
        &strs(&quiet(tb.up_args(&[VPC], &[]))),
    );
    as_user.env("HOME", &user.home);
    let cases = vec![
        Case {
            what: "a valid profile file",
            cmd: tb.mse_vpn(&["config", "check", &s(&root().join("examples/config.toml"))]),
            code: 0,
            says: "",
        },
        Case {
            what: "up without root",
            cmd: as_user,
            code: 1,
            says: "mse-vpn: must be run as root (use sudo)",
        },
        Case {
            what: "a doctor check that fails",
            cmd: {
                let mut a = quiet(tb.up_args(&["172.16.0.0/12"], &[]));
                a[0] = "doctor".into();
                tb.mse_vpn(&strs(&a))
            },
            code: 1,
            says: "check(s) failed",
        },
        Case {
            what: "an unknown flag",
            cmd: tb.mse_vpn(&["up", "--cidr", VPC, "--prxy", "h"]),
            code: 2,
            says: "unexpected argument '--prxy'",
        },
        Case {
            what: "host bits set",
            cmd: up(&[], "10.0.0.1/16"),
            code: 2,
            says: "did you mean 10.0.0.0/16",
        },
        Case {
            what: "the whole internet",
            cmd: up(&[], "0.0.0.0/0"),
            code: 2,
            says: "covers the whole internet",
        },
        Case {
            what: "a CIDR without its prefix length",
            cmd: up(&[], "10.0.0.0"),
            code: 2,
            says: "'10.0.0.0' has no prefix length",
        },
        Case {
            what: "a config file that does not exist",
            cmd: tb.mse_vpn(&["config", "check", "/nonexistent/missing.toml"]),
            code: 2,
            says: "cannot read /nonexistent/missing.toml: No such file or directory",
        },
        Case {
            what: "no jump host",
            cmd: tb.mse_vpn(&["up", "--cidr", VPC]),
            code: 2,
            says: "no jump host: pass --proxy",
        },
        Case {
            what: "a missing -i file",
            cmd: up(&["-i", "/nonexistent/key"], VPC),
            code: 3,
            says: "key file /nonexistent/key does not exist",
        },
        Case {
            what: "a public key given with -i",
            cmd: up(&["-i", &s(&pub_path(&other_key))], VPC),
            code: 3,
            says: "is a public key: pass the private key",
        },
        Case {
            what: "a key the jump host does not accept",
            cmd: {
                let mut a = quiet(tb.up_args(&[VPC], &[]));
                let i = a.iter().position(|x| x == "-i").unwrap();
                a[i + 1] = s(&other_key);
                tb.mse_vpn(&strs(&a))
            },
            code: 3,
            says: "authentication as root on",
        },
        Case {
            what: "an unknown host key",
            cmd: {
                let mut a = quiet(tb.up_args(&[VPC], &[]));
                let i = a.iter().position(|x| x == "--known-hosts").unwrap();
                a[i + 1] = s(&empty_kh);
                tb.mse_vpn(&strs(&a))
            },
            code: 4,
            says: "is not known",
        },
        Case {
            what: "a mistyped ssh config alias",
            cmd: alias_typo,
            code: 5,
            says: "Did you mean `uxjump`, a Host of your ssh config?",
        },
        Case {
            what: "a jump host that does not resolve",
            cmd: proxy("root@no-such-host.invalid".into()),
            code: 5,
            says: "could not resolve the jump host no-such-host.invalid",
        },
        Case {
            what: "nothing listens on the port",
            cmd: proxy(format!("root@{}:2", tb.jump_addr)),
            code: 5,
            says: "cannot reach the jump host at",
        },
    ];
    let mut seen = BTreeMap::new();
    let mark = tb.sshd_log().len();
    for mut case in cases {
        let started = Instant::now();
        let out = case.cmd.env("NO_COLOR", "1").output().expect("run mse-vpn");
        let err = stderr(&out);
        assert_eq!(
            out.status.code(),
            Some(case.code),
            "{}: wrong exit status; stderr:\n{err}",
            case.what
        );
        assert!(err.contains(case.says), "{}: {err}", case.what);
        // A failure is one line (progress lines aside), with no repeated cause and no OS
        // error numbers.
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| !l.starts_with("mse-vpn: connecting to"))
            .collect();
        if case.code != 0 && !case.clap_error() {
            assert_eq!(lines.len(), 1, "{}: not one line:\n{err}", case.what);
            assert!(!err.contains("os error"), "{}: {err}", case.what);
            if let Some((_, tail)) = lines[0].rsplit_once(": ") {
                assert_eq!(
                    lines[0].matches(tail).count(),
                    1,
                    "{}: a repeated cause: {err}",
                    case.what
                );
            }
        }
        eprintln!(
            "{}: exit {} in {:?}",
            case.what,
            case.code,
            started.elapsed()
        );
        seen.entry(case.code).or_insert(case.what);
        if case.what == "up without root" {
            // Refused before anything: no login attempt reached sshd, no state dir made.
            assert!(started.elapsed() < Duration::from_secs(2));
            assert_eq!(
                tb.sshd_log().len(),
                mark,
                "a non-root up contacted the jump host"
            );
            assert!(
                !tb.state_dir().exists(),
                "a non-root up created the state dir"
            );
        }
    }
    for code in table.keys() {
        assert!(
            seen.contains_key(code),
            "no invocation produces status {code}"
        );
    }

    // A port that drops packets silently: a "connecting to" line while waiting, then the
    // one-line timeout, exit status 5.
    let rule = format!(
        "nft add table inet mvcli && nft add chain inet mvcli out '{{ type filter hook output priority 0; }}' && \
         nft add rule inet mvcli out ip daddr {} tcp dport 22 drop",
        tb.jump_addr
    );
    let out = tb.sh(10, &rule);
    assert!(out.status.success(), "nft: {}", stderr(&out));
    let out = proxy(format!("root@{}", tb.jump_addr)).output().unwrap();
    let _ = tb.sh(10, "nft delete table inet mvcli");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(5), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines[0].starts_with(&format!(
            "mse-vpn: connecting to root@{}:22 (waiting up to 3 s)",
            tb.jump_addr
        )),
        "{err}"
    );
    assert!(lines[1].contains("did not answer within 3 s"), "{err}");
    assert_eq!(
        tb.snapshot(),
        before,
        "no failed invocation changed the host"
    );
}

/// `args` without `-v` (the harness adds it): the output a user sees by default.
fn quiet(args: Vec<String>) -> Vec<String> {
    args.into_iter().filter(|a| a != "-v").collect()
}

#[test]
fn a_quiet_up_prints_one_line_and_v_shows_each_step() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("cl2", &[]);
    // A common ~/.ssh/config: connection sharing for every host. It changes nothing for
    // mse-vpn, so it is not warned about.
    let config = tb.dir.join("ssh_config_cm");
    std::fs::write(
        &config,
        "Host *\n  ControlMaster auto\n  ControlPath ~/.ssh/cm-%r@%h:%p\n  ControlPersist 10m\n",
    )
    .unwrap();
    let args = quiet(tb.up_args(&[VPC], &["-F", &s(&config)]));
    let vpn = tb.start_cmd(tb.mse_vpn(&strs(&args)));
    assert!(curl_within(&tb, Duration::from_secs(5)));
    let out = vpn.stdout();
    assert_eq!(
        out,
        format!(
            "mse-vpn is up: {VPC} via root@{}:22 (tun {})\n",
            tb.jump_addr,
            tb.tun()
        )
    );
    assert_eq!(vpn.stderr(), "", "nothing on stderr while all is well");
    let mut vpn = vpn;
    vpn.signal(nix::sys::signal::Signal::SIGINT);
    assert!(vpn.wait_exit(Duration::from_secs(15)).success());
    assert_eq!(
        vpn.stderr(),
        "mse-vpn: stopped; the host's routes and DNS are as they were\n"
    );

    // -v: each connection, the ssh config's ignored directives, each flow.
    let mut args = args;
    args.push("-v".into());
    let vpn = tb.start_cmd(tb.mse_vpn(&strs(&args)));
    assert!(curl_within(&tb, Duration::from_secs(5)));
    // The flow's line comes when it has closed (just after curl exits).
    let start = std::time::Instant::now();
    while !vpn.stderr().contains("closed (finished)") && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = vpn.stderr();
    for needle in [
        "ControlMaster does not apply to mse-vpn: ignored",
        "authenticated",
        "connected to the jump host",
        "host routes applied",
        "flow{id=",
        "closed (finished) after ",
        " up, ",
    ] {
        assert!(log.contains(needle), "-v lacks {needle:?}:\n{log}");
    }
    assert!(
        !log.contains("Some("),
        "Rust debug output in the log:\n{log}"
    );
    assert!(vpn.interrupt().success());
}

#[test]
fn an_outage_costs_two_lines_and_status_shows_the_reconnect() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("cl3", &[]);
    let args = quiet(tb.up_args(&[VPC], &["--keepalive", "2"]));
    let vpn = tb.start_cmd(tb.mse_vpn(&strs(&args)));
    assert!(curl_within(&tb, Duration::from_secs(5)));
    assert_eq!(vpn.stderr(), "");
    tb.control("sshd-kill");
    let lost = Instant::now();
    while status(&tb)["state"] != "reconnecting" {
        assert!(
            lost.elapsed() < Duration::from_secs(5),
            "the loss went unnoticed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // 18 s without the jump host (the reconnect loop retries about once a second).
    while lost.elapsed() < Duration::from_secs(18) {
        let st = status(&tb);
        assert_ne!(st["state"], "connected", "{st:#}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let st = status(&tb);
    assert_eq!(st["state"], "reconnecting", "{st:#}");
    let table = stdout(&tb.mse_vpn(&["status"]).output().unwrap());
    assert!(
        table.contains("state       RECONNECTING (0/4 connections up)")
            && table.contains("last event  lost the jump host, reconnecting: cannot reach"),
        "{table}"
    );
    tb.control("sshd-start");
    let start = Instant::now();
    loop {
        let st = status(&tb);
        if st["connections_up"] == st["connections"] {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{st:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(curl_within(&tb, Duration::from_secs(5)));
    let log = vpn.stderr();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "an 18 s outage in more than two lines:\n{log}"
    );
    assert_eq!(
        lines[0],
        format!(
            "mse-vpn: warning: lost the connection to the jump host root@{}:22: flows in progress were reset; reconnecting",
            tb.jump_addr
        )
    );
    let after: f64 = lines[1]
        .strip_prefix(&format!(
            "mse-vpn: reconnected to the jump host root@{}:22 after ",
            tb.jump_addr
        ))
        .and_then(|r| r.strip_suffix(" s"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{log}"));
    assert!((18.0..25.0).contains(&after), "{log}");
    // status: connected, and the latest event is the reconnect, not the old failure.
    let st = status(&tb);
    assert_eq!(
        (st["state"].as_str(), st["reconnects"].as_u64()),
        (Some("connected"), Some(1))
    );
    let table = stdout(&tb.mse_vpn(&["status"]).output().unwrap());
    // The same outage as the log line's (18-25 s: where the retry schedule lands after it).
    let event: Option<u32> = table
        .lines()
        .find_map(|l| l.strip_prefix("last event  reconnected after "))
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok());
    assert!(
        table.contains("state       connected (4/4 connections up)")
            && event.is_some_and(|s| (18..25).contains(&s)),
        "{table}"
    );
    assert!(!table.contains("cannot reach"), "{table}");
    assert!(vpn.interrupt().success());
}

#[test]
fn after_kill_9_with_split_dns_status_reports_the_leftovers_and_down_undoes_them() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("cl4", &["--with", "nginx,dns"]);
    let conf = std::path::PathBuf::from(format!("/etc/netns/{}/resolv.conf", tb.lap()));
    let original = std::fs::read(&conf).unwrap();
    let mut vpn: Vpn = tb.start(&[VPC], &["--dns", "10.0.0.13", "--dns-domain", "internal"]);
    assert!(
        vpn.stdout()
            .contains("split DNS (resolv.conf): internal → 10.0.0.13 through the tunnel"),
        "{}",
        vpn.stdout()
    );
    // Gone for good (reaped: a zombie would keep /proc/PID).
    vpn.kill9();
    assert_ne!(
        std::fs::read(&conf).unwrap(),
        original,
        "DNS is left pointing at the dead session"
    );

    // status says so, and fails.
    let out = tb.mse_vpn(&["status"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert_eq!(stdout(&out), "", "no session is shown as running");
    assert!(
        stderr(&out).contains(&format!(
            "the session on {} (pid {}) is no longer running but left routes and DNS settings behind: undo it with `sudo mse-vpn down`",
            tb.tun(),
            vpn.pid()
        )),
        "{}",
        stderr(&out)
    );
    // down (no --force) undoes it.
    let out = tb.mse_vpn(&["down"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("undone: resolv-conf"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        std::fs::read(&conf).unwrap(),
        original,
        "byte-identical again"
    );
    let out = tb.mse_vpn(&["status"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "no mse-vpn session is running\n");
    let out = tb.mse_vpn(&["down"]).output().unwrap();
    assert_eq!(
        stdout(&out),
        "no mse-vpn session is running; nothing left behind to undo\n"
    );
}
