//! The `mse-vpn` command: parses the command line, checks every input before touching the
//! host, connects to the jump host, then sets up the TUN and routes and runs the driver until
//! Ctrl-C / SIGTERM, reconnecting when the SSH connection drops.

#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokio::sync::watch;
use tracing::{info, warn};

use mse_vpn::cli::{Cli, Command, DownArgs, StatusArgs, UpArgs};
use mse_vpn::control::{self, Board, LinkState};
use mse_vpn::dns;
use mse_vpn::driver::{Driver, DriverConfig};
use mse_vpn::engine::EngineConfig;
use mse_vpn::pool::{self, Pool};
use mse_vpn::ssh;
use mse_vpn::tun::Tun;
use mse_vpn_platform as platform;

/// Set in the environment of the detached child of `up --daemon`.
const DAEMON_CHILD: &str = "MSE_VPN_DAEMON_CHILD";

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Up(args) = &cli.command
        && args.daemon
    {
        if std::env::var_os(DAEMON_CHILD).is_none() {
            return daemonize(args, &cli.state_dir);
        }
        // The child: a session of its own, so the terminal's hangup and Ctrl-C do not reach
        // it.
        let _ = nix::unistd::setsid();
    }
    init_logging(cli.verbose);
    // Flow buffers (512 KiB each) straight from mmap: idle flows then cost only the pages
    // they touch. Below the threshold stay the hot path's 64 KiB chunks, which must not pay
    // an mmap/munmap each.
    platform::memory::pin_mmap_threshold(256 * 1024);
    // Worker threads: one per core by default (each SSH connection's crypto runs on one);
    // MSE_VPN_WORKER_THREADS overrides it, for benchmarking.
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = std::env::var("MSE_VPN_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
    {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mse-vpn: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up(args) => up(args, &cli.state_dir).await,
            Command::Down(args) => down(args, &cli.state_dir).await,
            Command::Doctor(args) => doctor(args, &cli.state_dir).await,
            Command::Status(args) => status(args, &cli.state_dir).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mse-vpn: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `up --daemon`: starts the same command detached, with its output in the log file, and
/// waits until it reports the tunnel up (exit 0) or fails (its exit status, and the log).
fn daemonize(args: &UpArgs, state_dir: &Path) -> ExitCode {
    use std::io::{Read, Seek, SeekFrom};
    let log_path = args
        .log_file
        .clone()
        .unwrap_or_else(|| state_dir.join(format!("{}.log", args.tun)));
    let fail = |msg: String| {
        eprintln!("mse-vpn: {msg}");
        ExitCode::FAILURE
    };
    if let Some(dir) = log_path.parent()
        && let Err(e) = std::fs::create_dir_all(dir)
    {
        return fail(format!("cannot create {}: {e}", dir.display()));
    }
    let log = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
    {
        Ok(f) => f,
        Err(e) => {
            return fail(format!(
                "cannot open the log file {}: {e}",
                log_path.display()
            ));
        }
    };
    let start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let (out, err) = match (log.try_clone(), log.try_clone()) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return fail("cannot duplicate the log file handle".into()),
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fail(format!("cannot find my own executable: {e}")),
    };
    let mut child = match std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(DAEMON_CHILD, "1")
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start the daemon: {e}")),
    };
    let read_log = || {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&log_path)
            && f.seek(SeekFrom::Start(start)).is_ok()
        {
            let _ = f.read_to_string(&mut text);
        }
        text
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(args.connect_timeout * 2 + 30);
    loop {
        let text = read_log();
        if let Some(line) = text.lines().find(|l| l.starts_with("mse-vpn is up")) {
            println!(
                "{line}\nrunning in the background as pid {}; log: {}; stop it with `mse-vpn down`",
                child.id(),
                log_path.display()
            );
            return ExitCode::SUCCESS;
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                eprint!("{text}");
                return fail(format!(
                    "the session did not come up ({status}); log: {}",
                    log_path.display()
                ));
            }
            Ok(None) if std::time::Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                eprint!("{text}");
                return fail("the session did not come up in time; stopped it".into());
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return fail(format!("cannot wait for the daemon: {e}")),
        }
    }
}

