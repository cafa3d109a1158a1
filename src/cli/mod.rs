//! The command line: clap definitions, and parsing of every argument into a typed value at
//! the edge (CIDRs, the jump host, the TUN name), so the rest of the program never sees text;
//! and the commands themselves, one file each, which print what users read and turn errors
//! into the documented exit statuses. The library below them returns values and logs through
//! `tracing`; `main.rs` only parses and dispatches.
//!
//! - [`up`], [`daemon`] (`up --daemon`), [`doctor`]: a session, started here;
//! - [`client`]: `status`, `down`, `expose`, `unexpose`, `env`, `run`, through the control
//!   socket of a running session;
//! - [`config`] (`config check`, profiles applied under the flags), [`profile`] (the files);
//! - [`exit`]: which exit status an error maps to.

use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand};
use ipnet::IpNet;

use crate::dns::DnsSettings;
use crate::reverse::ForwardSpec;
use crate::session::{NetworkConfig, SessionConfig};
use crate::ssh::config::ConfigError;
use crate::ssh::resolve::{self, Overrides};
use crate::ssh::{InvokingUser, JumpHost, SshError, SshOptions};

/// The help heading of the options every subcommand takes.
const GLOBAL: &str = "Global options";

/// mse-vpn: reach a private cloud network (VPC) from this machine through an SSH jump host.
#[derive(Debug, Parser)]
#[command(name = "mse-vpn", version, about, long_about = None)]
pub struct Cli {
    /// More logging: -v shows each connection, flow and setting as it happens, -vv traces
    /// mse-vpn's internals, -vvv adds the SSH library's own messages (RUST_LOG overrides).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, help_heading = GLOBAL)]
    pub verbose: u8,
    /// Where sessions keep their restore journals, control sockets and logs.
    #[arg(
        long,
        global = true,
        env = "MSE_VPN_STATE_DIR",
        default_value = mse_vpn_platform::DEFAULT_STATE_DIR,
        value_name = "DIR",
        help_heading = GLOBAL
    )]
    pub state_dir: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Bring the tunnel up and keep it up until Ctrl-C / SIGTERM.
    #[command(after_help = "Examples:\n  \
        sudo mse-vpn up --cidr 10.0.0.0/16 --proxy admin@bastion.example.com\n  \
        sudo mse-vpn up --cidr 10.0.0.0/16 --cidr fd00:1::/64 --exclude 10.0.9.0/24 --proxy ops@203.0.113.7:2222 -i ~/.ssh/id_ed25519\n  \
        sudo mse-vpn up --cidr 10.0.0.0/16 --proxy my-ssh-alias          (HostName, User, Port, ProxyJump from ~/.ssh/config)\n  \
        sudo mse-vpn up --cidr 10.0.0.0/16 --proxy ops@10.0.0.5 -J ops@bastion.example.com\n  \
        sudo mse-vpn up dev                     (the profile [profile.dev] of ~/.config/mse-vpn/config.toml)\n  \
        sudo mse-vpn up dev --connections 8     (a flag overrides the profile)")]
    Up(UpCommand),
    /// Stop the running session(s), and undo what a session that died (kill -9, a crash)
    /// left behind: routes, DNS settings.
    #[command(after_help = "Examples:\n  sudo mse-vpn down\n  sudo mse-vpn down --tun mse1")]
    Down(DownArgs),
    /// Check, without changing anything, whether `up` with these options would work: TUN
    /// support, privileges, route conflicts, the jump host, its key, login, and forwarding.
    #[command(
        after_help = "Exit status: 0 when every check passes, 1 when one fails.\n\nExamples:\n  \
        sudo mse-vpn doctor --cidr 10.0.0.0/16 --proxy admin@bastion.example.com\n  \
        mse-vpn doctor --rootless --cidr 10.0.0.0/16 --proxy admin@bastion.example.com      (for `run` without root)"
    )]
    Doctor(DoctorArgs),
    /// Run an app as part of the team's services: a provider's ports are exposed on the jump
    /// host while it runs, and it is started (as you, not root) with the settings that make
    /// Dubbo, Spring Cloud (Nacos, Zookeeper, Eureka, Consul) and HSF register the jump host's
    /// VPC address; --tag takes only your own calls, --subscribe-only registers nothing. With
    /// --cidr and --proxy (or --profile) it needs no root: the app gets a network of its own
    /// (Linux).
    #[command(
        after_help = "Without --cidr/--proxy/--profile it joins the running session (`sudo \
        mse-vpn up ...`); with them it starts its own, no root needed (Linux): the app runs in \
        a network namespace of its own whose way out is the tunnel, nothing on this machine \
        changes, and the session ends with the app. The app must listen on 0.0.0.0 (or the \
        TUN address), not only 127.0.0.1; its ports are reached through --expose. Exit \
        status: the app's.\n\nExamples:\n  \
        mse-vpn run --tag alice --expose 20880 -- java -jar provider.jar\n  \
        mse-vpn run --subscribe-only -- java -jar consumer.jar\n  \
        mse-vpn run --expose 18080:8080 -- ./gradlew bootRun\n  \
        mse-vpn run --cidr 10.0.0.0/16 --proxy admin@jump --subscribe-only -- java -jar app.jar      (no sudo)\n  \
        mse-vpn run --profile dev --dns-domain internal --expose 20880 -- ./gradlew bootRun      (no sudo)"
    )]
    Run(RunArgs),
    /// Print the same settings as `run` for a shell (`eval`), a .env file, or an IDE run
    /// configuration (VS Code launch.json, IntelliJ IDEA .run/NAME.run.xml).
    #[command(
        after_help = "With --expose the port is added to the session and stays until it \
        stops; without, the session's first exposed port is used.\n\nExamples:\n  \
        eval \"$(mse-vpn env --tag alice --expose 20880)\"\n  \
        mse-vpn env --tag alice --format intellij --main-class org.example.Provider > .run/provider-alice.run.xml\n  \
        mse-vpn env --subscribe-only --format dotenv > .env"
    )]
    Env(EnvArgs),
    /// Expose local ports to cloud callers on a running session, until it stops or
    /// `unexpose` (what `up --expose` does at start).
    #[command(
        after_help = "Examples:\n  mse-vpn expose 20880\n  mse-vpn expose 18080:8080 --tun mse0"
    )]
    Expose(ExposeArgs),
    /// Stop exposing ports on a running session.
    #[command(after_help = "Examples:\n  mse-vpn unexpose 20880")]
    Unexpose(ExposeArgs),
    /// Show the state of running sessions (no root needed for the user who started them).
    #[command(
        after_help = "Exit status: 0 when every session found is running (or none is); 1 when \
        a session that died (kill -9, a crash) left host changes behind: undo them with \
        `sudo mse-vpn down`.\n\nExamples:\n  mse-vpn status\n  \
        mse-vpn status --json | jq '.[0].bytes_down'      (one object per session)"
    )]
    Status(StatusArgs),
    /// Work with profile files (~/.config/mse-vpn/config.toml, /etc/mse-vpn/config.toml).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a shell completion script.
    #[command(after_help = "Examples:\n  \
        mse-vpn completions bash > /etc/bash_completion.d/mse-vpn\n  \
        mse-vpn completions zsh > \"${fpath[1]}/_mse-vpn\"\n  \
        mse-vpn completions fish > ~/.config/fish/completions/mse-vpn.fish")]
    Completions(CompletionsArgs),
    /// Print the man page (roff): every command and option, from the same definitions as
    /// --help.
    #[command(
        after_help = "Examples:\n  mse-vpn man > mse-vpn.1 && man -l mse-vpn.1\n  \
        mse-vpn man | gzip > /usr/local/share/man/man1/mse-vpn.1.gz"
    )]
    Man,
}

