//! `doctor --rootless`: what `run` without root needs on this machine (Linux): user
//! namespaces open to ordinary users, `/dev/net/tun` open to this user, and, as the real
//! test, an app's namespace made and removed again (the TUN, its addresses and routes, and
//! the private resolv.conf with --dns-domain) exactly as `run` would make it. Nothing on the
//! host changes: the namespace and its TUN go away with the helper, which never starts an
//! app.

use super::{Check, Verdict};
use crate::session::NetworkConfig;

/// The checks, in order; a failed one skips the trial namespace.
#[cfg(target_os = "linux")]
pub fn checks(network: &NetworkConfig) -> Vec<Check> {
    use mse_vpn_platform::rootless::{Namespace, NamespaceError, NetnsSpec, UsernsSysctls};
    use mse_vpn_platform::{PlanSpec, RoutePlan};

    let mut out = Vec::new();
    let sysctls = UsernsSysctls::read();
    let users = match sysctls.blocker() {
        Some(b) => Check::new("user namespaces", Verdict::Fail, b.to_string())
            .fix("change the setting named, or use `sudo mse-vpn up` (the whole machine)"),
        None => Check::new(
            "user namespaces",
            Verdict::Ok,
            match sysctls.max_user_namespaces {
                Some(n) => format!("open to ordinary users (user.max_user_namespaces = {n})"),
                None => "open to ordinary users".to_owned(),
            },
        ),
    };
    let users_ok = users.verdict == Verdict::Ok;
    out.push(users);
    let tun = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        // Opening the clone device creates nothing until TUNSETIFF.
        Ok(_) => Check::new("tun", Verdict::Ok, "/dev/net/tun is open to you"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Check::new("tun", Verdict::Fail, NamespaceError::TunMissing.to_string())
        }
        Err(e) => Check::new(
            "tun",
            Verdict::Fail,
            NamespaceError::TunDenied(e).to_string(),
        ),
    };
    let tun_ok = tun.verdict == Verdict::Ok;
    out.push(tun);
    if !(users_ok && tun_ok) {
        out.push(Check::new(
            "app namespace",
            Verdict::Skipped,
            "user namespaces or the TUN device are not available",
        ));
        return out;
    }
    let plan = RoutePlan::new(PlanSpec {
        cidrs: network.cidrs.clone(),
        excludes: network.excludes.clone(),
        jump_addrs: Vec::new(),
        tun_name: network.tun.clone(),
        mtu: network.mtu,
    });
    let spec = match plan {
        // As `run` makes it: every destination through the session, names through its
        // responder.
        Ok(plan) => NetnsSpec::new(&plan, true, true),
        Err(e) => {
            out.push(Check::new("app namespace", Verdict::Fail, e.to_string()));
            return out;
        }
    };
    // The helper waits for a go that never comes: dropping the handle ends it.
    let trial = Namespace::create(&spec, &["true".into()]);
    out.push(match trial {
        Ok(ns) => {
            drop(ns);
            Check::new(
                "app namespace",
                Verdict::Ok,
                format!("made and removed a trial one: {spec}"),
            )
        }
        Err(e) => Check::new("app namespace", Verdict::Fail, e.to_string()),
    });
    out
}

/// No unprivileged network namespaces here.
#[cfg(not(target_os = "linux"))]
pub fn checks(_network: &NetworkConfig) -> Vec<Check> {
    vec![Check::new(
        "rootless",
        Verdict::Fail,
        mse_vpn_platform::rootless::NamespaceError::Unsupported.to_string(),
    )]
}
