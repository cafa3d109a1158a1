//! `mse-vpn run` and `mse-vpn env`: the settings that make a provider app register the
//! address cloud consumers can actually reach (the jump host's VPC address and the exposed
//! port) instead of the laptop's LAN address.
//!
//! | framework | knob | versions |
//! |---|---|---|
//! | Apache Dubbo | env `DUBBO_IP_TO_REGISTRY`, `DUBBO_PORT_TO_REGISTRY` (also as `-D`) | 2.7.2+, 3.x |
//! | Spring Cloud Alibaba, Nacos discovery | `-Dspring.cloud.nacos.discovery.ip` / `.port` (and the relaxed-binding env `SPRING_CLOUD_NACOS_DISCOVERY_IP` / `_PORT`) | Edgware+ (spring-cloud-alibaba 1.5+/2.x+) |
//! | HSF (EDAS / Pandora Boot) | `-Dhsf.server.ip`, `-Dhsf.server.port` | HSF 2.2+ |
//!
//! JVM system properties go through `JAVA_TOOL_OPTIONS`, appended to what the user already set;
//! a property or variable the user set explicitly is kept, never overridden. This module is
//! pure (an environment in, settings out): it owns no sockets and starts no process; the
//! `run` and `env` commands of the CLI ask the session to expose the ports and start the app.

use std::collections::BTreeMap;
use std::net::SocketAddr;

/// One setting for the app, with the framework it is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    /// Environment variable name.
    pub name: String,
    /// Its value.
    pub value: String,
}

/// What [`registration_env`] decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Registration {
    /// Variables to set in the app's environment (including the combined
    /// `JAVA_TOOL_OPTIONS`).
    pub env: Vec<Setting>,
    /// Settings the user already made, which were kept (for a notice).
    pub kept: Vec<String>,
}

/// The JVM system properties for `addr`.
fn properties(addr: SocketAddr) -> [(&'static str, String); 6] {
    let (ip, port) = (addr.ip().to_string(), addr.port().to_string());
    [
        ("DUBBO_IP_TO_REGISTRY", ip.clone()),
        ("DUBBO_PORT_TO_REGISTRY", port.clone()),
        ("spring.cloud.nacos.discovery.ip", ip.clone()),
        ("spring.cloud.nacos.discovery.port", port.clone()),
        ("hsf.server.ip", ip),
        ("hsf.server.port", port),
    ]
}

/// The environment that makes Dubbo, Spring Cloud Alibaba (Nacos) and HSF providers publish
/// `addr` (the jump host's VPC address and the exposed port). `current` is the environment
/// the app would otherwise get.
pub fn registration_env(addr: SocketAddr, current: &BTreeMap<String, String>) -> Registration {
    let mut out = Registration::default();
    let (ip, port) = (addr.ip().to_string(), addr.port().to_string());
    let vars = [
        ("DUBBO_IP_TO_REGISTRY", ip.clone()),
        ("DUBBO_PORT_TO_REGISTRY", port.clone()),
        ("SPRING_CLOUD_NACOS_DISCOVERY_IP", ip.clone()),
        ("SPRING_CLOUD_NACOS_DISCOVERY_PORT", port.clone()),
        ("MSE_VPN_ADVERTISE", addr.to_string()),
    ];
    for (name, value) in vars {
        match current.get(name) {
            Some(v) if v != &value => out.kept.push(format!("{name}={v}")),
            _ => out.env.push(Setting {
                name: name.into(),
                value,
            }),
        }
    }
    let existing = current
        .get("JAVA_TOOL_OPTIONS")
        .map(String::as_str)
        .unwrap_or("");
    let user_set = |prop: &str| {
        existing
            .split_whitespace()
            .find(|w| {
                w.strip_prefix("-D")
                    .is_some_and(|p| p.split('=').next() == Some(prop))
            })
            .map(str::to_owned)
    };
    let mut ours = Vec::new();
    for (prop, value) in properties(addr) {
        match user_set(prop) {
            Some(w) if w != format!("-D{prop}={value}") => out.kept.push(w),
            Some(_) => {}
            None => ours.push(format!("-D{prop}={value}")),
        }
    }
    // The user's own options stay first and unchanged: ours are only appended.
    let joined = match (existing.trim().is_empty(), ours.is_empty()) {
        (true, _) => ours.join(" "),
        (false, true) => existing.to_owned(),
        (false, false) => format!("{existing} {}", ours.join(" ")),
    };
    out.env.push(Setting {
        name: "JAVA_TOOL_OPTIONS".into(),
        value: joined,
    });
    out
}

/// Quotes a value for a POSIX shell (`mse-vpn env` output is meant for `eval`).
pub fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDR: &str = "10.0.0.1:20880";

    fn env_of(r: &Registration) -> BTreeMap<String, String> {
        r.env
            .iter()
            .map(|s| (s.name.clone(), s.value.clone()))
            .collect()
    }

    #[test]
    fn a_clean_environment_gets_every_framework_knob() {
        let r = registration_env(ADDR.parse().unwrap(), &BTreeMap::new());
        let env = env_of(&r);
        assert_eq!(env["DUBBO_IP_TO_REGISTRY"], "10.0.0.1");
        assert_eq!(env["DUBBO_PORT_TO_REGISTRY"], "20880");
        assert_eq!(env["SPRING_CLOUD_NACOS_DISCOVERY_IP"], "10.0.0.1");
        assert_eq!(env["MSE_VPN_ADVERTISE"], "10.0.0.1:20880");
        assert_eq!(
            env["JAVA_TOOL_OPTIONS"],
            "-DDUBBO_IP_TO_REGISTRY=10.0.0.1 -DDUBBO_PORT_TO_REGISTRY=20880 \
             -Dspring.cloud.nacos.discovery.ip=10.0.0.1 -Dspring.cloud.nacos.discovery.port=20880 \
             -Dhsf.server.ip=10.0.0.1 -Dhsf.server.port=20880"
        );
        assert!(r.kept.is_empty());
    }

    #[test]
    fn what_the_user_set_is_kept_and_ours_is_appended() {
        let mut cur = BTreeMap::new();
        cur.insert(
            "JAVA_TOOL_OPTIONS".to_owned(),
            "-Xmx512m -Dhsf.server.port=12200 -Dfoo=bar".to_owned(),
        );
        cur.insert("DUBBO_IP_TO_REGISTRY".to_owned(), "192.168.1.9".to_owned());
        let r = registration_env(ADDR.parse().unwrap(), &cur);
        let env = env_of(&r);
        let jto = &env["JAVA_TOOL_OPTIONS"];
        assert!(
            jto.starts_with("-Xmx512m -Dhsf.server.port=12200 -Dfoo=bar "),
            "{jto}"
        );
        assert!(jto.contains("-Dhsf.server.ip=10.0.0.1"));
        assert!(
            !jto.contains("-Dhsf.server.port=20880"),
            "the user's own value wins"
        );
        assert!(
            !env.contains_key("DUBBO_IP_TO_REGISTRY"),
            "the user's variable is not overridden"
        );
        assert_eq!(
            r.kept,
            vec![
                "DUBBO_IP_TO_REGISTRY=192.168.1.9".to_owned(),
                "-Dhsf.server.port=12200".to_owned()
            ]
        );
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
