//! The `mse-vpn` command: parses the command line, checks every input before touching the
//! host, connects to the jump host, then sets up the TUN and routes and runs the driver until
//! Ctrl-C / SIGTERM, reconnecting when the SSH connection drops.

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
use mse_vpn::driver::{Driver, DriverConfig};
use mse_vpn::engine::EngineConfig;
use mse_vpn::pool::{self, Pool};
use mse_vpn::ssh::{self, SshOptions};
use mse_vpn::tun::Tun;
use mse_vpn_platform as platform;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
    let opts = SshOptions {
        user: args
            .proxy
            .user
            .clone()
            .unwrap_or_else(|| user.name().to_owned()),
        identity_files: if args.identity.is_empty() {
            user.default_identity_files()
        } else {
            args.identity.clone()
        },
        known_hosts: args
            .known_hosts
            .clone()
            .unwrap_or_else(|| user.known_hosts_path()),
        accept_new_host_key: args.accept_new_host_key,
        connect_timeout: Duration::from_secs(args.connect_timeout),
        keepalive_interval: Duration::from_secs(args.keepalive),
        keepalive_max: 3,
        window_size: 4 * 1024 * 1024,
        agent_socket: user.agent_socket(),
        file_owner: Some((user.uid(), user.gid())),
        jump: args.proxy.clone(),
    };
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
    let host = platform::Host::apply(&plan, state_dir).await?;
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
    let pool = Pool::new(sessions.len());
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