/// `mse-vpn config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check profile files: every profile must parse, with no unknown key. Without FILE,
    /// checks the invoking user's file and the system file.
    #[command(
        after_help = "Exit status: 0 when the files are valid, 2 when one is not (the message names the file and line).\n\nExamples:\n  \
        mse-vpn config check\n  mse-vpn config check examples/config.toml"
    )]
    Check {
        /// The file to check.
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
    },
}

/// Options of `mse-vpn completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Options of `mse-vpn doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Check what `run` without root needs instead of `up` (Linux): user namespaces, the TUN
    /// device, iproute2, then the jump host as for `up`.
    #[arg(long)]
    pub rootless: bool,
    #[command(flatten)]
    pub args: UpArgs,
}

/// Options of `mse-vpn run`.
#[derive(Debug, Args)]
// A provider (--expose) or a consumer (--subscribe-only): the error names both.
#[command(group(clap::ArgGroup::new("role").args(["expose", "subscribe_only"]).required(true).multiple(true)))]
#[command(mut_arg("expose", |a| a
    .help("A port of the app to expose on the jump host while it runs (repeatable; the first one is the one registered)")))]
#[command(mut_arg("profile", |a| a
    .long("profile")
    .value_name("NAME")
    .help("A profile of ~/.config/mse-vpn/config.toml (or /etc/mse-vpn/config.toml): run starts a session of its own with it, no root needed (flags given here override it)")))]
#[command(mut_arg("cidrs", |a| a
    .help("A private network the app reaches through the tunnel (repeatable; IPv4 or IPv6): run starts a session of its own, no root needed (with --proxy, here or in the profile)")))]
#[command(mut_arg("proxy", |a| a
    .help("The SSH jump host of run's own session: [USER@]HOST[:PORT], or an alias of ~/.ssh/config")))]
#[command(mut_arg("tun", |a| a
    .help("Joining: the session using this TUN device (needed only when several run). With a session of its own: the TUN's name inside the app's namespace")))]
pub struct RunArgs {
    #[command(flatten)]
    pub team: TeamArgs,
    /// The team's registry, to confirm what the app really registered there (read only):
    /// zookeeper://HOST:PORT or nacos://HOST:PORT. Found on the app's command line and in
    /// the environment when it is given there (dubbo.registry.address,
    /// spring.cloud.nacos.discovery.server-addr, spring.cloud.zookeeper.connect-string).
    #[arg(long = "registry", value_name = "URL")]
    pub registry: Option<crate::registry::RegistryUrl>,
    /// `up`'s options: `--expose` and `--tun` always; the others start a session of the
    /// app's own.
    #[command(flatten)]
    pub session: UpArgs,
    /// True when `--tun` was given on the command line (set by `main` from the matches).
    #[arg(skip)]
    pub tun_given: bool,
    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<std::ffi::OsString>,
}

