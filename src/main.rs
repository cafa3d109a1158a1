//! The `mse-vpn` command: parses the command line, checks every input before touching the
//! host, connects to the jump host, then sets up the TUN and routes and runs the driver until
//! Ctrl-C / SIGTERM, reconnecting when the SSH connection drops.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, FromArgMatches};
use tracing::debug;

use mse_vpn::cli::{
    self, Cli, Command, ConfigCommand, DownArgs, SetupError, StatusArgs, UpArgs, UpCommand,
};
use mse_vpn::control;
use mse_vpn::reverse::ForwardState;
use mse_vpn::session::{Session, SessionError, Stopper};
use mse_vpn::ssh;
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
    if matches!(cli.command, Command::Up(_)) && !platform::process::is_privileged() {
        eprintln!("mse-vpn: must be run {}", platform::process::PRIVILEGED);
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
        platform::process::detach();
    }
    // A daemon's log file needs the time of each line; a terminal and journald do not.
    mse_vpn::logging::init(cli.verbose, std::env::var_os(DAEMON_CHILD).is_some());
    // Flow buffers (512 KiB each) straight from mmap: idle flows then cost only the pages
    // they touch. Below the threshold stay the hot path's 64 KiB chunks, which must not pay
    // an mmap/munmap each.
    platform::sys::pin_mmap_threshold(256 * 1024);
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
            Command::Up(UpCommand { args, daemon }) => {
                let log = (daemon.daemon && std::env::var_os(DAEMON_CHILD).is_some())
                    .then(|| daemon_log_path(&args, daemon.log_file.as_deref(), &cli.state_dir));
                ok(up(args, &cli.state_dir, log.as_deref()).await)
            }
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
    for cause in e.chain() {
        if cause.is::<ssh::config::ConfigError>()
            || cause.is::<mse_vpn::cli::profile::ProfileError>()
            || cause.is::<platform::PlanError>()
        {
            return EXIT_USAGE;
        }
        if let Some(ssh) = cause.downcast_ref::<ssh::SshError>() {
            return ssh_exit_code(ssh);
        }
        // The layers that carry the errors above transparently.
        match cause.downcast_ref::<SessionError>() {
            Some(SessionError::Ssh(ssh)) => return ssh_exit_code(ssh),
            Some(SessionError::Plan(_)) => return EXIT_USAGE,
            Some(_) => return EXIT_FAILURE,
            None => {}
        }
        match cause.downcast_ref::<SetupError>() {
            Some(SetupError::Ssh(ssh)) => return ssh_exit_code(ssh),
            Some(SetupError::Config(_)) => return EXIT_USAGE,
            None => {}
        }
    }
    EXIT_FAILURE
}

fn ssh_exit_code(e: &ssh::SshError) -> u8 {
    use ssh::SshError as E;
    match e {
        E::AuthFailed { .. }
        | E::WrongPassword { .. }
        | E::PasswordFile { .. }
        | E::WrongPassphrase { .. }
        | E::NoTerminalForPassphrase { .. }
        | E::KeyFile { .. }
        | E::NoKeyFile { .. }
        | E::PublicKeyFile { .. } => EXIT_AUTH,
        E::UnknownHostKey { .. } | E::HostKeyChanged { .. } | E::KnownHosts { .. } => EXIT_HOST_KEY,
        E::Resolve { .. }
        | E::UnknownAlias { .. }
        | E::Unreachable { .. }
        | E::ConnectTimeout { .. }
        | E::HopForward { .. }
        | E::ProxyCommandEnded { .. } => EXIT_UNREACHABLE,
        _ => EXIT_FAILURE,
    }
}

