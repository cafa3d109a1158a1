//! `mse-vpn run` and `mse-vpn env`: the settings that make an app take part in the team's
//! registry the way its developer chose. Three choices, one [`Plan`]:
//!
//! - **expose** (`--expose`): a provider registers the address cloud consumers can actually
//!   reach (the jump host's VPC address and the exposed port) instead of the laptop's LAN
//!   address;
//! - **tag** (`--tag NAME`): it registers as a tagged provider, so that only calls tagged NAME
//!   reach it and teammates' ordinary calls keep going to the cloud's providers;
//! - **subscribe only** (`--subscribe-only`): it consumes cloud services and registers nothing.
//!
//! | framework | address | tag | subscribe only |
//! |---|---|---|---|
//! | Apache Dubbo 2.7.x, 3.x | env + `-D` `DUBBO_IP_TO_REGISTRY`, `DUBBO_PORT_TO_REGISTRY`; 3.x: `dubbo.application.metadata-service-port` = the local port | `dubbo.provider.tag` | `dubbo.registry.register=false` |
//! | Spring Cloud Alibaba, Nacos discovery | `spring.cloud.nacos.discovery.ip` / `.port` (and env) | `.cluster-name`, `.metadata.hint` | `.register-enabled=false` |
//! | Spring Cloud Zookeeper | `spring.cloud.zookeeper.discovery.instance-host` / `-port` | `.metadata.hint` | `.register=false` |
//! | Spring Cloud Netflix Eureka | `eureka.instance.ip-address`, `.prefer-ip-address`, `.non-secure-port` | `eureka.instance.metadata-map.hint` | `eureka.client.register-with-eureka=false` |
//! | Spring Cloud Consul | `spring.cloud.consul.discovery.ip-address`, `.prefer-ip-address`, `.port` | `.metadata.hint` | `.register=false` |
//! | HSF (EDAS / Pandora Boot) | `hsf.server.ip`, `hsf.server.port` | — | — |
//! | anything else | env `MSE_VPN_ADVERTISE` | env `MSE_VPN_TAG` | env `MSE_VPN_SUBSCRIBE_ONLY=1` |
//!
//! JVM system properties go through `JAVA_TOOL_OPTIONS` (appended to what the user already
//! set) or an IDE's VM options ([`format`]); a property or variable the user set explicitly —
//! in the environment, in `JAVA_TOOL_OPTIONS`, or on the app's own command line — is kept,
//! never overridden. This module is pure (an environment in, settings out): it owns no
//! sockets and starts no process.

pub mod format;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

/// A personal routing tag (`--tag NAME`): 1 to 64 ASCII letters, digits, `.`, `_` or `-`,
/// starting with a letter or digit (it ends up in registry URLs, JVM options, XML and shell
/// lines, so nothing there needs quoting).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tag(String);

/// Why a tag was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    /// Empty, or longer than 64 characters.
    #[error("a tag has 1 to 64 characters")]
    Length,
    /// A character outside `[A-Za-z0-9._-]`, or a first character that is not a letter or
    /// digit.
    #[error(
        "a tag is made of letters, digits, '.', '_' and '-', and starts with a letter or digit"
    )]
    Character,
}

impl FromStr for Tag {
    type Err = TagError;

    fn from_str(s: &str) -> Result<Tag, TagError> {
        if s.is_empty() || s.len() > 64 {
            return Err(TagError::Length);
        }
        let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if !s.chars().all(ok) || !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(TagError::Character);
        }
        Ok(Tag(s.to_owned()))
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Tag {
    /// The tag's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How the app takes part in the registry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The address cloud callers use (the jump host's VPC address and the exposed port), when
    /// the app exposes a port and registers.
    pub advertise: Option<SocketAddr>,
    /// The local port the app listens on behind the advertised one (`--expose
    /// REMOTE:LOCAL`).
    pub local_port: Option<u16>,
    /// Register as a provider tagged with this: only calls tagged so reach it.
    pub tag: Option<Tag>,
    /// Register nothing: consume cloud services only.
    pub subscribe_only: bool,
}

impl Plan {
    /// True when the app registers with no tag: every teammate's consumer may then be routed
    /// to it (the notice `run` and `env` give once).
    pub fn shares_teammates_calls(&self) -> bool {
        self.advertise.is_some() && self.tag.is_none() && !self.subscribe_only
    }
}

/// One setting: a JVM system property (without `-D`) or an environment variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    /// The property or variable name.
    pub name: String,
    /// Its value.
    pub value: String,
}