/// How an app takes part in the team's registry (`run` and `env`).
#[derive(Debug, Args)]
pub struct TeamArgs {
    /// Register as a provider tagged NAME: only calls tagged NAME reach this laptop
    /// (Dubbo's tag routing; Spring Cloud Alibaba: the Nacos cluster NAME), teammates'
    /// untagged calls keep going to the cloud's providers.
    #[arg(long = "tag", value_name = "NAME", conflicts_with = "subscribe_only")]
    pub tag: Option<crate::run::Tag>,
    /// Call cloud services but register nothing in the registry (Dubbo, Nacos, Zookeeper,
    /// Eureka and Consul discovery); --expose is then optional.
    #[arg(long = "subscribe-only")]
    pub subscribe_only: bool,
}

impl RunArgs {
    /// True when `run` starts a session of its own (rootless, for this app only) rather than
    /// joining the running one: a network, a jump host or a profile was given.
    pub fn starts_session(&self) -> bool {
        !self.session.cidrs.is_empty()
            || self.session.proxy.is_some()
            || self.session.profile.is_some()
    }

    /// The session to join: the one on `--tun` when given.
    pub fn joined_tun(&self) -> Option<&str> {
        self.tun_given.then_some(self.session.tun.as_str())
    }
}

/// The first option of `matches` (a `run`) given on the command line that only a session of
/// `run`'s own takes (`--mtu`, `-i`, ...): as `--LONG`, for the message that refuses it when
/// `run` joins the running session.
pub fn session_only_option(matches: &clap::ArgMatches) -> Option<String> {
    let up = UpArgs::augment_args(clap::Command::new("up"));
    up.get_arguments()
        .filter(|a| !matches!(a.get_id().as_str(), "expose" | "tun"))
        .find(|a| {
            matches.value_source(a.get_id().as_str())
                == Some(clap::parser::ValueSource::CommandLine)
        })
        .map(|a| match a.get_long() {
            Some(long) => format!("--{long}"),
            None => a.get_id().to_string(),
        })
}

/// Options of `mse-vpn expose` and `unexpose`.
#[derive(Debug, Args)]
pub struct ExposeArgs {
    /// The ports, as for `up --expose`.
    #[arg(value_name = "[BIND:]REMOTE_PORT[:LOCAL_PORT]", required = true)]
    pub specs: Vec<ForwardSpec>,
    /// The session using this TUN device (needed only when several run).
    #[arg(long = "tun", value_name = "NAME")]
    pub tun: Option<String>,
}

/// Options of `mse-vpn env`.
#[derive(Debug, Args)]
pub struct EnvArgs {
    /// Expose this port (kept until the session stops) and print its settings (repeatable;
    /// the first one is the one registered).
    #[arg(long = "expose", value_name = "[BIND:]REMOTE_PORT[:LOCAL_PORT]")]
    pub expose: Vec<ForwardSpec>,
    #[command(flatten)]
    pub team: TeamArgs,
    /// The form to print: shell `export` lines, a .env file, a VS Code launch.json, or an
    /// IntelliJ IDEA run configuration (.run/NAME.run.xml).
    #[arg(long = "format", value_enum, default_value_t, value_name = "FORMAT")]
    pub format: crate::run::format::Format,
    /// The run configuration's name (vscode, intellij).
    #[arg(long = "name", value_name = "NAME", default_value = "mse-vpn")]
    pub name: String,
    /// The app's main class (vscode, intellij).
    #[arg(long = "main-class", value_name = "CLASS")]
    pub main_class: Option<String>,
    /// The IntelliJ module whose classpath runs the app (intellij).
    #[arg(long = "module", value_name = "MODULE")]
    pub module: Option<String>,
    /// The session using this TUN device (needed only when several run).
    #[arg(long = "tun", value_name = "NAME")]
    pub tun: Option<String>,
}

/// Options of `mse-vpn status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the stable JSON document instead of the table (one object per session, in an
    /// array).
    #[arg(long)]
    pub json: bool,
    /// Only the session using this TUN device.
    #[arg(long = "tun", value_name = "NAME")]
    pub tun: Option<String>,
}

/// `mse-vpn up`: the session's options, and how to run it.
#[derive(Debug, Args)]
pub struct UpCommand {
    /// The session's options (shared with `doctor`).
    #[command(flatten)]
    pub args: UpArgs,
    /// Detaching.
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// How `up` runs: in the foreground, or detached.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Detach once the tunnel is up (the exit status says whether it came up); logs go to
    /// --log-file. Stop it with `mse-vpn down`.
    #[arg(long)]
    pub daemon: bool,
    /// Log file of a --daemon session. Default: STATE_DIR/TUN.log.
    #[arg(long, value_name = "FILE", requires = "daemon")]
    pub log_file: Option<PathBuf>,
}