/// Applies the profile named on the command line (flags win), then checks that the jump
/// host and at least one CIDR are known.
fn with_profile(args: &mut UpArgs, matches: &clap::ArgMatches) -> Result<()> {
    if let Some(name) = args.profile.clone() {
        let user = ssh::InvokingUser::detect().context("cannot tell which user invoked mse-vpn")?;
        let files = [
            mse_vpn::cli::profile::user_file(user.home()),
            std::path::PathBuf::from(mse_vpn::cli::profile::SYSTEM_FILE),
        ];
        let (profile, skipped) = mse_vpn::cli::profile::find(&name, &files)?;
        for e in skipped {
            eprintln!("mse-vpn: warning: {e} (that profile is ignored)");
        }
        mse_vpn::cli::profile::apply(args, matches, &profile, user.home());
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
                return Err(mse_vpn::cli::profile::ProfileError::Read { path: f, source }.into());
            }
            vec![f]
        }
        None => {
            let user =
                ssh::InvokingUser::detect().context("cannot tell which user invoked mse-vpn")?;
            vec![
                mse_vpn::cli::profile::user_file(user.home()),
                std::path::PathBuf::from(mse_vpn::cli::profile::SYSTEM_FILE),
            ]
        }
    };
    for f in files {
        if !f.exists() {
            println!("{}: no such file (skipped)", f.display());
            continue;
        }
        let parsed = mse_vpn::cli::profile::load(&f)?;
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

/// The log file of `up --daemon`.
fn daemon_log_path(args: &UpArgs, log_file: Option<&Path>, state_dir: &Path) -> PathBuf {
    log_file
        .map(Path::to_owned)
        .unwrap_or_else(|| state_dir.join(format!("{}.log", args.tun)))
}

/// `up --daemon`: starts the same command detached, its stderr (the log) in the log file and
/// its stdout a pipe to us. The child writes the lines a foreground `up` prints to the pipe
/// once the tunnel is up, then points its stdout at the log file: we print those lines and
/// exit 0 at the pipe's end. A child that fails ends without them: we print the log and exit
/// with its status.
fn daemonize(args: &UpArgs, log_file: Option<&Path>, state_dir: &Path) -> ExitCode {
    use std::io::{BufRead, Read, Seek, SeekFrom};
    let log_path = daemon_log_path(args, log_file, state_dir);
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
    let (ready, ready_writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => return fail(format!("cannot create a pipe: {e}")),
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fail(format!("cannot find my own executable: {e}")),
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .env(DAEMON_CHILD, "1")
        .stdin(std::process::Stdio::null())
        .stdout(ready_writer)
        .stderr(log);
    platform::process::detached(&mut cmd);
    let spawned = cmd.spawn();
    drop(cmd); // our copy of the pipe's writing end: the pipe ends when the child's does
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start the daemon: {e}")),
    };
    // The pipe, read in a thread so that a child that hangs can be given up on.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let lines: Vec<String> = std::io::BufReader::new(ready)
            .lines()
            .map_while(Result::ok)
            .collect();
        let _ = tx.send(lines);
    });
    let limit = Duration::from_secs(
        args.connect_timeout
            .unwrap_or(ssh::resolve::DEFAULT_CONNECT_TIMEOUT)
            * 2
            * (1 + args.jump.as_ref().map_or(1, |h| h.0.len()) as u64)
            + 30,
    );
    let read_log = || {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&log_path)
            && f.seek(SeekFrom::Start(start)).is_ok()
        {
            let _ = f.read_to_string(&mut text);
        }
        text
    };
    let lines = match rx.recv_timeout(limit) {
        Ok(lines) => lines,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            eprint!("{}", read_log());
            return fail("the session did not come up in time; stopped it".into());
        }
    };
    if lines.last().is_some_and(|l| l.starts_with("mse-vpn is up")) {
        for line in &lines {
            println!("{line}");
        }
        println!(
            "running in the background as pid {}; log: {}; stop it with `mse-vpn down`",
            child.id(),
            log_path.display()
        );
        return ExitCode::SUCCESS;
    }
    // No "is up": the child ended (or is ending) without the tunnel.
    let status = match child.wait() {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot wait for the daemon: {e}")),
    };
    eprint!("{}", read_log());
    let _ = fail(format!(
        "the session did not come up ({status}); log: {}",
        log_path.display()
    ));
    // The same documented exit status as the session's own.
    status
        .code()
        .and_then(|c| u8::try_from(c).ok())
        .map_or(ExitCode::FAILURE, ExitCode::from)
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
    let checks =
        mse_vpn::doctor::run(|user| args.ssh_options(user), &args.network(), state_dir).await;
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

