//! The commands that talk to a running session over its control socket: `status`, `down`,
//! `expose`, `unexpose`, `env` and `run`; finding the session (its socket) and what sessions
//! that died left behind. They print what the user reads; the requests and replies are
//! [`crate::control`]'s.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mse_vpn_platform as platform;

use super::{DownArgs, EnvArgs, ExposeArgs, RunArgs, StatusArgs};
use crate::control::{self, ControlError, ExposeReply};
use crate::reverse::ForwardState;
use crate::{registry, run, ssh};

/// The control sockets of running sessions (all, or the one using `tun`).
fn session_sockets(state_dir: &Path, tun: Option<&str>) -> Vec<PathBuf> {
    if let Some(tun) = tun {
        return vec![control::socket_path(state_dir, tun)];
    }
    platform::ipc::endpoints(state_dir)
}

/// `status`: the running sessions (those of `state_dir`, and the `run` sessions of this user
/// in `runs`, their own directory); and what sessions that died left behind, which makes the
/// exit status 1.
pub async fn status(args: StatusArgs, state_dir: &Path, runs: Option<&Path>) -> Result<ExitCode> {
    let mut all = Vec::new();
    let mut sockets = session_sockets(state_dir, args.tun.as_deref());
    if let Some(dir) = runs.filter(|d| *d != state_dir) {
        sockets.extend(session_sockets(dir, args.tun.as_deref()));
    }
    for path in sockets {
        match control::status(&path).await {
            Ok(st) => all.push(st),
            Err(ControlError::NotRunning { .. }) => {}
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
fn one_session(state_dir: &Path, tun: Option<&str>) -> Result<PathBuf> {
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

/// Asks the session behind `path` to expose `specs` (see [`control::expose`]); a refusal
/// is an error that says so.
async fn expose_specs(
    path: &Path,
    specs: &[crate::reverse::ForwardSpec],
    hold: bool,
) -> Result<(ExposeReply, platform::ipc::Conn)> {
    match control::expose(path, specs, hold).await {
        Err(ControlError::Refused { message, .. }) => {
            bail!("the session refused to expose: {message}")
        }
        r => Ok(r?),
    }
}

/// Checks that an `expose` reply says every listener listens.
fn all_listening(reply: &ExposeReply) -> Result<()> {
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

/// How long `run` and `env` wait for a session that is still finding out the jump host's VPC
/// address (its first look failed: a slow login shell there).
const ADVERTISE_WAIT: Duration = Duration::from_secs(20);

/// `reply`, or, when its listeners listen but the session does not know yet which address
/// VPC callers use, the session's forwards once it does (within [`ADVERTISE_WAIT`]).
async fn with_advertised(path: &Path, reply: ExposeReply) -> Result<ExposeReply> {
    let unknown = |r: &ExposeReply| {
        r.forwards
            .iter()
            .any(|f| f.state == ForwardState::Listening && f.advertised.is_none())
    };
    if !unknown(&reply) {
        return Ok(reply);
    }
    let deadline = tokio::time::Instant::now() + ADVERTISE_WAIT;
    let specs: Vec<&str> = reply.forwards.iter().map(|f| f.spec.as_str()).collect();
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let st = control::status(path).await?;
        let now = ExposeReply {
            forwards: st
                .forwards
                .into_iter()
                .filter(|f| specs.contains(&f.spec.as_str()))
                .collect(),
        };
        if !unknown(&now) && now.forwards.len() == specs.len() {
            return Ok(now);
        }
    }
    Ok(reply)
}

/// Checks an `expose` reply and returns the address to register (the first listener's) and
/// the local port behind it.
fn registered_address(reply: &ExposeReply) -> Result<(std::net::SocketAddr, u16)> {
    all_listening(reply)?;
    let first = reply
        .forwards
        .first()
        .context("the session exposes no port: pass --expose")?;
    let addr = first
        .advertised
        .as_deref()
        .and_then(|a| a.parse().ok())
        .with_context(|| {
            "the session does not know the jump host's VPC address: restart `mse-vpn up` with --advertise ADDR"
        })?;
    Ok((addr, first.local_port))
}

/// `mse-vpn run`: expose, start the app with the registration settings, confirm what it
/// registered, wait for it, and remove the listeners (they live as long as our control
/// connection).
pub async fn run(args: RunArgs, state_dir: &Path) -> Result<ExitCode> {
    let path = one_session(state_dir, args.joined_tun())?;
    let (advertise, local_port, held) = if args.session.expose.is_empty() {
        (None, None, None)
    } else {
        let (reply, held) = expose_specs(&path, &args.session.expose, true).await?;
        let reply = with_advertised(&path, reply).await?;
        let (addr, local) = registered_address(&reply)?;
        for f in &reply.forwards {
            eprintln!(
                "mse-vpn: cloud callers reach {} -> local port {} while the app runs",
                f.advertised.as_deref().unwrap_or("?"),
                f.local_port
            );
        }
        (Some(addr), Some(local), Some(held))
    };
    let launch = Launch::new(&args, advertise, local_port);
    let mut cmd = tokio::process::Command::new(&args.command[0]);
    cmd.args(&args.command[1..]);
    for (name, value) in &launch.env {
        cmd.env(name, value);
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
    let confirm = launch.confirm();
    // Ctrl-C reaches the app through the terminal (same process group): we wait for it to
    // exit rather than die first. SIGTERM and SIGHUP sent to us are passed on.
    let relay = platform::process::relay_signals(child.id());
    let status = tokio::select! {
        s = child.wait() => s?,
        r = relay => match r? {},
    };
    if let Some(task) = confirm {
        task.abort();
    }
    drop(held); // the session removes the listeners
    let code = platform::process::exit_code(status);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// How `run` starts its app: the registration plan and the environment that carries it
/// (said on stderr as it is decided), and the registry to confirm it in.
pub(super) struct Launch {
    /// What the app registers.
    pub plan: run::Plan,
    /// The variables to set for it.
    pub env: Vec<(String, String)>,
    /// The registry to read back, when known.
    pub registry: Option<registry::RegistryUrl>,
}

impl Launch {
    /// The launch of `args`'s app registering `advertise` (the jump host's VPC address and
    /// exposed port, when a port is exposed) with `local_port` behind it.
    pub fn new(
        args: &RunArgs,
        advertise: Option<std::net::SocketAddr>,
        local_port: Option<u16>,
    ) -> Launch {
        use std::collections::BTreeMap;
        let plan = run::Plan {
            advertise,
            local_port,
            tag: args.team.tag.clone(),
            subscribe_only: args.team.subscribe_only,
        };
        let current: BTreeMap<String, String> = std::env::vars().collect();
        let app_args: Vec<String> = args
            .command
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let user = run::UserSettings {
            env: &current,
            args: &app_args,
        };
        let settings = run::settings(&plan, user);
        for kept in &settings.kept {
            eprintln!("mse-vpn: keeping your own setting {kept}");
        }
        for line in plan_lines(&plan) {
            eprintln!("mse-vpn: {line}");
        }
        let registry = args
            .registry
            .clone()
            .or_else(|| registry::from_settings(user));
        if plan.tag.is_some() && registry.is_none() {
            eprintln!(
                "mse-vpn: pass --registry zookeeper://HOST:PORT (or nacos://HOST:PORT) to let mse-vpn confirm that the tag reached the registry"
            );
        }
        let env = settings
            .process_env(&current)
            .into_iter()
            .map(|s| (s.name, s.value))
            .collect();
        Launch {
            plan,
            env,
            registry,
        }
    }

    /// Starts confirming the registration in the background (when a registry is known and
    /// the app registers an address); abort the task when the app ends.
    pub fn confirm(&self) -> Option<tokio::task::JoinHandle<()>> {
        match (&self.registry, self.plan.advertise) {
            (Some(url), Some(_)) => Some(tokio::spawn(confirm_registration(
                url.clone(),
                self.plan.clone(),
            ))),
            _ => None,
        }
    }
}

/// What the plan does, in a line or two (and the teammates notice when it shares their
/// calls).
fn plan_lines(plan: &run::Plan) -> Vec<String> {
    let mut lines = Vec::new();
    match (plan.advertise, &plan.tag, plan.subscribe_only) {
        (_, _, true) => lines.push(
            "the app registers nothing (subscribe only): it calls cloud services, cloud consumers are not routed to it".to_owned(),
        ),
        (Some(addr), Some(tag), false) => lines.push(format!(
            "the app registers {addr} tagged {tag}: only calls tagged {tag} reach it"
        )),
        (Some(addr), None, false) => {
            lines.push(format!("the app registers {addr}"));
            lines.push(run::teammates_notice(addr));
        }
        (None, _, false) => {}
    }
    lines
}

/// How long `run` keeps looking for the app's record in the registry.
const CONFIRM_WITHIN: Duration = Duration::from_secs(120);

/// Reads the registry (read only) until it holds a record for the advertised address, then
/// says what the record holds, and warns when a tag did not make it into the record that
/// consumers route by.
async fn confirm_registration(url: registry::RegistryUrl, plan: run::Plan) {
    let Some(addr) = plan.advertise else { return };
    let start = tokio::time::Instant::now();
    let mut wait = Duration::from_secs(2);
    let mut last_error = None;
    let mut seen: Option<usize> = None;
    loop {
        tokio::time::sleep(wait).await;
        match registry::records(&url, Duration::from_secs(15)).await {
            Ok(records) => {
                let findings = registry::judge(&plan, &records);
                match seen {
                    // Found: one more look, for the records a framework writes a moment
                    // later (Dubbo 3 registers the application after its interfaces).
                    None if !findings.is_empty() => seen = Some(findings.len()),
                    Some(_) => {
                        for f in &findings {
                            eprintln!("mse-vpn: {}", finding_line(&url, f));
                        }
                        return;
                    }
                    None => {}
                }
            }
            Err(e) => last_error = Some(e),
        }
        if seen.is_none() && start.elapsed() >= CONFIRM_WITHIN {
            let why = last_error
                .map(|e| format!(" (reading it failed: {})", crate::logging::error_line(&e)))
                .unwrap_or_default();
            eprintln!(
                "mse-vpn: the registry {url} holds no record of {addr} after {} s{why}: does the app register there?",
                CONFIRM_WITHIN.as_secs()
            );
            return;
        }
        wait = (wait * 3 / 2).min(Duration::from_secs(10));
    }
}

/// A finding as the user reads it.
fn finding_line(url: &registry::RegistryUrl, f: &registry::Finding) -> String {
    use registry::Finding;
    match f {
        Finding::Registered { record } => {
            let tag = match (record.family, record.tag()) {
                (registry::Family::DubboProvider, Some(t)) => format!(" (dubbo.tag={t})"),
                (registry::Family::NacosInstance, Some(c)) => format!(" (cluster {c})"),
                _ => String::new(),
            };
            format!(
                "registered in {url}: {} -> {}:{}{tag}",
                record.location, record.host, record.port
            )
        }
        Finding::TagDropped { record, tag } => format!(
            "WARNING: {url} holds {} -> {}:{} WITHOUT dubbo.tag={tag}: your teammates' \
             untagged calls WILL reach this laptop. Dubbo leaves the tag out of the registered \
             URL when dubbo.registry.simplified=true (2.7 before 2.7.16; 3.x unless dubbo.tag \
             is listed in dubbo.registry.extra-keys): run the app with \
             -Ddubbo.registry.simplified=false, or add dubbo.tag to dubbo.registry.extra-keys",
            record.location, record.host, record.port
        ),
        Finding::ClusterNotSet { record, tag } => format!(
            "WARNING: {url} holds {} -> {}:{} in cluster {}, not {tag}: consumers that keep \
             to their own cluster cannot tell this laptop apart; does the app set \
             spring.cloud.nacos.discovery.cluster-name itself?",
            record.location,
            record.host,
            record.port,
            record.tag().unwrap_or("DEFAULT")
        ),
    }
}

/// `mse-vpn expose`: adds listeners to the running session (kept until it stops).
pub async fn expose(args: ExposeArgs, state_dir: &Path) -> Result<()> {
    let path = one_session(state_dir, args.tun.as_deref())?;
    let reply = expose_specs(&path, &args.specs, false).await?.0;
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
pub async fn unexpose(args: ExposeArgs, state_dir: &Path) -> Result<()> {
    let path = one_session(state_dir, args.tun.as_deref())?;
    match control::unexpose(&path, &args.specs).await {
        Err(ControlError::Refused { message, .. }) => bail!("{message}"),
        r => Ok(r?),
    }
}

/// `mse-vpn env`: the registration settings, for a shell, a .env file or an IDE.
pub async fn env(args: EnvArgs, state_dir: &Path) -> Result<()> {
    use std::collections::BTreeMap;
    let path = one_session(state_dir, args.tun.as_deref())?;
    let (advertise, local_port) = if args.expose.is_empty() && args.team.subscribe_only {
        (None, None)
    } else {
        let reply = if args.expose.is_empty() {
            let st = control::status(&path).await?;
            ExposeReply {
                forwards: st
                    .forwards
                    .into_iter()
                    .filter(|f| f.state == ForwardState::Listening)
                    .collect(),
            }
        } else {
            expose_specs(&path, &args.expose, false).await?.0
        };
        let reply = with_advertised(&path, reply).await?;
        let (addr, local) = registered_address(&reply)?;
        (Some(addr), Some(local))
    };
    let plan = run::Plan {
        advertise,
        local_port,
        tag: args.team.tag.clone(),
        subscribe_only: args.team.subscribe_only,
    };
    let current: BTreeMap<String, String> = std::env::vars().collect();
    let settings = run::settings(
        &plan,
        run::UserSettings {
            env: &current,
            args: &[],
        },
    );
    let mut notes: Vec<String> = plan_lines(&plan)
        .into_iter()
        .map(|l| format!("mse-vpn: {l}"))
        .collect();
    notes.extend(
        settings
            .kept
            .iter()
            .map(|k| format!("kept your own setting {k}")),
    );
    let launch = run::format::Launch {
        name: &args.name,
        main_class: args.main_class.as_deref(),
        module: args.module.as_deref(),
    };
    print!(
        "{}",
        run::format::render(args.format, &settings, &current, launch, &notes)
    );
    Ok(())
}

pub async fn down(args: DownArgs, state_dir: &Path) -> Result<()> {
    let mut stopped = 0;
    for path in session_sockets(state_dir, args.tun.as_deref()) {
        match control::down(&path).await {
            Ok(()) => {
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
            Err(ControlError::NotRunning { .. }) => {}
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
