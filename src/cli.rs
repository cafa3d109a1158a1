//! The command line: clap definitions, and parsing of every argument into a typed value at
//! the edge (CIDRs, the jump host, the TUN name), so the rest of the program never sees text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;

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
        default_value = "/run/mse-vpn",
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
        sudo mse-vpn up --cidr 10.0.0.0/16 --cidr fd00:1::/64 --exclude 10.0.9.0/24 --proxy ops@203.0.113.7:2222 -i ~/.ssh/id_ed25519")]
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
    /// Show the state of running sessions (no root needed for the user who started them).
    #[command(after_help = "Examples:\n  mse-vpn status\n  mse-vpn status --json | jq .bytes_down")]
    Status(StatusArgs),
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
    #[arg(long = "cidr", value_name = "CIDR", required = true, value_parser = parse_cidr)]
    pub cidrs: Vec<IpNet>,
    /// A network inside a --cidr to keep out of the tunnel (repeatable).
    #[arg(long = "exclude", value_name = "CIDR", value_parser = parse_cidr)]
    pub excludes: Vec<IpNet>,
    /// The SSH jump host: [USER@]HOST[:PORT].
    #[arg(long, value_name = "[USER@]HOST[:PORT]")]
    pub proxy: JumpHost,
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
    #[arg(long = "tun", default_value = "mse0", value_name = "NAME")]
    pub tun: String,
    /// Maximum concurrent TCP flows; new connections beyond it are reset.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_flows: u64,
    /// Seconds to wait for the jump host to connect a new flow before resetting it.
    #[arg(long, default_value_t = 10, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=300))]
    pub open_timeout: u64,
    /// Seconds to wait for the SSH connection to the jump host.
    #[arg(long, default_value_t = 15, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=300))]
    pub connect_timeout: u64,
    /// Seconds between SSH keepalives. A link that answers nothing for three intervals is
    /// declared dead (15 s by default), its flows are reset, and it is reconnected.
    #[arg(long, default_value_t = 5, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub keepalive: u64,
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
    /// The SSH options these arguments ask for, with defaults from the invoking user's home.
    pub fn ssh_options(&self, user: &InvokingUser) -> SshOptions {
        SshOptions {
            user: self
                .proxy
                .user
                .clone()
                .unwrap_or_else(|| user.name().to_owned()),
            identity_files: if self.identity.is_empty() {
                user.default_identity_files()
            } else {
                self.identity.clone()
            },
            known_hosts: self
                .known_hosts
                .clone()
                .unwrap_or_else(|| user.known_hosts_path()),
            accept_new_host_key: self.accept_new_host_key,
            connect_timeout: std::time::Duration::from_secs(self.connect_timeout),
            keepalive_interval: std::time::Duration::from_secs(self.keepalive),
            keepalive_max: 2,
            window_size: 4 * 1024 * 1024,
            agent_socket: user.agent_socket(),
            file_owner: Some((user.uid(), user.gid())),
            jump: self.proxy.clone(),
        }
    }
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
    fn up_requires_a_cidr_and_a_proxy() {
        assert!(Cli::try_parse_from(["mse-vpn", "up", "--proxy", "h"]).is_err());
        assert!(Cli::try_parse_from(["mse-vpn", "up", "--cidr", "10.0.0.0/16"]).is_err());
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
        assert_eq!(up.proxy.port, 2222);
        assert_eq!(up.tun, "mse0");
        assert!(up.dns_domains.is_empty());
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