impl Setting {
    fn new(name: &str, value: impl Into<String>) -> Setting {
        Setting {
            name: name.to_owned(),
            value: value.into(),
        }
    }

    /// `-Dname=value`.
    pub fn vm_option(&self) -> String {
        format!("-D{}={}", self.name, self.value)
    }
}

/// What [`settings`] decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// JVM system properties, in the order of the table above.
    pub properties: Vec<Setting>,
    /// Environment variables (other than `JAVA_TOOL_OPTIONS`).
    pub env: Vec<Setting>,
    /// Settings the user already made, which are kept (for a notice).
    pub kept: Vec<String>,
}

/// What the user already set: the environment the app would get, and the app's command line.
#[derive(Clone, Copy, Debug)]
pub struct UserSettings<'a> {
    /// The environment (its `JAVA_TOOL_OPTIONS` included).
    pub env: &'a BTreeMap<String, String>,
    /// The app's command line (`-Dname=value` for a JVM, `--name=value` for Spring Boot).
    pub args: &'a [String],
}

impl UserSettings<'_> {
    /// The user's own setting of property `name`, as written: in `JAVA_TOOL_OPTIONS`, or on
    /// the command line (which a JVM and Spring Boot both let win over `JAVA_TOOL_OPTIONS`).
    fn property(&self, name: &str) -> Option<String> {
        let jto = self
            .env
            .get("JAVA_TOOL_OPTIONS")
            .map(String::as_str)
            .unwrap_or("");
        let is = |w: &&str| {
            [w.strip_prefix("-D"), w.strip_prefix("--")]
                .into_iter()
                .flatten()
                .any(|p| p.split('=').next() == Some(name))
        };
        jto.split_whitespace()
            .chain(self.args.iter().map(String::as_str))
            .find(is)
            .map(str::to_owned)
    }
}