async fn doctor(args: UpArgs, state_dir: &Path) -> Result<()> {
    println!(
        "mse-vpn doctor: checking `up` to {} via {} (read-only)",
        args.cidrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        args.proxy
    );
    let checks = mse_vpn::doctor::run(&args, state_dir).await;
    for c in &checks {
        println!("  {c}");
    }
    let failed = checks
        .iter()
        .filter(|c| c.verdict == mse_vpn::doctor::Verdict::Fail)
        .count();
    if failed > 0 {
        bail!("{failed} check(s) failed");
    }
    println!("all checks passed");
    Ok(())
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "mse_vpn=info,mse_vpn_platform=info",
        1 => "mse_vpn=debug,mse_vpn_platform=debug",
        _ => "mse_vpn=trace,mse_vpn_platform=trace,russh=debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

async fn up(args: UpArgs, state_dir: &Path) -> Result<()> {
    // 1. Everything the user typed, checked before the host is touched.
    let user = ssh::InvokingUser::detect().context("cannot tell which user invoked mse-vpn")?;
    for key in &args.identity {
        if !key.is_file() {
            bail!(
                "key file {} does not exist: pass an existing private key with -i, or omit -i to use the agent and ~/.ssh/id_*",
                key.display()
            );
        }
    }
    let opts = args.ssh_options(&user);
    let jump_addrs = resolve(&args.proxy).await?;
    let plan = platform::RoutePlan::new(platform::PlanSpec {
        cidrs: args.cidrs.clone(),
        excludes: args.excludes.clone(),
        jump_addrs: jump_addrs.clone(),
        tun_name: args.tun.clone(),
        mtu: args.mtu,
    })?;
    let repaired = platform::repair(state_dir).await?;
    for change in &repaired {
        warn!("repaired what a crashed session left: {change}");
    }
    platform::preflight(&plan, state_dir).await?;

    // 2. The SSH connections, before any change to the host: a bad host key or a failed
    //    login leaves nothing behind.
    let sessions = pool::connect_initial(&opts, args.connections as usize).await?;
    info!(
        jump = %args.proxy,
        connections = sessions.iter().flatten().count(),
        "connected to the jump host"
    );
    let dns_servers = dns::session::resolvers(&args, &sessions).await?;

    // 3. Host changes, journaled by the platform crate.
    let (stop_tx, stop) = watch::channel(false);
    spawn_signal_handler(stop_tx.clone())?;
    std::fs::create_dir_all(state_dir)
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o755))
        })
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    let board = Board::new(
        format!("{}@{}:{}", opts.user, args.proxy.host, args.proxy.port),
        plan.tun_name().to_owned(),
        plan.routes().iter().map(ToString::to_string).collect(),
    );
    let server = control::Server::bind(
        &control::socket_path(state_dir, plan.tun_name()),
        user.uid(),
        user.gid(),
    )?;
    tokio::spawn(server.serve(board.clone(), stop_tx.clone()));
    let tun = Arc::new(Tun::create(plan.tun_name(), args.mtu as u16)?);
    let mut host = platform::Host::apply(&plan, state_dir).await?;
    let pool = Pool::new(sessions.len());
    // Split DNS: the responder, then the host resolver pointed at it (journaled).
    if !args.dns_domains.is_empty() {
        let dns = dns::session::start(&args, &plan, &pool, &mut host, state_dir, &dns_servers);
        match dns.await {
            Ok((responder, shown)) => {
                board.set_dns(shown, responder.counters());
                tokio::spawn(responder.run(stop.clone()));
            }
            Err(e) => {
                let _ = host.restore().await;
                return Err(e.into());
            }
        }
    }
    let routes: Vec<String> = plan.routes().iter().map(ToString::to_string).collect();
    println!(
        "mse-vpn is up: {} via {} (tun {})",
        routes.join(", "),
        args.proxy,
        plan.tun_name()
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let config = DriverConfig {
        engine: EngineConfig {
            mtu: args.mtu as usize,
            max_flows: args.max_flows as usize,
            ..EngineConfig::default()
        },
        open_timeout: Duration::from_secs(args.open_timeout),
    };
    let fatal = pool::supervise(&pool, sessions, Arc::new(opts), board.clone(), stop_tx);
    let driver = Driver::new(config, tun.clone(), pool.clone());
    board.follow(driver.stats());
    let outcome = driver.run(stop).await.context("TUN device failed");
    board.set_state(LinkState::Stopping, None);
    pool.disconnect_all().await;
    let fatal = fatal.lock().ok().and_then(|mut f| f.take());

    // 4. Undo: routes and addresses first (while the link exists), then the TUN itself.
    let restored = host.restore().await;
    drop(tun);
    outcome?;
    if let Some(e) = fatal {
        restored?;
        return Err(e.into());
    }
    restored?;
    info!("mse-vpn is down; host routes restored");
    Ok(())
}

