//! A session: the whole life of `up` as a library type, from a typed [`SessionConfig`] to a
//! [`Running`] tunnel and back to a host left as it was found.
//!
//! ```text
//!  Session::new(config) ──start()──▶ 1. checks: jump host resolved, route plan, repair of a
//!                                        dead session, preflight (nothing changed yet)
//!                                     2. SSH connections (a bad key or login changes nothing)
//!                                     3. host changes (journaled): control socket, TUN,
//!                                        routes, split DNS, --expose listeners, the driver
//!                    ◀── Running ─────  (the tunnel is up; `report()` says what is served)
//!  Running::wait()  ─────────────────▶ 4. until stopped (a Stopper: Ctrl-C, `down`, an
//!                                        unrecoverable SSH failure), then the undo: routes
//!                                        and DNS restored, the TUN gone
//! ```
//!
//! It prints nothing: progress and problems go to `tracing`, and what `up` shows the user is
//! returned ([`UpReport`]). What it does not do: parse flags or profiles (the CLI builds the
//! config), or install signal handlers (the CLI wires them to a [`Stopper`]).
//!
//! A session can also run on the TUN of an app's own network namespace
//! ([`Session::in_namespace`]: `mse-vpn run` without root): the namespace holds the routes,
//! so steps 1 and 3 make no check of and no change to the host, and 4 has nothing to undo.

pub mod dns;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use mse_vpn_platform::{self as platform, PlanError, PlatformError};
use thiserror::Error;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::control::{self, Board, ControlError, LinkState};
use crate::dns::{DnsError, DnsSettings};
use crate::driver::{Driver, DriverConfig};
use crate::engine::{EngineConfig, TunFormat};
use crate::pool::{self, Pool};
use crate::relay::direct::{DirectConfig, DnsRedirect};
use crate::reverse::{self, ForwardSpec, ForwardState, Forwards};
use crate::ssh::{self, InvokingUser, SshError, SshOptions};
use crate::tun::{Tun, TunError};

/// What the session routes and serves on this host, independent of how the jump host is
/// reached.
#[derive(Clone, Debug)]
pub struct NetworkConfig {
    /// The VPC networks routed into the TUN.
    pub cidrs: Vec<IpNet>,
    /// Networks inside them that stay outside the tunnel.
    pub excludes: Vec<IpNet>,
    /// The TUN device's name.
    pub tun: String,
    /// The TUN's MTU.
    pub mtu: u32,
    /// Split DNS.
    pub dns: DnsSettings,
}

/// Everything a session needs, typed (the CLI builds it from flags, profile and ssh config).
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// How to reach and log in to the jump host.
    pub ssh: SshOptions,
    /// What is routed and served.
    pub network: NetworkConfig,
    /// Who started the session (owner of the control socket).
    pub user: InvokingUser,
    /// Where the journal, the control socket and logs live.
    pub state_dir: PathBuf,
    /// SSH connections in the pool.
    pub connections: usize,
    /// Concurrent outbound flows.
    pub max_flows: usize,
    /// Concurrent cloud callers (`--expose`).
    pub max_inbound: usize,
    /// Channel opens pending at the jump host at once.
    pub max_opening: usize,
    /// Bytes all flows may hold buffered (`--memory-budget`, see [`crate::budget`]).
    pub memory_budget: u64,
    /// How long an app waits for its channel (and a local app for a cloud caller).
    pub open_timeout: Duration,
    /// Jump host ports to listen on for cloud callers.
    pub expose: Vec<ForwardSpec>,
    /// The address cloud callers use for the jump host, if given.
    pub advertise: Option<IpAddr>,
}