/// The settings of `plan` (see the module's table). What the user already set is kept and
/// listed in [`Settings::kept`] when it differs from ours.
pub fn settings(plan: &Plan, user: UserSettings<'_>) -> Settings {
    let mut props: Vec<Setting> = Vec::new();
    let mut env: Vec<Setting> = Vec::new();
    if let (Some(addr), false) = (plan.advertise, plan.subscribe_only) {
        let (ip, port) = (addr.ip().to_string(), addr.port().to_string());
        env.extend([
            Setting::new("DUBBO_IP_TO_REGISTRY", &ip),
            Setting::new("DUBBO_PORT_TO_REGISTRY", &port),
            Setting::new("SPRING_CLOUD_NACOS_DISCOVERY_IP", &ip),
            Setting::new("SPRING_CLOUD_NACOS_DISCOVERY_PORT", &port),
            Setting::new("MSE_VPN_ADVERTISE", addr.to_string()),
        ]);
        props.extend([
            Setting::new("DUBBO_IP_TO_REGISTRY", &ip),
            Setting::new("DUBBO_PORT_TO_REGISTRY", &port),
            Setting::new("spring.cloud.nacos.discovery.ip", &ip),
            Setting::new("spring.cloud.nacos.discovery.port", &port),
            Setting::new("spring.cloud.zookeeper.discovery.instance-host", &ip),
            Setting::new("spring.cloud.zookeeper.discovery.instance-port", &port),
            Setting::new("eureka.instance.ip-address", &ip),
            Setting::new("eureka.instance.prefer-ip-address", "true"),
            Setting::new("eureka.instance.non-secure-port", &port),
            Setting::new("spring.cloud.consul.discovery.ip-address", &ip),
            Setting::new("spring.cloud.consul.discovery.prefer-ip-address", "true"),
            Setting::new("spring.cloud.consul.discovery.port", &port),
            Setting::new("hsf.server.ip", &ip),
            Setting::new("hsf.server.port", &port),
        ]);
        if let Some(local) = plan.local_port {
            // Dubbo 3 serves its MetadataService (what application-level consumers read
            // first) on a port of its own, the next free one, and registers it under the
            // advertised port: only the exposed port is reachable, so it must share it.
            props.push(Setting::new(
                "dubbo.application.metadata-service-port",
                local.to_string(),
            ));
        }
    }
    if let (Some(tag), false) = (&plan.tag, plan.subscribe_only) {
        let t = tag.as_str();
        env.push(Setting::new("MSE_VPN_TAG", t));
        props.extend([
            Setting::new("dubbo.provider.tag", t),
            Setting::new("spring.cloud.nacos.discovery.cluster-name", t),
            Setting::new("spring.cloud.nacos.discovery.metadata.hint", t),
            Setting::new("spring.cloud.zookeeper.discovery.metadata.hint", t),
            Setting::new("eureka.instance.metadata-map.hint", t),
            Setting::new("spring.cloud.consul.discovery.metadata.hint", t),
        ]);
    }
    if plan.subscribe_only {
        env.push(Setting::new("MSE_VPN_SUBSCRIBE_ONLY", "1"));
        props.extend([
            Setting::new("dubbo.registry.register", "false"),
            Setting::new("spring.cloud.nacos.discovery.register-enabled", "false"),
            Setting::new("spring.cloud.zookeeper.discovery.register", "false"),
            Setting::new("eureka.client.register-with-eureka", "false"),
            Setting::new("spring.cloud.consul.discovery.register", "false"),
        ]);
    }
    let mut out = Settings::default();
    for s in env {
        match user.env.get(&s.name) {
            Some(v) if v != &s.value => out.kept.push(format!("{}={v}", s.name)),
            Some(_) => {}
            None => out.env.push(s),
        }
    }
    for s in props {
        match user.property(&s.name) {
            Some(w) if w != s.vm_option() && w != format!("--{}={}", s.name, s.value) => {
                out.kept.push(w)
            }
            Some(_) => {}
            None => out.properties.push(s),
        }
    }
    out
}