/// The options of `mse-vpn up` that `doctor` checks too.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// A private network to route through the tunnel (repeatable; IPv4 or IPv6).
    /// (Required, here or in the profile.)
    #[arg(long = "cidr", value_name = "CIDR", value_parser = parse_cidr)]
    pub cidrs: Vec<IpNet>,
    /// A network inside a --cidr to keep out of the tunnel (repeatable).
    #[arg(long = "exclude", value_name = "CIDR", value_parser = parse_cidr)]
    pub excludes: Vec<IpNet>,
    /// The SSH jump host: [USER@]HOST[:PORT], or an alias of ~/.ssh/config (required, here
    /// or in the profile).
    #[arg(long, value_name = "[USER@]HOST[:PORT]")]
    pub proxy: Option<JumpHost>,
    /// Private key file (repeatable). Default: the agent, then ~/.ssh/id_ed25519, id_ecdsa,
    /// id_rsa of the invoking user (SUDO_USER under sudo).
    #[arg(short = 'i', long = "identity", value_name = "KEYFILE")]
    pub identity: Vec<PathBuf>,
    /// known_hosts file. Default: ~/.ssh/known_hosts of the invoking user.
    #[arg(long, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
    /// Record the jump host's key in known_hosts if it is not known yet (never accepts a
    /// changed key).
    #[arg(long)]
    pub accept_new_host_key: bool,
    /// MTU of the TUN device. The TUN never leaves this host, so a large MTU is safe and fast.
    #[arg(long, default_value_t = 65_000, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(1280..=65_535))]
    pub mtu: u32,
    /// Name of the TUN device.
    #[arg(long = "tun", default_value = mse_vpn_platform::DEFAULT_TUN, value_name = "NAME")]
    pub tun: String,
    /// Maximum concurrent TCP flows; new connections beyond it are reset.
    #[arg(long, default_value_t = 10_000, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_flows: u64,
    /// Maximum concurrent cloud callers through `--expose` listeners, a budget separate from
    /// --max-flows so that callers can never crowd out this machine's own connections.
    #[arg(long, default_value_t = crate::engine::DEFAULT_MAX_INBOUND as u64, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_inbound: u64,
    /// Maximum channel opens pending at the jump host at once: connections whose destination
    /// has not answered yet, counting those whose app already gave up (the jump host keeps
    /// connecting until its own connect ends). New connections beyond it are reset at once.
    #[arg(long, default_value_t = crate::driver::DEFAULT_MAX_OPENING as u64, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_opening: u64,
    /// MiB that all flows together may hold buffered (SSH receive windows, bytes waiting for
    /// an app or for the channel). As it fills, new window grants shrink, down to 64 KiB per
    /// flow: a few hundred paused downloads (a JVM at a breakpoint) cost at most about this
    /// much, and every flow still progresses.
    #[arg(long, default_value_t = crate::budget::DEFAULT_BUDGET >> 20, value_name = "MIB", value_parser = clap::value_parser!(u64).range(16..=1_048_576))]
    pub memory_budget: u64,
    /// Seconds to wait for the jump host to connect a new flow before resetting it.
    #[arg(long, default_value_t = 10, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=300))]
    pub open_timeout: u64,
    /// Seconds to wait for the SSH connection to the jump host. Default: ConnectTimeout of
    /// the ssh config, else 15.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=300))]
    pub connect_timeout: Option<u64>,
    /// Seconds between SSH keepalives. A link that answers nothing for three intervals is
    /// declared dead (15 s by default), its flows are reset, and it is reconnected. Default:
    /// ServerAliveInterval of the ssh config, else 5.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub keepalive: Option<u64>,
    /// SSH connections to the jump host. Flows are spread over them: each has its own
    /// encryption and window, so parallel bulk flows use more than one core.
    #[arg(long, default_value_t = 4, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=64))]
    pub connections: u64,
    /// Let cloud callers reach a local port: the jump host listens on REMOTE_PORT (on BIND,
    /// default all its addresses) and each caller is connected to LOCAL_PORT (default
    /// REMOTE_PORT) of this machine from the caller's own IP (repeatable). The local app must
    /// listen on 0.0.0.0 (or the TUN address), not only 127.0.0.1.
    #[arg(long = "expose", value_name = "[BIND:]REMOTE_PORT[:LOCAL_PORT]")]
    pub expose: Vec<ForwardSpec>,
    /// The jump host's address that VPC callers use, shown for exposed ports and given to
    /// apps by `mse-vpn run`/`env`. Default: found out from the jump host itself.
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<std::net::IpAddr>,
    /// Reach the jump host through these SSH hosts, in order ([USER@]HOST[:PORT],
    /// comma-separated; `none` for none). Default: ProxyJump of the ssh config.
    #[arg(short = 'J', long = "jump", value_name = "HOPS", value_parser = parse_jump)]
    pub jump: Option<JumpHops>,
    /// Read only this OpenSSH client config file (`none`: none). Default: ~/.ssh/config of
    /// the invoking user, then /etc/ssh/ssh_config.
    #[arg(short = 'F', long = "ssh-config", value_name = "FILE")]
    pub ssh_config: Option<PathBuf>,
    /// Read the password for password / keyboard-interactive login from the first line of
    /// FILE (it must be yours or root's, mode 600). Without it, the password is asked on the
    /// terminal when the jump host offers password login.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// A profile of ~/.config/mse-vpn/config.toml (or /etc/mse-vpn/config.toml) holding
    /// these options; flags given here override it.
    #[arg(value_name = "PROFILE")]
    pub profile: Option<String>,
    /// Split DNS: names in this domain (and under it) resolve through the VPC's resolver
    /// (repeatable). Every other name resolves as before. PTR lookups for the routed CIDRs
    /// go to the VPC resolver too.
    #[arg(long = "dns-domain", value_name = "DOMAIN")]
    pub dns_domains: Vec<crate::dns::DnsDomain>,
    /// The VPC's resolver for --dns-domain names, reached through the tunnel over TCP port 53
    /// (repeatable). Default: the first non-loopback nameserver of the jump host's
    /// /etc/resolv.conf.
    #[arg(long = "dns", value_name = "ADDR", requires = "dns_domains")]
    pub dns_servers: Vec<std::net::IpAddr>,
}

