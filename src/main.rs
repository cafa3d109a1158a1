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
use clap::{CommandFactory, FromArgMatches};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use mse_vpn::cli::{self, Cli, Command, ConfigCommand, DownArgs, StatusArgs, UpArgs, UpCommand};
use mse_vpn::control::{self, Board, LinkState};
use mse_vpn::dns;
use mse_vpn::driver::{Driver, DriverConfig, INBOUND_QUEUE};
use mse_vpn::engine::EngineConfig;
use mse_vpn::pool::{self, Pool};
use mse_vpn::reverse::{self, ForwardState, Forwards};
use mse_vpn::ssh;
use mse_vpn::tun::Tun;
use mse_vpn_platform as platform;

/// Set in the environment of the detached child of `up --daemon`.
const DAEMON_CHILD: &str = "MSE_VPN_DAEMON_CHILD";

use mse_vpn::cli::{EXIT_AUTH, EXIT_FAILURE, EXIT_HOST_KEY, EXIT_UNREACHABLE, EXIT_USAGE};

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // Privileges first, as wg-quick checks them: a non-root `up` reads no profile, contacts
    // no jump host and touches nothing.
    if matches!(cli.command, Command::Up(_)) && !nix::unistd::geteuid().is_root() {
        eprintln!("mse-vpn: must be run as root (use sudo)");
        return ExitCode::from(EXIT_FAILURE);
    }
    if let Command::Up(UpCommand { args, .. }) | Command::Doctor(args) = &mut cli.command {
        let sub = matches.subcommand().map(|(_, m)| m).expect("a subcommand");
        if let Err(e) = with_profile(args, sub) {
            eprintln!("mse-vpn: {}", mse_vpn::logging::one_line(e.chain()));
            return ExitCode::from(EXIT_USAGE);
        }
    }
    match &cli.command {
        Command::Completions(args) => return print_bytes(&cli::completions(args.shell)),
        Command::Man => match cli::man_page() {
            Ok(page) => return print_bytes(&page),
            Err(e) => {
                eprintln!("mse-vpn: cannot render the man page: {e}");
                return ExitCode::FAILURE;
            }
        },
        _ => {}
    }
    if let Command::Up(UpCommand { args, daemon }) = &cli.command
        && daemon.daemon
    {
        if std::env::var_os(DAEMON_CHILD).is_none() {
            return daemonize(args, daemon.log_file.as_deref(), &cli.state_dir);
        }
        // The child: a session of its own, so the terminal's hangup and Ctrl-C do not reach
        // it.
        let _ = nix::unistd::setsid();
    }
    // A daemon's log file needs the time of each line; a terminal and journald do not.
    mse_vpn::logging::init(cli.verbose, std::env::var_os(DAEMON_CHILD).is_some());
    // Flow buffers (512 KiB each) straight from mmap: idle flows then cost only the pages
    // they touch. Below the threshold stay the hot path's 64 KiB chunks, which must not pay
    // an mmap/munmap each.
    platform::memory::pin_mmap_threshold(256 * 1024);
    // One thread runs everything (the driver, every SSH connection): measured on the
    // benchmark testbed it moved a GB for about a fifth less CPU than a worker per core, at
    // the same throughput, since no packet waits for another thread to wake up.
    // MSE_VPN_WORKER_THREADS=N runs N worker threads instead (for benchmarking).
    let threads = std::env::var("MSE_VPN_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0);
    let mut builder = match threads {
        None => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mse-vpn: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let ok = |r: Result<()>| r.map(|()| ExitCode::SUCCESS);
        match cli.command {
            Command::Up(UpCommand { args, .. }) => ok(up(args, &cli.state_dir).await),
            Command::Down(args) => ok(down(args, &cli.state_dir).await),
            Command::Doctor(args) => ok(doctor(args, &cli.state_dir).await),
            Command::Status(args) => status(args, &cli.state_dir).await,
            Command::Run(args) => run(args, &cli.state_dir).await,
            Command::Env(args) => ok(env(args, &cli.state_dir).await),
            Command::Expose(args) => ok(expose(args, &cli.state_dir).await),
            Command::Unexpose(args) => ok(unexpose(args, &cli.state_dir).await),
            Command::Config(ConfigCommand::Check { file }) => ok(config_check(file)),
            Command::Completions(_) | Command::Man => Ok(ExitCode::SUCCESS),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mse-vpn: {}", mse_vpn::logging::one_line(e.chain()));
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Writes generated text to stdout; a closed pipe (`| head`) is not an error.
fn print_bytes(bytes: &[u8]) -> ExitCode {
    use std::io::Write;
    match std::io::stdout().write_all(bytes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mse-vpn: cannot write to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The documented exit status for an error, from the typed error inside it.
fn exit_code(e: &anyhow::Error) -> u8 {
    use ssh::SshError as E;
    for cause in e.chain() {
        if cause.is::<ssh::config::ConfigError>()
            || cause.is::<mse_vpn::profile::ProfileError>()
            || cause.is::<platform::PlanError>()
        {
            return EXIT_USAGE;
        }
        if let Some(ssh) = cause.downcast_ref::<E>() {
            return match ssh {
                E::AuthFailed { .. }
                | E::WrongPassword { .. }
                | E::PasswordFile { .. }
                | E::WrongPassphrase { .. }
                | E::NoTerminalForPassphrase { .. }
                | E::KeyFile { .. }
                | E::NoKeyFile { .. }
                | E::PublicKeyFile { .. } => EXIT_AUTH,
                E::UnknownHostKey { .. } | E::HostKeyChanged { .. } | E::KnownHosts { .. } => {
                    EXIT_HOST_KEY
                }
                E::Resolve { .. }
                | E::UnknownAlias { .. }
                | E::Unreachable { .. }
                | E::ConnectTimeout { .. }
                | E::HopForward { .. }
                | E::ProxyCommandEnded { .. } => EXIT_UNREACHABLE,
                _ => EXIT_FAILURE,
            };
        }
    }
    EXIT_FAILURE
}

/// Applies the profile named on the command line (flags win), then checks that the jump
/// host and at least one CIDR are known.
fn with_profile(args: &mut UpArgs, matches: &clap::ArgMatches) -> Result<()> {
    if let Some(name) = args.profile.clone() {
        let user = ssh::InvokingUser::detect().context("cannot tell which user invoked mse-vpn")?;
        let files = [
            mse_vpn::profile::user_file(user.home()),
            std::path::PathBuf::from(mse_vpn::profile::SYSTEM_FILE),
        ];
        let (profile, skipped) = mse_vpn::profile::find(&name, &files)?;
        for e in skipped {
            eprintln!("mse-vpn: warning: {e} (that profile is ignored)");
        }
        mse_vpn::profile::apply(args, matches, &profile, user.home());
    }
    if args.proxy.is_none() {
        bail!(
            "no jump host: pass --proxy [USER@]HOST[:PORT] (or an ~/.ssh/config alias), or name a profile that sets `proxy`"
        );
    }
    if args.cidrs.is_empty() {
        bail!("no network to route: pass --cidr CIDR, or name a profile that sets `cidrs`");
    }
    Ok(())
}

/// `config check [FILE]`: parses the file(s) and lists their profiles.
fn config_check(file: Option<std::path::PathBuf>) -> Result<()> {
    let files = match file {
        Some(f) => {
            if let Err(source) = std::fs::metadata(&f) {
                return Err(mse_vpn::profile::ProfileError::Read { path: f, source }.into());
            }
            vec![f]
        }
        None => {
            let user =
                ssh::InvokingUser::detect().context("cannot tell which user invoked mse-vpn")?;
            vec![
                mse_vpn::profile::user_file(user.home()),
                std::path::PathBuf::from(mse_vpn::profile::SYSTEM_FILE),
            ]
        }
    };
    for f in files {
        if !f.exists() {
            println!("{}: no such file (skipped)", f.display());
            continue;
        }
        let parsed = mse_vpn::profile::load(&f)?;
        let names: Vec<&str> = parsed.profile.keys().map(String::as_str).collect();
        println!(
            "{}: ok, {} profile(s): {}",
            f.display(),
            names.len(),
            names.join(", ")
        );
    }
    Ok(())
}

/// `up --daemon`: starts the same command detached, with its output in the log file, and
/// waits until it reports the tunnel up (exit 0) or fails (its exit status, and the log).
fn daemonize(args: &UpArgs, log_file: Option<&Path>, state_dir: &Path) -> ExitCode {
    use std::io::{Read, Seek, SeekFrom};
    let log_path = log_file
        .map(Path::to_owned)
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
    let deadline = std::time::Instant::now()
        + Duration::from_secs(
            args.connect_timeout
                .unwrap_or(ssh::resolve::DEFAULT_CONNECT_TIMEOUT)
                * 2
                * (1 + args.jump.as_ref().map_or(1, |h| h.0.len()) as u64)
                + 30,
        );
    loop {
        let text = read_log();
        let lines: Vec<&str> = text.lines().collect();
        if let Some(up) = lines.iter().position(|l| l.starts_with("mse-vpn is up")) {
            // What a foreground `up` would have printed, up to its "is up" line.
            for line in &lines[..=up] {
                println!("{line}");
            }
            println!(
                "running in the background as pid {}; log: {}; stop it with `mse-vpn down`",
                child.id(),
                log_path.display()
            );
            return ExitCode::SUCCESS;
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                eprint!("{text}");
                let _ = fail(format!(
                    "the session did not come up ({status}); log: {}",
                    log_path.display()
                ));
                // The same documented exit status as the session's own.
                return status
                    .code()
                    .and_then(|c| u8::try_from(c).ok())
                    .map_or(ExitCode::FAILURE, ExitCode::from);
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
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default()
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

async fn up(args: UpArgs, state_dir: &Path) -> Result<()> {
    // 1. Everything the user typed, checked before the host is touched.
    let user = ssh::InvokingUser::detect().context("cannot tell which user invoked mse-vpn")?;
    for key in &args.identity {
        ssh::check_key_file(key)?;
    }
    let mut opts = args.ssh_options(&user)?;
    // Cloud callers' channels (`--expose`, `mse-vpn run`), queued for the driver.
    let (inbound_tx, inbound_rx) = tokio::sync::mpsc::channel(INBOUND_QUEUE);
    opts.inbound = Some(inbound_tx);
    if let Some(path) = &opts.password_file {
        // Checked before anything else, so a bad file fails fast (and as the same error a
        // login would meet).
        ssh::password::read_file(path, user.uid()).map_err(|source| {
            ssh::SshError::PasswordFile {
                path: path.clone(),
                source,
            }
        })?;
    }
    // Only the first hop is connected to directly: only its address stays out of the tunnel.
    let jump_addrs = match opts.direct_target() {
        Some((host, port)) => resolve(host, port, &args, &user).await?,
        None => {
            debug!(
                command = opts.proxy_command.as_deref().unwrap_or_default(),
                "the jump host is reached through its ProxyCommand; what the command connects to must not be inside the routed networks (use --exclude)"
            );
            Vec::new()
        }
    };
    let plan = platform::RoutePlan::new(platform::PlanSpec {
        cidrs: args.cidrs.clone(),
        excludes: args.excludes.clone(),
        jump_addrs: jump_addrs.clone(),
        tun_name: args.tun.clone(),
        mtu: args.mtu,
    })?;
    let repaired = platform::repair(state_dir).await?;
    if !repaired.is_empty() {
        for change in &repaired {
            debug!(%change, "undone");
        }
        warn!(
            "repaired what a session that died left behind ({} change(s) undone)",
            repaired.len()
        );
    }
    platform::preflight(&plan, state_dir).await?;

    // 2. The SSH connections, before any change to the host: a bad host key or a failed
    //    login leaves nothing behind.
    let target = match opts.hops.as_slice() {
        [] => opts.jump.to_string(),
        hops => format!(
            "{} via {}",
            opts.jump,
            hops.iter()
                .map(|h| format!("{}@{}:{}", h.user, h.host, h.port))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let connecting = tokio::spawn(say_connecting(target, opts.connect_timeout));
    let sessions = pool::connect_initial(&opts, args.connections as usize).await;
    connecting.abort();
    let sessions = sessions?;
    ssh::password::forbid_prompts();
    debug!(
        jump = %opts.jump,
        connections = sessions.iter().flatten().count(),
        "connected to the jump host"
    );
    // The jump host's own address, when we know it: behind ProxyJump hops only the hops
    // see it.
    let jump_ip = match opts.direct_target() {
        Some(_) if opts.hops.is_empty() => jump_addrs.first().copied(),
        _ => opts.jump.host.parse().ok(),
    };
    let advertise = match (args.advertise, sessions.iter().flatten().next()) {
        (Some(a), _) => Some(a),
        (None, Some(first)) => reverse::discover_advertise(first, jump_ip, plan.routes()).await,
        (None, None) => None,
    };
    match advertise {
        Some(a) => debug!(address = %a, "cloud callers reach this session's exposed ports on {a}"),
        None if args.expose.is_empty() => debug!(
            "could not find out the jump host's VPC address (no shell for us there?): `mse-vpn expose` and `run` will need --advertise ADDR"
        ),
        None => warn!(
            "could not find out the jump host's VPC address (no shell for us there?): pass --advertise ADDR for --expose and `mse-vpn run`"
        ),
    }
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
        format!("{}@{}:{}", opts.user, opts.jump.host, opts.jump.port),
        plan.tun_name().to_owned(),
        plan.routes().iter().map(ToString::to_string).collect(),
    );
    board.set_limits(args.max_flows, args.max_inbound);
    let server = control::Server::bind(
        &control::socket_path(state_dir, plan.tun_name()),
        user.uid(),
        user.gid(),
    )?;
    tokio::spawn(server.serve(board.clone(), stop_tx.clone()));
    let tun = Arc::new(Tun::create(plan.tun_name(), args.mtu as u16)?);
    let mut host = platform::Host::apply(&plan, state_dir).await?;

    let config = DriverConfig {
        engine: EngineConfig {
            mtu: args.mtu as usize,
            max_flows: args.max_flows as usize,
            max_inbound: args.max_inbound as usize,
            open_timeout: smoltcp::time::Duration::from_secs(args.open_timeout),
            ..EngineConfig::default()
        },
        open_timeout: Duration::from_secs(args.open_timeout),
        max_opening: args.max_opening as usize,
        local_v4: plan.tun_v4(),
        local_v6: plan.tun_v6(),
    };
    let pool = Pool::new(sessions.len());
    let opts_connect_timeout = opts.connect_timeout;
    let jump_label = opts.jump.to_string();
    let fatal = pool::supervise(
        &pool,
        sessions,
        Arc::new(opts),
        board.clone(),
        stop_tx.clone(),
    );
    // Split DNS: the responder, then the host resolver pointed at it (journaled).
    let mut dns_line = None;
    if !args.dns_domains.is_empty() {
        let dns = dns::session::start(&args, &plan, &pool, &mut host, state_dir, &dns_servers);
        match dns.await {
            Ok((responder, shown)) => {
                dns_line = Some(dns::session::summary(&args, &shown));
                board.set_dns(shown, responder.counters());
                tokio::spawn(responder.run(stop.clone()));
            }
            Err(e) => {
                let _ = stop_tx.send(true);
                let _ = host.restore().await;
                return Err(e.into());
            }
        }
    }
    let forwards = Forwards::new();
    forwards.set_advertise(advertise);
    board.set_forwards(forwards.clone());
    let exposed: Vec<u64> = forwards
        .add(&args.expose)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    tokio::spawn(forwards.clone().keep(pool.clone(), stop.clone()));
    let driver =
        Driver::new(config, tun.clone(), pool.clone()).with_inbound(inbound_rx, forwards.clone());
    board.follow(driver.stats());
    let driver = tokio::spawn(driver.run(stop));

    // The listeners asked for with --expose: up only once each listens, or fail plainly.
    forwards
        .settled(&exposed, opts_connect_timeout + Duration::from_secs(5))
        .await;
    let rows = forwards.status_of(&exposed);
    let failed: Vec<String> = rows
        .iter()
        .filter(|f| f.state != ForwardState::Listening)
        .map(|f| {
            format!(
                "--expose {}: {}",
                f.spec,
                f.detail.as_deref().unwrap_or("not listening in time")
            )
        })
        .collect();
    if failed.is_empty() {
        // One line per feature asked for, then the "is up" line (last: scripts and
        // `--daemon` wait for it).
        if let Some(line) = dns_line {
            println!("{line}");
        }
        for f in &rows {
            println!(
                "exposed: cloud callers reach {} -> local port {}",
                f.advertised.clone().unwrap_or_else(|| format!(
                    "<jump host>:{}",
                    f.remote_port.unwrap_or_default()
                )),
                f.local_port
            );
        }
        let routes: Vec<String> = plan.routes().iter().map(ToString::to_string).collect();
        println!(
            "mse-vpn is up: {} via {} (tun {})",
            routes.join(", "),
            jump_label,
            plan.tun_name()
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
    } else {
        let _ = stop_tx.send(true);
    }
    let outcome = match driver.await {
        Ok(r) => r.context("TUN device failed"),
        Err(e) => Err(anyhow::anyhow!("the driver task failed: {e}")),
    };
    board.set_state(LinkState::Stopping, None);
    pool.disconnect_all().await;
    let fatal = fatal.lock().ok().and_then(|mut f| f.take());

    // 4. Undo: routes and addresses first (while the link exists), then the TUN itself.
    let restored = host.restore().await;
    drop(tun);
    outcome?;
    if !failed.is_empty() {
        restored?;
        bail!("{}", failed.join("\n"));
    }
    if let Some(e) = fatal {
        restored?;
        return Err(e.into());
    }
    restored?;
    info!("stopped; the host's routes and DNS are as they were");
    Ok(())
}

fn spawn_signal_handler(stop: watch::Sender<bool>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => debug!("SIGINT: shutting down"),
            _ = term.recv() => debug!("SIGTERM: shutting down"),
        }
        let _ = stop.send(true);
    });
    Ok(())
}

/// After a second without a connection (a silently dropped port, a slow link), says what
/// it is waiting for (each step of connecting waits up to `timeout`); a prompt for a
/// password or passphrase already on the terminal is left alone.
async fn say_connecting(jump: String, timeout: Duration) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    if !ssh::password::prompted() {
        eprintln!(
            "mse-vpn: connecting to {jump} (waiting up to {} s)...",
            timeout.as_secs()
        );
    }
}

/// The addresses of the first host this machine connects to. A name that does not resolve
/// but is close to a `Host` alias of the ssh config is reported with that alias.
async fn resolve(
    host: &str,
    port: u16,
    args: &UpArgs,
    user: &ssh::InvokingUser,
) -> Result<Vec<IpAddr>> {
    let lookup = tokio::net::lookup_host((host, port)).await.and_then(|a| {
        let addrs: Vec<IpAddr> = a.map(|a| a.ip()).collect();
        if addrs.is_empty() {
            Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no address",
            ))
        } else {
            Ok(addrs)
        }
    });
    lookup.map_err(|source| {
        let typed = args.proxy.as_ref().map(|p| p.host.as_str()).unwrap_or(host);
        let aliases = ssh::resolve::aliases(args.ssh_config.as_ref(), user);
        match mse_vpn::suggest::did_you_mean(typed, aliases.iter().map(String::as_str)) {
            Some(alias) => ssh::SshError::UnknownAlias {
                host: typed.to_owned(),
                alias: alias.to_owned(),
                source,
            },
            None => ssh::SshError::Resolve {
                host: host.to_owned(),
                source,
            },
        }
        .into()
    })
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

/// `status`: the running sessions; and what sessions that died left behind, which makes
/// the exit status 1.
async fn status(args: StatusArgs, state_dir: &Path) -> Result<ExitCode> {
    let mut all = Vec::new();
    for path in session_sockets(state_dir, args.tun.as_deref()) {
        match control::status(&path).await {
            Ok(st) => all.push(st),
            Err(control::ControlError::NotRunning { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let left = leftovers(state_dir, args.tun.as_deref())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else if all.is_empty() && left.is_empty() {
        println!("no mse-vpn session is running");
    } else {
        for st in &all {
            print!("{}", control::render(st));
        }
    }
    for l in &left {
        eprintln!(
            "mse-vpn: the session on {} ({}) is no longer running but left {} behind: undo it with `sudo mse-vpn down`",
            l.tun,
            l.pid
                .map_or("pid unknown".to_owned(), |p| format!("pid {p}")),
            l.describe()
        );
    }
    Ok(if left.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What sessions that are no longer running left on the host (all, or the one on `tun`).
fn leftovers(state_dir: &Path, tun: Option<&str>) -> Result<Vec<platform::Leftover>> {
    let mut left = platform::leftovers(state_dir)?;
    left.retain(|l| tun.is_none_or(|t| t == l.tun));
    Ok(left)
}

/// The control socket of the one running session (or the one on `tun`).
fn one_session(state_dir: &Path, tun: Option<&str>) -> Result<std::path::PathBuf> {
    let socks: Vec<_> = session_sockets(state_dir, tun)
        .into_iter()
        .filter(|p| {
            // Live sessions, and those we may not use (so the error says so).
            tun.is_some()
                || match std::os::unix::net::UnixStream::connect(p) {
                    Ok(_) => true,
                    Err(e) => e.kind() == std::io::ErrorKind::PermissionDenied,
                }
        })
        .collect();
    match socks.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no mse-vpn session is running: start one first, e.g. `sudo mse-vpn up --cidr 10.0.0.0/16 --proxy user@jump-host`"
        ),
        many => bail!(
            "{} sessions are running: say which with --tun ({})",
            many.len(),
            many.iter()
                .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Checks that an `expose` reply says every listener listens.
fn all_listening(reply: &control::ExposeReply) -> Result<()> {
    if let Some(e) = &reply.error {
        bail!("the session refused to expose: {e}");
    }
    for f in &reply.forwards {
        if f.state != ForwardState::Listening {
            bail!(
                "cannot expose {}: {}",
                f.spec,
                f.detail
                    .as_deref()
                    .unwrap_or("the jump host did not listen in time")
            );
        }
    }
    Ok(())
}

/// Checks an `expose` reply and returns the address to register (the first listener's).
fn registered_address(reply: &control::ExposeReply) -> Result<std::net::SocketAddr> {
    all_listening(reply)?;
    let first = reply
        .forwards
        .first()
        .context("the session exposes no port: pass --expose")?;
    first
        .advertised
        .as_deref()
        .and_then(|a| a.parse().ok())
        .with_context(|| {
            "the session does not know the jump host's VPC address: restart `mse-vpn up` with --advertise ADDR"
        })
}

/// `mse-vpn run`: expose, start the app with the registration settings, wait for it, and
/// remove the listeners (they live as long as our control connection).
async fn run(args: mse_vpn::cli::RunArgs, state_dir: &Path) -> Result<ExitCode> {
    use std::collections::BTreeMap;
    let path = one_session(state_dir, args.tun.as_deref())?;
    let (reply, held) = control::expose(&path, &args.expose, true).await?;
    let addr = registered_address(&reply)?;
    let current: BTreeMap<String, String> = std::env::vars().collect();
    let reg = mse_vpn::run::registration_env(addr, &current);
    for kept in &reg.kept {
        eprintln!("mse-vpn: keeping your own setting {kept}");
    }
    for f in &reply.forwards {
        eprintln!(
            "mse-vpn: cloud callers reach {} -> local port {} while the app runs",
            f.advertised.as_deref().unwrap_or("?"),
            f.local_port
        );
    }
    eprintln!("mse-vpn: the app registers {addr}");
    let mut cmd = tokio::process::Command::new(&args.command[0]);
    cmd.args(&args.command[1..]);
    for s in &reg.env {
        cmd.env(&s.name, &s.value);
    }
    // Under sudo, the app runs as the user who invoked it, never as root.
    if nix::unistd::geteuid().is_root() && std::env::var_os("SUDO_UID").is_some() {
        let user = ssh::InvokingUser::detect().context("cannot tell which user invoked sudo")?;
        cmd.uid(user.uid())
            .gid(user.gid())
            .env("HOME", user.home())
            .env("USER", user.name())
            .env("LOGNAME", user.name());
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "mse-vpn: cannot start {}: {e}",
                args.command[0].to_string_lossy()
            );
            return Ok(ExitCode::from(
                if e.kind() == std::io::ErrorKind::NotFound {
                    127
                } else {
                    126
                },
            ));
        }
    };
    // Ctrl-C reaches the app through the terminal (same process group): we wait for it to
    // exit rather than die first. SIGTERM and SIGHUP sent to us are passed on.
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut quit = signal(SignalKind::quit())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let pid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
    let status = loop {
        tokio::select! {
            s = child.wait() => break s?,
            _ = int.recv() => {}
            _ = quit.recv() => {}
            _ = term.recv() => forward(pid, nix::sys::signal::Signal::SIGTERM),
            _ = hup.recv() => forward(pid, nix::sys::signal::Signal::SIGHUP),
        }
    };
    drop(held); // the session removes the listeners
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

fn forward(pid: Option<nix::unistd::Pid>, sig: nix::sys::signal::Signal) {
    if let Some(pid) = pid {
        let _ = nix::sys::signal::kill(pid, sig);
    }
}

/// `mse-vpn expose`: adds listeners to the running session (kept until it stops).
async fn expose(args: mse_vpn::cli::ExposeArgs, state_dir: &Path) -> Result<()> {
    let path = one_session(state_dir, args.tun.as_deref())?;
    let reply = control::expose(&path, &args.specs, false).await?.0;
    all_listening(&reply)?;
    for f in &reply.forwards {
        println!(
            "exposed: cloud callers reach {} -> local port {}",
            f.advertised
                .clone()
                .unwrap_or_else(|| format!("<jump host>:{}", f.remote_port.unwrap_or_default())),
            f.local_port
        );
    }
    Ok(())
}

/// `mse-vpn unexpose`: removes listeners from the running session.
async fn unexpose(args: mse_vpn::cli::ExposeArgs, state_dir: &Path) -> Result<()> {
    let path = one_session(state_dir, args.tun.as_deref())?;
    let reply = control::unexpose(&path, &args.specs).await?;
    if let Some(e) = reply.error {
        bail!("{e}");
    }
    Ok(())
}

/// `mse-vpn env`: the registration settings as `export` lines.
async fn env(args: mse_vpn::cli::EnvArgs, state_dir: &Path) -> Result<()> {
    use std::collections::BTreeMap;
    let path = one_session(state_dir, args.tun.as_deref())?;
    let reply = if args.expose.is_empty() {
        let st = control::status(&path).await?;
        control::ExposeReply {
            forwards: st
                .forwards
                .into_iter()
                .filter(|f| f.state == ForwardState::Listening)
                .collect(),
            error: None,
        }
    } else {
        control::expose(&path, &args.expose, false).await?.0
    };
    let addr = registered_address(&reply)?;
    let current: BTreeMap<String, String> = std::env::vars().collect();
    let reg = mse_vpn::run::registration_env(addr, &current);
    println!("# mse-vpn: register {addr} (Dubbo, Spring Cloud Alibaba/Nacos, HSF)");
    for kept in &reg.kept {
        println!("# kept your own setting {kept}");
    }
    for s in &reg.env {
        println!("export {}={}", s.name, mse_vpn::run::shell_quote(&s.value));
    }
    Ok(())
}

async fn down(args: DownArgs, state_dir: &Path) -> Result<()> {
    let mut stopped = 0;
    for path in session_sockets(state_dir, args.tun.as_deref()) {
        match control::request(&path, "down").await {
            Ok(_) => {
                // Wait (bounded) for the session to restore the host, remove its socket and
                // exit: only then is what it could not undo (kept in its journal) seen below
                // as left behind.
                let tun = path.file_stem().unwrap_or_default().to_string_lossy();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
                while (path.exists() || platform::session_running(state_dir, &tun))
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
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
    // What sessions that died (kill -9, a crash) left: undone too (`--force` is no longer
    // needed for it).
    let left = leftovers(state_dir, args.tun.as_deref())?;
    if left.is_empty() {
        if stopped == 0 {
            println!("no mse-vpn session is running; nothing left behind to undo");
        }
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the session on {} is no longer running but left {} behind; undoing it must be run as root (use sudo)",
            left[0].tun,
            left[0].describe()
        );
    }
    for change in platform::repair(state_dir).await? {
        println!("undone: {change}");
    }
    Ok(())
}