impl Settings {
    /// Our properties as JVM options (`-Dname=value`, space-separated).
    pub fn vm_options(&self) -> String {
        self.properties
            .iter()
            .map(Setting::vm_option)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The environment a process gets (what `run` sets and the shell format exports): our
    /// variables, and `JAVA_TOOL_OPTIONS` = the user's own options first and unchanged, then
    /// ours. No `JAVA_TOOL_OPTIONS` when there is nothing to put in it.
    pub fn process_env(&self, current: &BTreeMap<String, String>) -> Vec<Setting> {
        let mut env = self.env.clone();
        let existing = current
            .get("JAVA_TOOL_OPTIONS")
            .map(|s| s.trim())
            .unwrap_or("");
        let ours = self.vm_options();
        let joined = match (existing.is_empty(), ours.is_empty()) {
            (true, true) => return env,
            (true, false) => ours,
            (false, true) => existing.to_owned(),
            (false, false) => format!("{existing} {ours}"),
        };
        env.push(Setting::new("JAVA_TOOL_OPTIONS", joined));
        env
    }
}

/// Quotes a value for a POSIX shell (`mse-vpn env` output is meant for `eval`).
pub fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// The once-per-run notice for a provider that registers untagged in a shared registry.
pub fn teammates_notice(addr: SocketAddr) -> String {
    format!(
        "this app registers {addr} in the registry your team shares: your teammates' \
         consumers will send you a share of THEIR calls too. To take only your own calls, \
         run it with --tag NAME (Dubbo: only calls tagged NAME come here; Spring Cloud \
         Alibaba: consumers with spring.cloud.loadbalancer.nacos.enabled=true and a \
         spring.cloud.nacos.discovery.cluster-name keep to their own cluster); to call cloud services without registering, use --subscribe-only"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDR: &str = "10.0.0.1:20880";

    fn plan(tag: Option<&str>, subscribe_only: bool) -> Plan {
        Plan {
            advertise: Some(ADDR.parse().unwrap()),
            local_port: Some(20880),
            tag: tag.map(|t| t.parse().unwrap()),
            subscribe_only,
        }
    }

    fn of(settings: &[Setting]) -> BTreeMap<String, String> {
        settings
            .iter()
            .map(|s| (s.name.clone(), s.value.clone()))
            .collect()
    }

    fn none() -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    fn user<'a>(env: &'a BTreeMap<String, String>, args: &'a [String]) -> UserSettings<'a> {
        UserSettings { env, args }
    }

    #[test]
    fn a_clean_environment_gets_every_framework_knob() {
        let env = none();
        let s = settings(&plan(None, false), user(&env, &[]));
        let vars = of(&s.process_env(&env));
        assert_eq!(vars["DUBBO_IP_TO_REGISTRY"], "10.0.0.1");
        assert_eq!(vars["DUBBO_PORT_TO_REGISTRY"], "20880");
        assert_eq!(vars["SPRING_CLOUD_NACOS_DISCOVERY_IP"], "10.0.0.1");
        assert_eq!(vars["MSE_VPN_ADVERTISE"], "10.0.0.1:20880");
        let props = of(&s.properties);
        for (k, v) in [
            ("DUBBO_IP_TO_REGISTRY", "10.0.0.1"),
            ("spring.cloud.nacos.discovery.port", "20880"),
            ("spring.cloud.zookeeper.discovery.instance-host", "10.0.0.1"),
            ("spring.cloud.zookeeper.discovery.instance-port", "20880"),
            ("eureka.instance.ip-address", "10.0.0.1"),
            ("hsf.server.port", "20880"),
            ("dubbo.application.metadata-service-port", "20880"),
        ] {
            assert_eq!(props[k], v, "{k}");
        }
        assert!(
            vars["JAVA_TOOL_OPTIONS"].starts_with(
                "-DDUBBO_IP_TO_REGISTRY=10.0.0.1 -DDUBBO_PORT_TO_REGISTRY=20880 \
                 -Dspring.cloud.nacos.discovery.ip=10.0.0.1"
            ),
            "{}",
            vars["JAVA_TOOL_OPTIONS"]
        );
        assert!(!props.contains_key("dubbo.provider.tag"));
        assert!(!props.contains_key("dubbo.registry.register"));
        assert!(s.kept.is_empty());
        assert!(plan(None, false).shares_teammates_calls());
    }

    #[test]
    fn a_tag_marks_the_provider_in_every_framework_that_has_one() {
        let env = none();
        let s = settings(&plan(Some("alice"), false), user(&env, &[]));
        let props = of(&s.properties);
        assert_eq!(props["dubbo.provider.tag"], "alice");
        assert_eq!(props["spring.cloud.nacos.discovery.cluster-name"], "alice");
        assert_eq!(props["spring.cloud.nacos.discovery.metadata.hint"], "alice");
        assert_eq!(
            props["spring.cloud.zookeeper.discovery.metadata.hint"],
            "alice"
        );
        assert_eq!(props["eureka.instance.metadata-map.hint"], "alice");
        assert_eq!(of(&s.env)["MSE_VPN_TAG"], "alice");
        // Still registers the reachable address.
        assert_eq!(props["DUBBO_IP_TO_REGISTRY"], "10.0.0.1");
        assert!(!plan(Some("alice"), false).shares_teammates_calls());
    }

    #[test]
    fn subscribe_only_turns_registration_off_and_advertises_nothing() {
        let env = none();
        let s = settings(&plan(None, true), user(&env, &[]));
        let props = of(&s.properties);
        assert_eq!(props["dubbo.registry.register"], "false");
        assert_eq!(
            props["spring.cloud.nacos.discovery.register-enabled"],
            "false"
        );
        assert_eq!(props["spring.cloud.zookeeper.discovery.register"], "false");
        assert_eq!(props["eureka.client.register-with-eureka"], "false");
        assert_eq!(props["spring.cloud.consul.discovery.register"], "false");
        assert!(!props.contains_key("DUBBO_IP_TO_REGISTRY"));
        assert!(!props.contains_key("dubbo.provider.tag"));
        assert_eq!(of(&s.env)["MSE_VPN_SUBSCRIBE_ONLY"], "1");
        assert!(!of(&s.env).contains_key("MSE_VPN_ADVERTISE"));
        assert!(!plan(None, true).shares_teammates_calls());
        // Without an exposed port too.
        let bare = Plan {
            subscribe_only: true,
            ..Plan::default()
        };
        assert_eq!(settings(&bare, user(&env, &[])).properties, s.properties);
    }

    #[test]
    fn what_the_user_set_is_kept_and_ours_is_appended() {
        let mut cur = none();
        cur.insert(
            "JAVA_TOOL_OPTIONS".to_owned(),
            "-Xmx512m -Dhsf.server.port=12200 -Dfoo=bar".to_owned(),
        );
        cur.insert("DUBBO_IP_TO_REGISTRY".to_owned(), "192.168.1.9".to_owned());
        let args = [
            "-Ddubbo.provider.tag=bob".to_owned(),
            "-jar".to_owned(),
            "p.jar".to_owned(),
            "--spring.cloud.nacos.discovery.cluster-name=blue".to_owned(),
            // Already what we would set: no notice.
            "--spring.cloud.nacos.discovery.metadata.hint=alice".to_owned(),
        ];
        let s = settings(&plan(Some("alice"), false), user(&cur, &args));
        let env = of(&s.process_env(&cur));
        let jto = &env["JAVA_TOOL_OPTIONS"];
        assert!(
            jto.starts_with("-Xmx512m -Dhsf.server.port=12200 -Dfoo=bar "),
            "{jto}"
        );
        assert!(jto.contains("-Dhsf.server.ip=10.0.0.1"));
        assert!(!jto.contains("-Dhsf.server.port=20880"), "the user's wins");
        assert!(
            !jto.contains("dubbo.provider.tag"),
            "the command line's wins"
        );
        assert!(!jto.contains("cluster-name"));
        assert!(
            !jto.contains("nacos.discovery.metadata.hint"),
            "already ours: not twice"
        );
        assert!(
            !env.contains_key("DUBBO_IP_TO_REGISTRY"),
            "the user's variable is not overridden"
        );
        assert_eq!(
            s.kept,
            [
                "DUBBO_IP_TO_REGISTRY=192.168.1.9",
                "-Dhsf.server.port=12200",
                "-Ddubbo.provider.tag=bob",
                "--spring.cloud.nacos.discovery.cluster-name=blue",
            ]
        );
    }

    #[test]
    fn tags_are_parsed_at_the_edge() {
        for ok in ["alice", "dev-42", "a.b_c", "X"] {
            assert_eq!(ok.parse::<Tag>().unwrap().to_string(), ok);
        }
        assert_eq!("".parse::<Tag>(), Err(TagError::Length));
        assert_eq!("a".repeat(65).parse::<Tag>(), Err(TagError::Length));
        for bad in ["-x", ".x", "a b", "a=b", "a'b", "ä", "a;b"] {
            assert_eq!(bad.parse::<Tag>(), Err(TagError::Character), "{bad}");
        }
    }

    #[test]
    fn nothing_to_set_leaves_java_tool_options_alone() {
        let env = none();
        let s = Settings::default();
        assert!(s.process_env(&env).is_empty());
        let mut cur = none();
        cur.insert("JAVA_TOOL_OPTIONS".into(), "-Xmx1g".into());
        assert_eq!(of(&s.process_env(&cur))["JAVA_TOOL_OPTIONS"], "-Xmx1g");
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