/// `up`: the session, brought up and run until Ctrl-C / SIGTERM / `down`. In the daemon's
/// child, the lines a foreground `up` prints go to the parent (its stdout is a pipe the
/// parent reads), then stdout is pointed at the log file.
async fn up(args: UpArgs, state_dir: &Path, daemon_log: Option<&Path>) -> Result<()> {
    let user = ssh::InvokingUser::detect().context("cannot tell which user invoked mse-vpn")?;
    let session = Session::new(args.session_config(&user, state_dir)?);
    spawn_signal_handler(session.stopper())?;
    let running = match session.start().await {
        Ok(r) => r,
        Err(SessionError::Ssh(e)) => return Err(with_alias_hint(e, &args, &user).into()),
        Err(e) => return Err(e.into()),
    };
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        for line in running.report().lines() {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }
    if let Some(log) = daemon_log {
        // The parent has what it waited for: from now on stdout is the log file too.
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open the log file {}", log.display()))?;
        platform::process::redirect_stdout(file).context("cannot redirect stdout to the log")?;
        // And the log says it too.
        for line in running.report().lines() {
            println!("{line}");
        }
    }
    running.wait().await?;
    Ok(())
}

fn spawn_signal_handler(stop: Stopper) -> Result<()> {
    let mut signals =
        platform::process::StopSignals::new().context("cannot handle SIGINT and SIGTERM")?;
    tokio::spawn(async move {
        let name = signals.recv().await;
        debug!("{name}: shutting down");
        stop.stop();
    });
    Ok(())
}

/// A jump host name that does not resolve but is close to a `Host` alias of the ssh config
/// is reported with that alias.
fn with_alias_hint(e: ssh::SshError, args: &UpArgs, user: &ssh::InvokingUser) -> ssh::SshError {
    let ssh::SshError::Resolve { host, source } = e else {
        return e;
    };
    let typed = args
        .proxy
        .as_ref()
        .map(|p| p.host.as_str())
        .unwrap_or(&host);
    let aliases = ssh::resolve::aliases(args.ssh_config.as_ref(), user);
    match mse_vpn::suggest::did_you_mean(typed, aliases.iter().map(String::as_str)) {
        Some(alias) => ssh::SshError::UnknownAlias {
            host: typed.to_owned(),
            alias: alias.to_owned(),
            source,
        },
        None => ssh::SshError::Resolve { host, source },
    }
}

/// The control sockets of running sessions (all, or the one using `tun`).
fn session_sockets(state_dir: &Path, tun: Option<&str>) -> Vec<std::path::PathBuf> {
    if let Some(tun) = tun {
        return vec![control::socket_path(state_dir, tun)];
    }
    platform::ipc::endpoints(state_dir)
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
            tun.is_some() || platform::ipc::probe(p)
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
    if platform::process::is_privileged() && std::env::var_os("SUDO_UID").is_some() {
        let user = ssh::InvokingUser::detect().context("cannot tell which user invoked sudo")?;
        let account = platform::account::Account {
            name: user.name().to_owned(),
            uid: user.uid(),
            gid: user.gid(),
            home: user.home().to_owned(),
        };
        platform::process::run_as(&mut cmd, &account);
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
    let relay = platform::process::relay_signals(child.id());
    let status = tokio::select! {
        s = child.wait() => s?,
        r = relay => match r? {},
    };
    drop(held); // the session removes the listeners
    let code = platform::process::exit_code(status);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
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
    if !platform::process::is_privileged() {
        bail!(
            "the session on {} is no longer running but left {} behind; undoing it must be run {}",
            left[0].tun,
            left[0].describe(),
            platform::process::PRIVILEGED
        );
    }
    for change in platform::repair(state_dir).await? {
        println!("undone: {change}");
    }
    Ok(())
}
