//! `mse-vpn doctor`: prints what it checks and each check's verdict; the checks are
//! [`crate::doctor`]'s.

use std::path::Path;

use anyhow::{Result, bail};

use super::DoctorArgs;

/// `doctor`: the read-only checks of what `up` (or, with --rootless, `run` without root)
/// would need, one line each.
pub async fn doctor(args: DoctorArgs, state_dir: &Path) -> Result<()> {
    let DoctorArgs { rootless, args } = args;
    println!(
        "mse-vpn doctor: checking `{}` to {} via {} (read-only)",
        if rootless { "run" } else { "up" },
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
    let checks = crate::doctor::run(
        |user| args.ssh_options(user),
        &args.network(),
        state_dir,
        rootless,
    )
    .await;
    for c in &checks {
        println!("  {c}");
    }
    let failed = checks
        .iter()
        .filter(|c| c.verdict == crate::doctor::Verdict::Fail)
        .count();
    if failed > 0 {
        bail!("{failed} check(s) failed");
    }
    println!("all checks passed");
    Ok(())
}
