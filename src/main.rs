//! The `mse-vpn` command: parses the command line and hands each subcommand to its function
//! in [`mse_vpn::cli`]; turns the error that ends it into one line on stderr and the
//! documented exit status. Everything else (checks, the session, the control socket, what is
//! printed) lives in the library.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches};

use mse_vpn::cli::{
    self, Cli, Command, ConfigCommand, DoctorArgs, EXIT_FAILURE, EXIT_USAGE, UpCommand, client,
    daemon,
};
use mse_vpn_platform as platform;

fn main() -> ExitCode {
    // `mse-vpn run`'s namespace helper (re-executed by it), before anything else: it must
    // still be single-threaded to create a user namespace.
    #[cfg(target_os = "linux")]
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == platform::rootless::INIT_ARG)
    {
        return platform::rootless::init_main();
    }
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
    let sub = matches.subcommand().map(|(_, m)| m).expect("a subcommand");
    if let Command::Run(run) = &mut cli.command {
        run.tun_given = sub.value_source("tun") == Some(clap::parser::ValueSource::CommandLine);
        // Joining the running session, the options of a session of run's own mean nothing.
        if !run.starts_session()
            && let Some(option) = cli::session_only_option(sub)
        {
            eprintln!(
                "mse-vpn: {option} is for a session of run's own: pass --cidr and --proxy (or --profile) too; without them run joins the running session (`sudo mse-vpn up`)"
            );
            return ExitCode::from(EXIT_USAGE);
        }
    }
    let profiled = match &mut cli.command {
        Command::Up(UpCommand { args, .. }) | Command::Doctor(DoctorArgs { args, .. }) => {
            Some(args)
        }
        Command::Run(run) if run.starts_session() => Some(&mut run.session),
        _ => None,
    };
    if let Some(args) = profiled
        && let Err(e) = cli::config::with_profile(args, sub)
    {
        eprintln!("mse-vpn: {}", mse_vpn::logging::one_line(e.chain()));
        return ExitCode::from(EXIT_USAGE);
    }
    // A `run` session of its own keeps its control socket in the user's directory unless a
    // state directory was named; `status` looks there too.
    let state_named =
        matches.value_source("state_dir") != Some(clap::parser::ValueSource::DefaultValue);
    let runs_dir = if state_named {
        Some(cli.state_dir.clone())
    } else {
        cli::rootless::user_state_dir()
    };
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
        if !daemon::is_child() {
            return daemon::daemonize(args, daemon.log_file.as_deref(), &cli.state_dir);
        }
        // The child: a session of its own, so the terminal's hangup and Ctrl-C do not reach
        // it.
        platform::process::detach();
    }
    // A daemon's log file needs the time of each line; a terminal and journald do not.
    mse_vpn::logging::init(cli.verbose, daemon::is_child());
    // Flow buffers (512 KiB each) straight from mmap: idle flows then cost only the pages
    // they touch. Below the threshold stay the hot path's 64 KiB chunks, which must not pay
    // an mmap/munmap each.
    platform::sys::pin_mmap_threshold(256 * 1024);
    // Free memory at the heap's top is kept up to 16 MiB between the trims after flows close
    // (the hot path's buffers then stop faulting pages in and out).
    platform::sys::pin_trim_threshold(16 << 20);
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
                let log = (daemon.daemon && daemon::is_child())
                    .then(|| daemon::log_path(&args, daemon.log_file.as_deref(), &cli.state_dir));
                ok(cli::up::up(args, &cli.state_dir, log.as_deref()).await)
            }
            Command::Down(args) => ok(client::down(args, &cli.state_dir).await),
            Command::Doctor(args) => ok(cli::doctor::doctor(args, &cli.state_dir).await),
            Command::Status(args) => {
                client::status(args, &cli.state_dir, runs_dir.as_deref()).await
            }
            Command::Run(args) if args.starts_session() => {
                let dir = runs_dir.unwrap_or_else(|| cli.state_dir.clone());
                cli::rootless::run(args, &dir).await
            }
            Command::Run(args) => client::run(args, &cli.state_dir).await,
            Command::Env(args) => ok(client::env(args, &cli.state_dir).await),
            Command::Expose(args) => ok(client::expose(args, &cli.state_dir).await),
            Command::Unexpose(args) => ok(client::unexpose(args, &cli.state_dir).await),
            Command::Config(ConfigCommand::Check { file }) => ok(cli::config::config_check(file)),
            Command::Completions(_) | Command::Man => Ok(ExitCode::SUCCESS),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mse-vpn: {}", mse_vpn::logging::one_line(e.chain()));
            ExitCode::from(cli::exit::exit_code(&e))
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
