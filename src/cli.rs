//! The command line: clap definitions, and parsing of every argument into a typed value at
//! the edge (CIDRs, the jump host, the TUN name), so the rest of the program never sees text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;

use crate::reverse::ForwardSpec;
use crate::ssh::config::ConfigError;
use crate::ssh::resolve::{self, Overrides};
use crate::ssh::{InvokingUser, JumpHost, SshOptions};

/// mse-vpn: reach a private cloud network (VPC) from this machine through an SSH jump host.
#[derive(Debug, Parser)]
#[command(name = "mse-vpn", version, about, long_about = None)]
pub struct Cli {
    /// More logging: -v for debug, -vv for trace (RUST_LOG overrides).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Where sessions keep their restore journals and control sockets.
    #[arg(
        long,
        global = true,
        env = "MSE_VPN_STATE_DIR",
        default_value = mse_vpn_platform::DEFAULT_STATE_DIR,
        value_name = "DIR"
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
    Up(UpArgs),
    /// Stop a running session; with --force, also undo what a crashed session left.
    #[command(after_help = "Examples:\n  sudo mse-vpn down\n  sudo mse-vpn down --force")]
    Down(DownArgs),
    /// Check, without changing anything, whether `up` with these options would work: TUN
    /// support, privileges, route conflicts, the jump host, its key, login, and forwarding.
    #[command(
        after_help = "Exit status: 0 when every check passes, 1 when one fails.\n\nExamples:\n  \
        sudo mse-vpn doctor --cidr 10.0.0.0/16 --proxy admin@bastion.example.com"
    )]
    Doctor(UpArgs),
    /// Run a provider app that cloud consumers can call: its ports are exposed on the jump
    /// host while it runs, and it is started (as you, not root) with the settings that make
    /// Dubbo, Spring Cloud Alibaba (Nacos) and HSF register the jump host's VPC address.
    #[command(
        after_help = "Needs a running session (`sudo mse-vpn up ...`). The app must listen on         0.0.0.0 (or the TUN address), not only 127.0.0.1. Exit status: the app's.\n\nExamples:\n          mse-vpn run --expose 20880 -- java -jar provider.jar\n          mse-vpn run --expose 18080:8080 -- ./gradlew bootRun"
    )]
    Run(RunArgs),
    /// Print the registration settings for exposed ports as shell `export` lines (for
    /// `eval`, or to paste into an IDE run configuration).
    #[command(
        after_help = "With --expose the port is added to the session and stays until it         stops; without, the session's first exposed port is used.\n\nExamples:\n          eval \"$(mse-vpn env --expose 20880)\"\n  mse-vpn env"
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
    #[command(after_help = "Examples:\n  mse-vpn status\n  mse-vpn status --json | jq .bytes_down")]
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
    /// Print the man page (roff) built from these definitions.
    #[command(
        hide = true,
        after_help = "Examples:\n  mse-vpn man > mse-vpn.1 && man ./mse-vpn.1"
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

/// Options of `mse-vpn run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// A port of the app to expose on the jump host while it runs (repeatable; the first one
    /// is the one registered).
    #[arg(
        long = "expose",
        value_name = "[BIND:]REMOTE_PORT[:LOCAL_PORT]",
        required = true
    )]
    pub expose: Vec<ForwardSpec>,
    /// The session using this TUN device (needed only when several run).
    #[arg(long = "tun", value_name = "NAME")]
    pub tun: Option<String>,
    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<std::ffi::OsString>,
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

/// Options of `mse-vpn up`.
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
    #[arg(long, default_value_t = 65_000, value_parser = clap::value_parser!(u32).range(1280..=65_535))]
    pub mtu: u32,
    /// Name of the TUN device.
    #[arg(long = "tun", default_value = mse_vpn_platform::DEFAULT_TUN, value_name = "NAME")]
    pub tun: String,
    /// Maximum concurrent TCP flows; new connections beyond it are reset.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_flows: u64,
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
    /// Detach once the tunnel is up (the exit status says whether it came up); logs go to
    /// --log-file. Stop it with `mse-vpn down`.
    #[arg(long)]
    pub daemon: bool,
    /// Log file of a --daemon session. Default: STATE_DIR/TUN.log.
    #[arg(long, value_name = "FILE", requires = "daemon")]
    pub log_file: Option<PathBuf>,
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
    /// Also undo the journaled host changes of sessions that are no longer running
    /// (after a crash or kill -9).
    #[arg(long)]
    pub force: bool,
    /// Only the session using this TUN device.
    #[arg(long = "tun", value_name = "NAME")]
    pub tun: Option<String>,
}

/// Parses a CIDR such as `10.0.0.0/16` or `fd00::/64`; a bare address means that one host.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    if let Ok(addr) = s.parse::<std::net::IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    Err(format!(
        "'{s}' is not a CIDR: expected a network like 10.0.0.0/16 or fd00:1::/64"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

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
        assert_eq!(parse_cidr("10.0.3.7").unwrap().to_string(), "10.0.3.7/32");
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
        assert_eq!(run.expose.len(), 1);
        assert_eq!(run.command, ["java", "-jar", "p.jar", "--expose"]);
        assert!(Cli::try_parse_from(["mse-vpn", "run", "--expose", "1", "--"]).is_err());
        assert!(Cli::try_parse_from(["mse-vpn", "run", "--", "java"]).is_err());
        assert!(Cli::try_parse_from(["mse-vpn", "run", "--expose", "x", "--", "j"]).is_err());
    }

    #[test]
    fn up_takes_a_profile_name_and_flags() {
        let cli = Cli::try_parse_from(["mse-vpn", "up", "dev", "--mtu", "1500"]).unwrap();
        let Command::Up(up) = cli.command else {
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
        let Command::Up(up) = cli.command else {
            panic!("expected up")
        };
        assert_eq!(up.cidrs.len(), 2);
        assert_eq!(up.proxy.unwrap().port, 2222);
        assert_eq!(up.tun, mse_vpn_platform::DEFAULT_TUN);
        assert_eq!(up.keepalive, None);
        assert!(up.dns_domains.is_empty());
    }

    #[test]
    fn completions_and_the_man_page_cover_every_command() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "mse-vpn", &mut out);
            let text = String::from_utf8(out).unwrap();
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
        let mut page = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut page)
            .unwrap();
        let page = String::from_utf8(page).unwrap();
        assert!(
            page.starts_with(".ie") && page.contains(".TH mse-vpn 1"),
            "{page}"
        );
        assert!(page.contains("up") && page.contains("completions"));
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
        let Command::Up(up) = cli.command else {
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
                Command::Up(up) => up,
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