impl UpArgs {
    /// The SSH options these arguments ask for: the flags, over the invoking user's ssh
    /// config for the `--proxy` alias, over the defaults from the invoking user's home.
    pub fn ssh_options(&self, user: &InvokingUser) -> Result<SshOptions, ConfigError> {
        let over = Overrides {
            proxy: self.proxy.clone(),
            identity: self.identity.clone(),
            known_hosts: self.known_hosts.clone(),
            accept_new_host_key: self.accept_new_host_key,
            connect_timeout: self.connect_timeout,
            keepalive: self.keepalive,
            jump: self.jump.clone().map(|h| h.0),
            ssh_config: self.ssh_config.clone(),
            password_file: self.password_file.clone(),
        };
        resolve::ssh_options(&over, user)
    }

    /// What these arguments route and serve.
    pub fn network(&self) -> NetworkConfig {
        NetworkConfig {
            cidrs: self.cidrs.clone(),
            excludes: self.excludes.clone(),
            tun: self.tun.clone(),
            mtu: self.mtu,
            dns: DnsSettings {
                domains: self.dns_domains.clone(),
                servers: self.dns_servers.clone(),
            },
        }
    }

    /// The session these arguments ask for, for `user`. Key and password files are checked
    /// here, so a bad one fails before anything else (as the same error a login would meet).
    pub fn session_config(
        &self,
        user: &InvokingUser,
        state_dir: &std::path::Path,
    ) -> Result<SessionConfig, SetupError> {
        for key in &self.identity {
            crate::ssh::check_key_file(key)?;
        }
        let ssh = self.ssh_options(user)?;
        if let Some(path) = &ssh.password_file {
            crate::ssh::password::read_file(path, user.uid()).map_err(|source| {
                SshError::PasswordFile {
                    path: path.clone(),
                    source,
                }
            })?;
        }
        Ok(SessionConfig {
            ssh,
            network: self.network(),
            user: user.clone(),
            state_dir: state_dir.to_owned(),
            connections: self.connections as usize,
            max_flows: self.max_flows as usize,
            max_inbound: self.max_inbound as usize,
            max_opening: self.max_opening as usize,
            memory_budget: self.memory_budget << 20,
            open_timeout: std::time::Duration::from_secs(self.open_timeout),
            expose: self.expose.clone(),
            advertise: self.advertise,
        })
    }
}

/// Why the arguments do not make a session: the user's input is at fault.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A bad ssh config entry (or alias).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A key or password file that cannot be used.
    #[error(transparent)]
    Ssh(#[from] SshError),
}

/// The `-J` hops, in order (empty for `none`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JumpHops(pub Vec<JumpHost>);

/// Parses `-J`: comma-separated `[USER@]HOST[:PORT]` hops, or `none`.
pub fn parse_jump(s: &str) -> Result<JumpHops, String> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(JumpHops(Vec::new()));
    }
    crate::ssh::config::parse_hops(s)
        .map(JumpHops)
        .map_err(|e| e.to_string())
}

/// Options of `mse-vpn down`.
#[derive(Debug, Args)]
pub struct DownArgs {
    /// Accepted for scripts written for older versions: `down` always undoes what a
    /// session that is no longer running left behind.
    #[arg(long, hide = true)]
    pub force: bool,
    /// Only the session using this TUN device.
    #[arg(long = "tun", value_name = "NAME")]
    pub tun: Option<String>,
}

/// The completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), BIN, &mut script);
    if shell != clap_complete::Shell::Bash {
        return script;
    }
    // clap_complete 4.6 (clap-rs/clap#6421): for a hyphenated binary name the dispatch loop
    // reaches states spelled `mse__vpn__subcmd__up`, but the case arms are spelled
    // `mse__subcmd__vpn__subcmd__up`, so no subcommand's options ever completed. Spell the
    // arms as the loop does (a no-op once clap_complete is fixed).
    String::from_utf8_lossy(&script)
        .replace("mse__subcmd__vpn", "mse__vpn")
        .into_bytes()
}