fn spawn_signal_handler(stop: watch::Sender<bool>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => info!("SIGINT: shutting down"),
            _ = term.recv() => info!("SIGTERM: shutting down"),
        }
        let _ = stop.send(true);
    });
    Ok(())
}

async fn resolve(jump: &ssh::JumpHost) -> Result<Vec<IpAddr>> {
    let addrs: Vec<IpAddr> = tokio::net::lookup_host((jump.host.as_str(), jump.port))
        .await
        .with_context(|| {
            format!(
                "could not resolve the jump host '{}': check the name, or pass its IP address",
                jump.host
            )
        })?
        .map(|a| a.ip())
        .collect();
    if addrs.is_empty() {
        bail!("the jump host '{}' resolves to no address", jump.host);
    }
    Ok(addrs)
}

/// The control sockets of running sessions (all, or the one using `tun`).
fn session_sockets(state_dir: &Path, tun: Option<&str>) -> Vec<std::path::PathBuf> {
    if let Some(tun) = tun {
        return vec![control::socket_path(state_dir, tun)];
    }
    let mut socks: Vec<_> = std::fs::read_dir(state_dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .collect()
        })
        .unwrap_or_default();
    socks.sort();
    socks
}

async fn status(args: StatusArgs, state_dir: &Path) -> Result<()> {
    let mut all = Vec::new();
    for path in session_sockets(state_dir, args.tun.as_deref()) {
        match control::status(&path).await {
            Ok(st) => all.push(st),
            Err(control::ControlError::NotRunning { .. }) if args.tun.is_none() => {}
            Err(e) => return Err(e.into()),
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else if all.is_empty() {
        println!("no mse-vpn session is running");
    } else {
        for st in &all {
            print!("{}", control::render(st));
        }
    }
    Ok(())
}

async fn down(args: DownArgs, state_dir: &Path) -> Result<()> {
    let mut stopped = 0;
    for path in session_sockets(state_dir, args.tun.as_deref()) {
        match control::request(&path, "down").await {
            Ok(_) => {
                // Wait (bounded) for the session to restore the host and remove its socket.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
                while path.exists() && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if path.exists() {
                    bail!(
                        "the session behind {} did not stop within 20 s",
                        path.display()
                    );
                }
                println!("stopped the session on {}", path.display());
                stopped += 1;
            }
            Err(control::ControlError::NotRunning { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if !args.force {
        if stopped == 0 {
            println!(
                "no mse-vpn session is running (use `mse-vpn down --force` to undo what a crashed one left)"
            );
        }
        return Ok(());
    }
    let repaired = platform::repair(state_dir).await?;
    if repaired.is_empty() {
        println!("nothing left behind to repair");
    }
    for change in repaired {
        println!("undone: {change}");
    }
    Ok(())
}