/// Why a session could not start, or ended badly. Most variants carry the lower layer's
/// error, whose message says what happened and what to do.
#[derive(Debug, Error)]
pub enum SessionError {
    /// Reaching or logging in to the jump host failed (address, host key, authentication).
    #[error(transparent)]
    Ssh(#[from] SshError),
    /// The routes asked for cannot be set up (the user's input is at fault).
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The host could not be changed or restored (routes, addresses, DNS, journal).
    #[error(transparent)]
    Platform(#[from] PlatformError),
    /// The TUN device could not be created.
    #[error(transparent)]
    Tun(#[from] TunError),
    /// Split DNS could not be set up.
    #[error(transparent)]
    Dns(#[from] DnsError),
    /// The control socket could not be opened.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The state directory could not be created.
    #[error("cannot create {}", path.display())]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An `--expose` listener could not be set up in time (each line says which and why).
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Expose(Vec<ExposeFailure>),
    /// The TUN device failed while the session ran.
    #[error("the TUN device failed")]
    TunFailed(#[source] std::io::Error),
    /// The driver task ended abnormally (a bug).
    #[error("the driver task failed: {0}")]
    Driver(#[source] tokio::task::JoinError),
    /// Stopped (Ctrl-C, SIGTERM) before the tunnel was up; nothing was left changed.
    #[error("stopped before the tunnel was up")]
    Stopped,
    /// Starting failed (`cause`), and undoing the host changes made so far failed too: what
    /// is left is kept in the journal, and `left` says what and where (`mse-vpn down`, or
    /// the next start, tries again).
    #[error("{cause}; undoing the host changes then failed too: {left}")]
    NotRolledBack {
        /// Why starting failed.
        cause: Box<SessionError>,
        /// What undoing left behind.
        #[source]
        left: PlatformError,
    },
}

impl SessionError {
    /// `self`, or [`SessionError::NotRolledBack`] if the rollback after it failed.
    fn rolled_back(self, rollback: Result<(), PlatformError>) -> SessionError {
        match rollback {
            Ok(()) => self,
            Err(left) => SessionError::NotRolledBack {
                cause: Box::new(self),
                left,
            },
        }
    }
}

/// An `--expose` that did not come up.
#[derive(Debug)]
pub struct ExposeFailure {
    /// The spec as given.
    pub spec: String,
    /// Why (None: not listening in time).
    pub detail: Option<String>,
}

impl std::fmt::Display for ExposeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "--expose {}: {}",
            self.spec,
            self.detail.as_deref().unwrap_or("not listening in time")
        )
    }
}

/// Asks a session to stop (it then restores the host); clones share one session.
#[derive(Clone, Debug)]
pub struct Stopper(watch::Sender<bool>);

impl Stopper {
    /// Stops the session. The request is kept even while nothing listens for it yet (a
    /// signal in the middle of `start`): `watch::Sender::send` would drop it then.
    pub fn stop(&self) {
        self.0.send_replace(true);
    }

    /// True once asked to stop.
    pub fn is_stopped(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once asked to stop.
    pub async fn stopped(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// What an `up` serves, once it is up: the lines `up` prints.
#[derive(Clone, Debug)]
pub struct UpReport {
    /// The split-DNS line, with `--dns-domain`.
    pub dns: Option<String>,
    /// Each `--expose`: (the address cloud callers reach, the local port).
    pub exposed: Vec<(String, u16)>,
    /// The routed networks.
    pub routes: Vec<String>,
    /// `user@host:port` of the jump host.
    pub jump: String,
    /// The TUN device.
    pub tun: String,
}

impl UpReport {
    /// The lines `up` prints, the "is up" line last (scripts and `--daemon` wait for it).
    pub fn lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self.dns.iter().cloned().collect();
        for (reach, port) in &self.exposed {
            lines.push(format!(
                "exposed: cloud callers reach {reach} -> local port {port}"
            ));
        }
        lines.push(format!(
            "mse-vpn is up: {} via {} (tun {})",
            self.routes.join(", "),
            self.jump,
            self.tun
        ));
        lines
    }
}

/// A session whose TUN lives in an app's own network namespace (`mse-vpn run` without
/// root): the namespace already has the TUN's addresses and routes, so the session changes
/// nothing on the host (no repair, no route check, no journal, no host resolver).
pub struct InNamespace {
    /// The TUN, from the namespace.
    pub tun: Tun,
    /// The session's name: its control socket's (several may run at once).
    pub name: String,
    /// The app's pid, for `status`.
    pub app_pid: u32,
    /// The TUN's IPv6 address in the namespace, when it has one the route plan does not
    /// (outside traffic with IPv4 CIDRs only).
    pub v6: Option<std::net::Ipv6Addr>,
    /// The address the app's resolv.conf names (routed into the TUN, port 53): what the
    /// driver hands to the split-DNS responder.
    pub dns: Option<std::net::Ipv4Addr>,
    /// The address that stands for this host's loopback in the namespace (with outside
    /// traffic): what the driver connects to 127.0.0.1.
    pub host_loopback: Option<std::net::Ipv4Addr>,
}

/// A session not started yet. See the module documentation.
pub struct Session {
    config: SessionConfig,
    stop: watch::Sender<bool>,
    /// Creates the TUN device ([`Tun::create`]).
    create_tun: fn(&str, u16) -> Result<Tun, TunError>,
    /// The TUN of an app's namespace instead.
    namespace: Option<InNamespace>,
}

/// What [`Session::start`] has set running on the host so far: undone, in reverse, when a
/// later step fails, so that a failed start leaves nothing behind (no control socket still
/// answering, no task, no host change) or says what it could not undo.
struct Started {
    stop: watch::Sender<bool>,
    /// The control server's task (its socket file goes with it).
    control: Option<tokio::task::AbortHandle>,
}

impl Started {
    /// Stops everything started so far, then restores `host` (if the host was changed):
    /// returns `cause`, or [`SessionError::NotRolledBack`] naming what is left.
    async fn fail(self, cause: SessionError, host: Option<platform::Host>) -> SessionError {
        self.stop.send_replace(true);
        if let Some(control) = self.control {
            control.abort();
        }
        let rollback = match host {
            Some(host) => host.restore().await,
            None => Ok(()),
        };
        if let Err(left) = &rollback {
            warn!("starting failed ({cause}), and undoing failed: {left}");
        }
        cause.rolled_back(rollback)
    }
}

/// A session whose tunnel is up.
pub struct Running {
    report: UpReport,
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<Result<(), SessionError>>,
}

impl Session {
    /// A session for `config`; nothing happens until [`Session::start`].
    pub fn new(config: SessionConfig) -> Session {
        Session {
            config,
            stop: watch::channel(false).0,
            create_tun: Tun::create,
            namespace: None,
        }
    }

    /// Runs on the TUN of an app's own namespace and changes nothing on the host (see
    /// [`InNamespace`]).
    pub fn in_namespace(mut self, namespace: InNamespace) -> Session {
        self.namespace = Some(namespace);
        self
    }

    /// Creates the TUN device with `create` instead of [`Tun::create`] (for tests: a TUN
    /// that cannot be created shows what a failed start leaves behind).
    pub fn with_tun(mut self, create: fn(&str, u16) -> Result<Tun, TunError>) -> Session {
        self.create_tun = create;
        self
    }

    /// Stops the session, whenever it is asked to (before it is up too).
    pub fn stopper(&self) -> Stopper {
        Stopper(self.stop.clone())
    }

    /// Brings the tunnel up (see the module documentation). On error, whatever was changed
    /// on the host is restored first.
    pub async fn start(self) -> Result<Running, SessionError> {
        let Session {
            config,
            stop,
            create_tun,
            namespace,
        } = self;
        let in_namespace = namespace.is_some();
        let namespace_v6 = namespace.as_ref().and_then(|ns| ns.v6);
        let namespace_dns = namespace.as_ref().and_then(|ns| ns.dns);
        let namespace_loopback = namespace.as_ref().and_then(|ns| ns.host_loopback);
        let stopper = Stopper(stop.clone());
        let net = &config.network;
        let budget = crate::budget::MemoryBudget::new(config.memory_budget);
        let mut opts = config.ssh.clone();
        opts.budget = Some(budget.clone());

        // 1. Checks, before the host is touched. Only the first hop is connected to
        //    directly: only its address stays out of the tunnel.
        let jump_addrs = match opts.direct_target() {
            Some((host, port)) => resolve(host, port).await?,
            None => {
                debug!(
                    command = opts.proxy_command.as_deref().unwrap_or_default(),
                    "the jump host is reached through its ProxyCommand; what the command connects to must not be inside the routed networks (use --exclude)"
                );
                Vec::new()
            }
        };
        let plan = platform::RoutePlan::new(platform::PlanSpec {
            cidrs: net.cidrs.clone(),
            excludes: net.excludes.clone(),
            // In an app's namespace, our own connections never meet its routes.
            jump_addrs: if in_namespace {
                Vec::new()
            } else {
                jump_addrs.clone()
            },
            tun_name: net.tun.clone(),
            mtu: net.mtu,
        })?;
        let state_dir = &config.state_dir;
        if !in_namespace {
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
        }

        // 2. The SSH connections, before any change to the host: a bad host key or a failed
        //    login leaves nothing behind.
        let pool = Pool::new(config.connections);
        let connecting = tokio::spawn(say_connecting(opts.target_label(), opts.connect_timeout));
        let sessions = tokio::select! {
            s = pool.connect_initial(&opts) => s,
            () = stopper.stopped() => {
                connecting.abort();
                return Err(SessionError::Stopped);
            }
        };
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
        // Found before the host changes only for --expose (its listeners check it); else
        // while they are made, so the first flow does not wait for it: an `exec` channel
        // costs the jump host a process, and a team's laptops starting at once queue there.
        // Either way `up` reports once it is known.
        let advertise = match (config.advertise, sessions.iter().flatten().next()) {
            (Some(a), _) => Some(a),
            (None, Some(first)) if !config.expose.is_empty() => {
                let found = reverse::discover_advertise(first, jump_ip, plan.routes()).await;
                say_advertise(found, true);
                found
            }
            (None, _) => None,
        };
        let dns_servers = self::dns::resolvers(&net.dns, &sessions).await?;
        if stopper.is_stopped() {
            return Err(SessionError::Stopped);
        }

        // 3. Host changes, journaled by the platform crate.
        platform::journal::prepare_dir(state_dir).map_err(|source| SessionError::StateDir {
            path: state_dir.clone(),
            source,
        })?;
        let jump = format!("{}@{}:{}", opts.user, opts.jump.host, opts.jump.port);
        let name = namespace
            .as_ref()
            .map_or(plan.tun_name(), |ns| ns.name.as_str())
            .to_owned();
        let board = Board::new(
            jump.clone(),
            name.clone(),
            plan.routes().iter().map(ToString::to_string).collect(),
        );
        board.set_limits(config.max_flows as u64, config.max_inbound as u64);
        if let Some(ns) = &namespace {
            board.set_app(ns.app_pid);
        }
        let server = control::Server::bind(
            &control::socket_path(state_dir, &name),
            config.user.uid(),
            config.user.gid(),
        )?;
        let stop_rx = stop.subscribe();
        let undo = Started {
            stop: stop.clone(),
            control: Some(tokio::spawn(server.serve(board.clone(), stop.clone())).abort_handle()),
        };
        let tun = match namespace {
            Some(ns) => Arc::new(ns.tun),
            None => match create_tun(plan.tun_name(), net.mtu as u16) {
                Ok(tun) => Arc::new(tun),
                Err(e) => return Err(undo.fail(e.into(), None).await),
            },
        };
        let mut host = if in_namespace {
            None
        } else {
            match platform::Host::apply(&plan, state_dir).await {
                Ok(host) => Some(host),
                Err(e) => return Err(undo.fail(e.into(), None).await),
            }
        };

        let driver_config = DriverConfig {
            engine: EngineConfig {
                mtu: net.mtu as usize,
                max_flows: config.max_flows,
                max_inbound: config.max_inbound,
                open_timeout: config.open_timeout.into(),
                tun: TunFormat {
                    header: tun.header_len(),
                    checksum_offload: tun.checksum_offload(),
                },
                memory_budget: Some(config.memory_budget),
                ..EngineConfig::default()
            },
            open_timeout: config.open_timeout,
            max_opening: config.max_opening,
            budget: Some(budget.clone()),
            local_v4: plan.tun_v4(),
            local_v6: namespace_v6.or(plan.tun_v6()),
            // `up` routes only the VPC CIDRs into the TUN: no direct path. An app's
            // namespace that reaches outside gets one once its DNS responder is bound.
            direct: None,
        };
        let mut driver_config = driver_config;
        let connect_timeout = opts.connect_timeout;
        let fatal = pool::supervise(&pool, sessions, Arc::new(opts), board.clone(), stop.clone());
        // Split DNS: the responder, then the host resolver pointed at it (journaled).
        let mut dns_line = None;
        // An app's namespace that reaches outside the VPC resolves every name through the
        // responder: the host's own nameservers (often a loopback stub) are reached from
        // here.
        if net.dns.enabled() || in_namespace {
            let started = match host.as_mut() {
                Some(host) => {
                    self::dns::start(&net.dns, &plan, &pool, host, state_dir, &dns_servers).await
                }
                None => self::dns::start_unbound(&net.dns, &plan, &pool, &dns_servers).await,
            };
            match started {
                Ok((responder, shown)) => {
                    if let Some(addr) = namespace_dns {
                        debug!(responder = %shown.listen, "the app's resolver is {addr}:53");
                    }
                    if in_namespace {
                        let to = match responder.local_addr() {
                            Ok(to) => to,
                            Err(source) => {
                                let e = DnsError::Bind {
                                    addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                                    source,
                                };
                                return Err(undo.fail(e.into(), host).await);
                            }
                        };
                        driver_config.direct = Some(namespace_direct(
                            plan.routes(),
                            namespace_loopback,
                            namespace_dns.map(|at| DnsRedirect {
                                at: SocketAddr::from((at, 53)),
                                to,
                            }),
                        ));
                    }
                    if net.dns.enabled() {
                        dns_line = Some(self::dns::summary(&net.dns, &shown));
                    }
                    board.set_dns(shown, responder.counters());
                    tokio::spawn(responder.run(stop_rx.clone()));
                }
                Err(e) => return Err(undo.fail(e.into(), host).await),
            }
        }
        let forwards = Forwards::new();
        forwards.set_advertise(advertise);
        // Not found yet (and not given): looked for while the host changes are made, and
        // again later until found (a jump host's slow login shell at start must not leave
        // the session unable to expose for good).
        let discovering = advertise.is_none().then(|| {
            tokio::spawn(discover_advertise_later(
                pool.clone(),
                forwards.clone(),
                jump_ip,
                plan.routes().to_vec(),
                stop_rx.clone(),
                // With --expose the first look was made above.
                config.expose.is_empty(),
            ))
        });
        board.set_forwards(forwards.clone());
        let exposed: Vec<u64> = forwards
            .add(&config.expose)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        tokio::spawn(forwards.clone().keep(pool.clone(), stop_rx.clone()));
        let mut driver = Driver::new(driver_config, tun.clone(), pool.clone());
        if let Some(calls) = pool.inbound_calls() {
            driver = driver.with_inbound(calls, forwards.clone());
        }
        board.follow(driver.stats());
        let driver = tokio::spawn(driver.run(stop_rx));

        if let Some(mut discovering) = discovering {
            // `up` reports once the first look is over (found or not); later looks go on
            // in the background.
            let _ = (&mut discovering).await;
        }
        // The listeners asked for with --expose: up only once each listens, or fail plainly.
        forwards
            .settled(&exposed, connect_timeout + Duration::from_secs(5))
            .await;
        let rows = forwards.status_of(&exposed);
        let failed: Vec<ExposeFailure> = rows
            .iter()
            .filter(|f| f.state != ForwardState::Listening)
            .map(|f| ExposeFailure {
                spec: f.spec.clone(),
                detail: f.detail.clone(),
            })
            .collect();
        let report = UpReport {
            dns: dns_line,
            exposed: rows
                .iter()
                .map(|f| {
                    let reach = f.advertised.clone().unwrap_or_else(|| {
                        format!("<jump host>:{}", f.remote_port.unwrap_or_default())
                    });
                    (reach, f.local_port)
                })
                .collect(),
            routes: plan.routes().iter().map(ToString::to_string).collect(),
            jump: jump.clone(),
            tun: plan.tun_name().to_owned(),
        };
        let finish = async move {
            let outcome = match driver.await {
                Ok(r) => r.map_err(SessionError::TunFailed),
                Err(e) => Err(SessionError::Driver(e)),
            };
            board.set_state(LinkState::Stopping, None);
            pool.disconnect_all().await;
            let fatal = fatal.lock().ok().and_then(|mut f| f.take());
            // 4. Undo: routes and addresses first (while the link exists), then the TUN.
            let restored = match host {
                Some(host) => host.restore().await,
                None => Ok(()),
            };
            drop(tun);
            if let Err(e) = outcome {
                return Err(e.rolled_back(restored));
            }
            if let Some(e) = fatal {
                return Err(SessionError::from(e).rolled_back(restored));
            }
            restored?;
            if in_namespace {
                info!("stopped");
            } else {
                info!("stopped; the host's routes and DNS are as they were");
            }
            Ok(())
        };
        if !failed.is_empty() {
            stop.send_replace(true);
            let cause = SessionError::Expose(failed);
            return Err(match finish.await {
                Ok(()) => cause,
                Err(SessionError::NotRolledBack { left, .. })
                | Err(SessionError::Platform(left)) => cause.rolled_back(Err(left)),
                Err(e) => {
                    debug!("stopping after the failed --expose: {e}");
                    cause
                }
            });
        }
        Ok(Running {
            report,
            stop,
            done: tokio::spawn(finish),
        })
    }
}

impl Running {
    /// What the session serves.
    pub fn report(&self) -> &UpReport {
        &self.report
    }

    /// Stops the session.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.stop.clone())
    }

    /// Waits until the session stopped and the host is restored.
    pub async fn wait(self) -> Result<(), SessionError> {
        self.done.await.map_err(SessionError::Driver)?
    }
}

/// Says what was found of the jump host's VPC address (`needed`: --expose waits for it).
/// The direct path of an app's namespace: the VPC `routes` through SSH, every other
/// destination from this host's sockets; `loopback` (the namespace's alias for this host's
/// 127.0.0.1) and `dns` (the app's resolver address, answered by the responder) as given.
fn namespace_direct(
    routes: &[IpNet],
    loopback: Option<Ipv4Addr>,
    dns: Option<DnsRedirect>,
) -> DirectConfig {
    let mut direct = DirectConfig::new(routes.to_vec());
    direct.host_loopback = loopback.map(IpAddr::V4).into_iter().collect();
    direct.dns = dns;
    direct
}

fn say_advertise(found: Option<IpAddr>, needed: bool) {
    match found {
        Some(a) => {
            debug!(address = %a, "cloud callers reach this session's exposed ports on {a}")
        }
        None if !needed => debug!(
            "could not find out the jump host's VPC address (no shell for us there?): `mse-vpn expose` and `run` will need --advertise ADDR"
        ),
        None => warn!(
            "could not find out the jump host's VPC address (no shell for us there?): pass --advertise ADDR for --expose and `mse-vpn run`"
        ),
    }
}

/// How long the later looks for the jump host's VPC address wait between them: from the
/// first, doubling, at most the last.
const REDISCOVER: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(60));

/// Finds the jump host's VPC address on the pool's first link once one is up, for a later
/// `mse-vpn expose` or `run`, while the host changes are made and the first flows go out.
/// Returns after the first look (`look_now`; found or not, said once); when nothing was
/// found, looks again in the background, less and less often, until found or the session
/// stops.
async fn discover_advertise_later(
    pool: Arc<Pool>,
    forwards: Arc<Forwards>,
    jump_ip: Option<IpAddr>,
    routes: Vec<IpNet>,
    mut stop: watch::Receiver<bool>,
    look_now: bool,
) {
    let look = {
        let (pool, routes) = (pool.clone(), routes.clone());
        move || {
            let (pool, routes) = (pool.clone(), routes.clone());
            async move {
                let mut links = pool.subscribe();
                let _ = links.wait_for(|l| l.iter().any(Option::is_some)).await;
                let (_, session) = pool.first_live()?;
                reverse::discover_advertise(&session, jump_ip, &routes).await
            }
        }
    };
    if look_now {
        let found = tokio::select! {
            found = look() => found,
            _ = stop.wait_for(|s| *s) => return,
        };
        say_advertise(found, false);
        if found.is_some() {
            forwards.set_advertise(found);
            return;
        }
    }
    tokio::spawn(async move {
        let mut wait = REDISCOVER.0;
        loop {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let found = tokio::select! {
                found = look() => found,
                _ = stop.wait_for(|s| *s) => return,
            };
            if let Some(a) = found {
                info!(
                    "found the jump host's VPC address at last: cloud callers reach exposed ports on {a}"
                );
                forwards.set_advertise(Some(a));
                return;
            }
            wait = (wait * 2).min(REDISCOVER.1);
        }
    });
}

/// After a second without a connection (a silently dropped port, a slow link), says what
/// it is waiting for (each step of connecting waits up to `timeout`); a prompt for a
/// password or passphrase already on the terminal is left alone.
async fn say_connecting(jump: String, timeout: Duration) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    if !ssh::password::prompted() {
        info!(
            "connecting to {jump} (waiting up to {} s)...",
            timeout.as_secs()
        );
    }
}

/// The addresses of the first host this machine connects to.
async fn resolve(host: &str, port: u16) -> Result<Vec<IpAddr>, SshError> {
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
    lookup.map_err(|source| SshError::Resolve {
        host: host.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stop_asked_before_anything_listens_is_kept() {
        let (tx, rx) = watch::channel(false);
        drop(rx);
        let stopper = Stopper(tx);
        // A SIGTERM while `start` is between two of its checks: no receiver exists.
        stopper.stop();
        assert!(stopper.is_stopped());
        tokio::time::timeout(Duration::from_secs(1), stopper.stopped())
            .await
            .expect("a later wait sees the stop");
        // What the session's tasks subscribe afterwards sees it too.
        let mut later = stopper.0.subscribe();
        assert!(*later.wait_for(|s| *s).await.unwrap());
    }

    #[test]
    fn a_failed_rollback_is_reported_with_the_failure_that_caused_it() {
        let cause = SessionError::Stopped;
        assert!(matches!(cause.rolled_back(Ok(())), SessionError::Stopped));
        let e = SessionError::Stopped.rolled_back(Err(PlatformError::Unsupported));
        let text = e.to_string();
        assert!(
            text.starts_with("stopped before the tunnel was up; undoing the host changes then failed too: this operating system is not supported"),
            "{text}"
        );
        assert!(matches!(e, SessionError::NotRolledBack { .. }));
    }
}