/// The man page: the top-level page (synopsis, global options), then a section for each
/// command with its synopsis, description, options and examples, all from the definitions
/// `--help` shows.
pub fn man_page() -> std::io::Result<Vec<u8>> {
    let mut top = Cli::command().disable_help_subcommand(true);
    top.build();
    let man = clap_mangen::Man::new(top.clone());
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    page.extend_from_slice(b".SH COMMANDS\n");
    let mut leaves = Vec::new();
    for sub in top.get_subcommands().filter(|c| !c.is_hide_set()) {
        if sub.has_subcommands() {
            leaves.extend(sub.get_subcommands().filter(|c| !c.is_hide_set()).cloned());
        } else {
            leaves.push(sub.clone());
        }
    }
    for sub in leaves {
        // The global options are described once, above.
        let sub = sub.mut_args(|a| if a.is_global_set() { a.hide(true) } else { a });
        let name = sub.get_bin_name().unwrap_or(sub.get_name()).to_owned();
        let man = clap_mangen::Man::new(sub.clone());
        page.extend_from_slice(format!(".SS \"{}\"\n", name.replace('-', "\\-")).as_bytes());
        let mut section = Vec::new();
        man.render_synopsis_section(&mut section)?;
        man.render_description_section(&mut section)?;
        if sub.get_arguments().any(|a| !a.is_hide_set()) {
            man.render_options_section(&mut section)?;
        }
        if sub.get_after_help().is_some() {
            man.render_extra_section(&mut section)?;
        }
        // Within a command's section, its parts are paragraphs, not sections; its examples
        // keep their lines.
        let mut examples = false;
        for line in String::from_utf8_lossy(&section).lines() {
            match line.strip_prefix(".SH ") {
                Some("SYNOPSIS") => {}
                Some("DESCRIPTION") => page.extend_from_slice(b".PP\n"),
                Some("EXTRA") => {
                    page.extend_from_slice(b".PP\n.nf\n");
                    examples = true;
                }
                Some(_) => page.extend_from_slice(b".PP\nOptions:\n"),
                None => {
                    page.extend_from_slice(line.as_bytes());
                    page.push(b'\n');
                }
            }
        }
        if examples {
            page.extend_from_slice(b".fi\n");
        }
    }
    page.extend_from_slice(b".SH \"EXIT STATUS\"\n");
    for (code, meaning) in EXIT_STATUSES {
        page.extend_from_slice(format!(".TP\n{code}\n{}\n", roff_text(meaning)).as_bytes());
    }
    page.extend_from_slice(
        format!(
            ".SH FILES\n.TP\n{}\n{}\n.TP\n{}\n{}\n.TP\n{}\n{}\n",
            roff_text("STATE_DIR/TUN.sock, STATE_DIR/TUN.journal, STATE_DIR/TUN.log"),
            roff_text(
                "A session's control socket, its restore journal (what it changed on the host, \
                 undone by `down`), and the log of a --daemon session. STATE_DIR is /run/mse-vpn, \
                 or --state-dir, or MSE_VPN_STATE_DIR."
            ),
            roff_text("~/.config/mse-vpn/config.toml, /etc/mse-vpn/config.toml"),
            roff_text("Profiles for `up NAME` (`mse-vpn config check` validates them)."),
            roff_text("~/.ssh/config, /etc/ssh/ssh_config, ~/.ssh/known_hosts"),
            roff_text("Read as ssh reads them, for the invoking user (SUDO_USER under sudo)."),
        )
        .as_bytes(),
    );
    Ok(page)
}

/// `text` as a roff text line: backslashes and hyphens escaped, no leading control dot.
fn roff_text(text: &str) -> String {
    let t = text.replace('\\', "\\e").replace('-', "\\-");
    if t.starts_with(['.', '\'']) {
        format!("\\&{t}")
    } else {
        t
    }
}

/// Exit status of a runtime failure not listed below (TUN, routes, a failed `doctor`
/// check, `up` without root, `status` finding what a dead session left).
pub const EXIT_FAILURE: u8 = 1;
/// Exit status of a usage or configuration mistake (clap's own, too).
pub const EXIT_USAGE: u8 = 2;
/// Exit status when the jump host refused the login (keys, passphrase, password).
pub const EXIT_AUTH: u8 = 3;
/// Exit status when the jump host's key is unknown or changed.
pub const EXIT_HOST_KEY: u8 = 4;
/// Exit status when the jump host (or a ProxyJump hop) cannot be resolved or reached in time.
pub const EXIT_UNREACHABLE: u8 = 5;

/// Every exit status and what it means, as the README and the man page list them.
pub const EXIT_STATUSES: [(u8, &str); 6] = [
    (0, "success"),
    (
        EXIT_FAILURE,
        "any other runtime failure: not root, the TUN device, routes, a failed doctor check, \
         a session that died and left changes behind (status)",
    ),
    (
        EXIT_USAGE,
        "usage or configuration mistake: bad flags or values, no --proxy or --cidr, an unknown \
         profile, a bad profile or ssh config entry, a missing config file",
    ),
    (
        EXIT_AUTH,
        "authentication failed: no key or password accepted, wrong passphrase or password, a \
         missing or unusable key or password file",
    ),
    (
        EXIT_HOST_KEY,
        "host key unknown or changed (or known_hosts unusable)",
    ),
    (
        EXIT_UNREACHABLE,
        "the jump host or a ProxyJump hop cannot be resolved (an unknown name or ssh config \
         alias), reached, or did not answer in time",
    ),
];

/// The binary's name, as completions register it.
const BIN: &str = "mse-vpn";

/// Parses a CIDR such as `10.0.0.0/16` or `fd00::/64`. A bare address is refused: it is
/// more often a network whose prefix length was forgotten than the one host it would route;
/// one host is written with an explicit `/32` (`/128`).
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    if let Ok(addr) = s.parse::<std::net::IpAddr>() {
        let host = IpNet::from(addr);
        return Err(format!(
            "'{s}' has no prefix length: write the network with its length (e.g. {s}/16), or {host} for this one host"
        ));
    }
    Err(format!(
        "'{s}' is not a CIDR: expected a network like 10.0.0.0/16 or fd00:1::/64"
    ))
}

