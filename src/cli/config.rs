//! Profiles as commands use them: `up NAME` / `doctor NAME` take a profile's settings under
//! the flags given ([`with_profile`]), and `config check` parses the profile files and lists
//! what they hold ([`config_check`]). The files themselves are [`super::profile`]'s.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use super::UpArgs;
use super::profile::{self, ProfileError};
use crate::ssh;

/// Applies the profile named on the command line (flags win), then checks that the jump
/// host and at least one CIDR are known. Profiles skipped for errors are warned about on
/// stderr.
pub fn with_profile(args: &mut UpArgs, matches: &clap::ArgMatches) -> Result<()> {
    if let Some(name) = args.profile.clone() {
        let user = ssh::InvokingUser::detect().context("cannot tell which user invoked mse-vpn")?;
        let files = [
            profile::user_file(user.home()),
            PathBuf::from(profile::SYSTEM_FILE),
        ];
        let (found, skipped) = profile::find(&name, &files)?;
        for e in skipped {
            eprintln!("mse-vpn: warning: {e} (that profile is ignored)");
        }
        profile::apply(args, matches, &found, user.home());
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
pub fn config_check(file: Option<PathBuf>) -> Result<()> {
    let files = match file {
        Some(f) => {
            if let Err(source) = std::fs::metadata(&f) {
                return Err(ProfileError::Read { path: f, source }.into());
            }
            vec![f]
        }
        None => {
            let user =
                ssh::InvokingUser::detect().context("cannot tell which user invoked mse-vpn")?;
            vec![
                profile::user_file(user.home()),
                PathBuf::from(profile::SYSTEM_FILE),
            ]
        }
    };
    for f in files {
        if !f.exists() {
            println!("{}: no such file (skipped)", f.display());
            continue;
        }
        let parsed = profile::load(&f)?;
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