pub mod client;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod exit;
pub mod profile;
pub mod rootless;
pub mod up;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn cidrs_parse_v4_v6_and_bare_hosts() {
        assert_eq!(
            parse_cidr("10.0.0.0/16").unwrap().to_string(),
            "10.0.0.0/16"
        );
        assert_eq!(
            parse_cidr("fd00:1::/64").unwrap().to_string(),
            "fd00:1::/64"
        );
        assert_eq!(
            parse_cidr("10.0.3.7/32").unwrap().to_string(),
            "10.0.3.7/32"
        );
        let bare = parse_cidr("10.0.0.0").unwrap_err();
        assert!(
            bare.contains("no prefix length") && bare.contains("10.0.0.0/32"),
            "{bare}"
        );
        assert!(parse_cidr("fd00::1").unwrap_err().contains("fd00::1/128"));
        assert!(
            parse_cidr("10.0.0.0/33")
                .unwrap_err()
                .contains("not a CIDR")
        );
        assert!(parse_cidr("bogus").is_err());
        assert!(parse_cidr("").is_err());
    }

    #[test]
    fn run_takes_the_command_after_its_options() {
        let cli = Cli::try_parse_from([
            "mse-vpn", "run", "--expose", "20880", "--", "java", "-jar", "p.jar", "--expose",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.session.expose.len(), 1);
        assert_eq!(run.command, ["java", "-jar", "p.jar", "--expose"]);
        assert!(!run.starts_session());
        assert!(Cli::try_parse_from(["mse-vpn", "run", "--expose", "1", "--"]).is_err());
        assert!(Cli::try_parse_from(["mse-vpn", "run", "--", "java"]).is_err());
        assert!(Cli::try_parse_from(["mse-vpn", "run", "--expose", "x", "--", "j"]).is_err());
    }

    #[test]
    fn run_with_a_network_or_a_profile_starts_its_own_session() {
        let parse = |args: &[&str]| {
            let mut v = vec!["mse-vpn", "run"];
            v.extend_from_slice(args);
            Cli::try_parse_from(v)
        };
        let Command::Run(run) = parse(&[
            "--cidr",
            "10.0.0.0/16",
            "--proxy",
            "admin@jump",
            "--subscribe-only",
            "--",
            "bash",
        ])
        .unwrap()
        .command
        else {
            panic!("not run")
        };
        assert!(run.starts_session());
        assert_eq!(run.command, ["bash"]);
        assert_eq!(run.session.tun, mse_vpn_platform::DEFAULT_TUN);
        let Command::Run(run) = parse(&[
            "--profile",
            "dev",
            "--expose",
            "20880",
            "--",
            "java",
            "-jar",
            "a.jar",
        ])
        .unwrap()
        .command
        else {
            panic!("not run")
        };
        assert!(run.starts_session());
        assert_eq!(run.session.profile.as_deref(), Some("dev"));
        assert_eq!(run.command, ["java", "-jar", "a.jar"]);
        // Still: a port, or --subscribe-only.
        assert!(parse(&["--cidr", "10.0.0.0/16", "--proxy", "j", "--", "bash"]).is_err());
        // Joining, only --expose and --tun of the session options mean something.
        let matches = |args: &[&str]| {
            let mut v = vec!["mse-vpn", "run"];
            v.extend_from_slice(args);
            let m = Cli::command().try_get_matches_from(v).unwrap();
            session_only_option(m.subcommand_matches("run").unwrap())
        };
        assert_eq!(
            matches(&["--mtu", "1500", "--expose", "1", "--", "j"]),
            Some("--mtu".to_owned())
        );
        assert_eq!(
            matches(&["--tun", "mse1", "--expose", "1", "--", "j"]),
            None
        );
    }

    #[test]
    fn run_and_env_take_the_team_choices_as_typed_values() {
        let parse = |args: &[&str]| {
            let mut v = vec!["mse-vpn"];
            v.extend_from_slice(args);
            Cli::try_parse_from(v)
        };
        let Command::Run(run) = parse(&[
            "run",
            "--tag",
            "alice",
            "--expose",
            "20880",
            "--registry",
            "zookeeper://zk.internal:2181",
            "--",
            "java",
        ])
        .unwrap()
        .command
        else {
            panic!("not run")
        };
        assert_eq!(run.team.tag.unwrap().as_str(), "alice");
        assert!(!run.team.subscribe_only);
        assert_eq!(
            run.registry.unwrap().to_string(),
            "zookeeper://zk.internal:2181"
        );
        // Subscribe only needs no port; without it, a port is required.
        let Command::Run(run) = parse(&["run", "--subscribe-only", "--", "java"])
            .unwrap()
            .command
        else {
            panic!("not run")
        };
        assert!(run.team.subscribe_only && run.session.expose.is_empty());
        assert!(parse(&["run", "--tag", "alice", "--", "java"]).is_err());
        // A tag and registering nothing contradict each other; a bad tag is refused.
        assert!(
            parse(&[
                "run",
                "--tag",
                "a",
                "--subscribe-only",
                "--expose",
                "1",
                "--",
                "j"
            ])
            .is_err()
        );
        assert!(parse(&["run", "--tag", "a b", "--expose", "1", "--", "j"]).is_err());
        assert!(parse(&["run", "--registry", "http://x", "--expose", "1", "--", "j"]).is_err());
        let Command::Env(env) = parse(&[
            "env",
            "--tag",
            "bob",
            "--format",
            "intellij",
            "--main-class",
            "org.example.P",
        ])
        .unwrap()
        .command
        else {
            panic!("not env")
        };
        assert_eq!(env.format, crate::run::format::Format::Intellij);
        assert_eq!(env.team.tag.unwrap().as_str(), "bob");
        assert_eq!(env.main_class.as_deref(), Some("org.example.P"));
        assert_eq!(env.name, "mse-vpn");
        assert!(parse(&["env", "--format", "xml"]).is_err());
    }

    #[test]
    fn up_takes_a_profile_name_and_flags() {
        let cli = Cli::try_parse_from(["mse-vpn", "up", "dev", "--mtu", "1500"]).unwrap();
        let Command::Up(UpCommand { args: up, .. }) = cli.command else {
            panic!("expected up")
        };
        assert_eq!((up.profile.as_deref(), up.mtu), (Some("dev"), 1500));
        assert!(up.proxy.is_none() && up.cidrs.is_empty());
        let cli = Cli::try_parse_from([
            "mse-vpn",
            "up",
            "--cidr",
            "10.0.0.0/16",
            "--cidr",
            "fd00::/64",
            "--proxy",
            "admin@bastion:2222",
        ])
        .unwrap();
        let Command::Up(UpCommand { args: up, .. }) = cli.command else {
            panic!("expected up")
        };
        assert_eq!(up.cidrs.len(), 2);
        assert_eq!(up.proxy.unwrap().port, 2222);
        assert_eq!(up.tun, mse_vpn_platform::DEFAULT_TUN);
        assert_eq!(up.keepalive, None);
        assert!(up.dns_domains.is_empty());
    }

    #[test]
    fn completions_name_every_command_and_the_bash_states_match() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let text = String::from_utf8(completions(shell)).unwrap();
            for word in [
                "up",
                "down",
                "doctor",
                "status",
                "config",
                "proxy",
                "password-file",
            ] {
                assert!(text.contains(word), "{shell:?} completion lacks {word}");
            }
        }
        // Every state the bash script's dispatch loop can reach has a case arm (clap_complete
        // 4.6 spells the arms of a hyphenated binary name differently from the loop).
        let bash = String::from_utf8(completions(clap_complete::Shell::Bash)).unwrap();
        let states: Vec<&str> = bash
            .lines()
            .filter_map(|l| l.trim().strip_prefix("cmd=\""))
            .filter_map(|l| l.strip_suffix('"'))
            .filter(|c| !c.is_empty())
            .collect();
        assert!(states.contains(&"mse__vpn__subcmd__up"), "{states:?}");
        for state in states {
            assert!(
                bash.contains(&format!("\n        {state})\n")),
                "no case arm for {state}"
            );
        }
    }

    #[test]
    fn the_man_page_holds_every_command_and_its_options() {
        let page = String::from_utf8(man_page().unwrap()).unwrap();
        assert!(page.contains(".TH mse-vpn 1"), "{page}");
        for command in [
            "up",
            "down",
            "doctor",
            "status",
            "config check",
            "completions",
            "man",
        ] {
            assert!(
                page.contains(&format!(".SS \"mse\\-vpn {command}\"")),
                "no section for {command}"
            );
        }
        for option in [
            "\\-\\-proxy",
            "\\-\\-connect\\-timeout",
            "\\-\\-dns\\-domain",
            "\\-\\-daemon",
        ] {
            assert!(page.contains(option), "no {option}");
        }
        assert!(
            !page.contains("mse\\-vpn\\-up(1)"),
            "points to a page that does not exist"
        );
        assert!(!page.contains(".SH EXTRA"), "{page}");
    }

    #[test]
    fn jump_hops_parse() {
        let hops = parse_jump("a@h1:2200,h2").unwrap().0;
        assert_eq!(hops.len(), 2);
        assert_eq!(hops[0].to_string(), "a@h1:2200");
        assert_eq!(parse_jump("none").unwrap().0, vec![]);
        let cli = Cli::try_parse_from([
            "mse-vpn",
            "up",
            "--cidr",
            "10.0.0.0/16",
            "--proxy",
            "h",
            "-J",
            "a@h1,h2",
        ])
        .unwrap();
        let Command::Up(UpCommand { args: up, .. }) = cli.command else {
            panic!("expected up")
        };
        assert_eq!(up.jump.unwrap().0.len(), 2);
        assert!(parse_jump("h1,,h2").is_err());
    }

    #[test]
    fn dns_options_parse_to_typed_values() {
        let base = ["mse-vpn", "up", "--cidr", "10.0.0.0/16", "--proxy", "h"];
        let parse = |extra: &[&str]| {
            let argv: Vec<&str> = base.iter().chain(extra).copied().collect();
            Cli::try_parse_from(argv).map(|c| match c.command {
                Command::Up(UpCommand { args: up, .. }) => up,
                _ => panic!("expected up"),
            })
        };
        let up = parse(&[
            "--dns",
            "10.0.0.2",
            "--dns-domain",
            "Internal.",
            "--dns-domain",
            "rds.example.com",
        ])
        .unwrap();
        assert_eq!(
            up.dns_servers,
            ["10.0.0.2".parse::<std::net::IpAddr>().unwrap()]
        );
        let d: Vec<String> = up.dns_domains.iter().map(ToString::to_string).collect();
        assert_eq!(d, ["internal", "rds.example.com"]);
        assert!(parse(&["--dns-domain", "a..b"]).is_err());
        assert!(parse(&["--dns", "not-an-ip", "--dns-domain", "x"]).is_err());
        assert!(
            parse(&["--dns", "10.0.0.2"]).is_err(),
            "--dns alone does nothing: refused"
        );
        assert!(
            parse(&["--dns-domain", "internal"])
                .unwrap()
                .dns_servers
                .is_empty()
        );
    }
}
