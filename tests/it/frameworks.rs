//! End-to-end tests with real framework apps (tests/apps, built by `scripts/apps`): Apache
//! Dubbo 2.7.23 and 3.3.6, Spring Cloud 2025.0 with Spring Cloud Alibaba Nacos discovery and
//! with Spring Cloud Zookeeper discovery, against the VPC's real registries (Debian's
//! ZooKeeper, r-nacos), in both directions:
//!
//! - laptop → cloud: a consumer on the laptop, with nothing but `up` running, discovers a
//!   provider in the VPC through the cloud registry and calls it;
//! - cloud → laptop: `mse-vpn run --expose PORT -- java -jar provider.jar` (or
//!   `eval "$(mse-vpn env --expose PORT)"`, as an IDE would) registers the jump host's VPC
//!   address; the registry's own record is read in the VPC, and a consumer there calls the
//!   laptop and is seen from its own VPC address.
//!
//! The apps print one line per event (tests/apps/common: `ready id=.. registered=HOST:PORT`,
//! `call N ok provider=ID caller=ADDR ..`, `summary calls=N ok=N failed=N providers=ID:N,..`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Testbed, Vpn, root, stderr, stdout};

/// A framework test app: one jar, `provider` or `consumer` as its first argument.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum App {
    /// Apache Dubbo 2.7.23, ZooKeeper registry.
    Dubbo27,
    /// Apache Dubbo 3.3.6, ZooKeeper or Nacos registry, dubbo or Triple protocol.
    Dubbo33,
    /// Spring Boot 3.5.7, Spring Cloud 2025.0.0, Spring Cloud Alibaba 2025.0.0.0 Nacos discovery.
    SpringNacos,
    /// Spring Boot 3.5.7, Spring Cloud 2025.0.0 Zookeeper discovery.
    SpringZk,
}

/// The VPC's ZooKeeper (`scripts/testbed --with zookeeper`).
pub(crate) const ZK: &str = "10.0.0.14:2181";
/// The VPC's Nacos server, r-nacos (`scripts/testbed --with nacos`).
pub(crate) const NACOS: &str = "10.0.0.15:8848";
/// The VPC address consumers in the VPC call from (the first address of the VPC's link).
pub(crate) const VPC_CALLER: &str = "10.0.0.10";
/// The jump host's VPC address: what laptop providers register, and where laptop consumers'
/// calls come from as the VPC sees them.
pub(crate) const JUMP: &str = "10.0.0.1";
/// Calls each consumer makes.
pub(crate) const CALLS: u32 = 5;

impl App {
    pub(crate) fn jar(self) -> PathBuf {
        let rel = match self {
            App::Dubbo27 => "tests/apps/dubbo27/target/dubbo27.jar",
            App::Dubbo33 => "tests/apps/dubbo33/target/dubbo33.jar",
            App::SpringNacos => "tests/apps/spring-nacos/target/spring-nacos.jar",
            App::SpringZk => "tests/apps/spring-zk/target/spring-zk.jar",
        };
        let jar = root().join(rel);
        assert!(
            jar.exists(),
            "{} is missing: build the framework apps with `bash scripts/apps` (scripts/setup does)",
            jar.display()
        );
        jar
    }

    fn is_dubbo(self) -> bool {
        matches!(self, App::Dubbo27 | App::Dubbo33)
    }

    /// `java ... -jar APP.jar ROLE ARGS`, with `props` as system properties for Dubbo and as
    /// Spring's `--key=value` arguments for Spring Boot (the way each is usually configured).
    /// Each role of each testbed has a home and temporary directory of its own in the
    /// testbed's directory, as apps on separate hosts would: Dubbo's registry and metadata
    /// caches (`~/.dubbo`), the Nacos client's cache (`~/nacos`) and Tomcat's work
    /// directories are neither shared between tests nor left behind.
    pub(crate) fn argv(
        self,
        tb: &Testbed,
        role: &str,
        props: &[(&str, &str)],
        args: &[&str],
    ) -> Vec<String> {
        let home = tb.dir.join(format!("home-{role}"));
        let tmp = home.join("tmp");
        std::fs::create_dir_all(&tmp).expect("create the app's home");
        // Quick JVM start on 2 shared cores (C1 only, one GC thread, the CDS archive).
        let mut v: Vec<String> = [
            "java",
            "-XX:TieredStopAtLevel=1",
            "-XX:+UseSerialGC",
            "-Xshare:auto",
            "-Xmx256m",
        ]
        .map(String::from)
        .to_vec();
        v.push(format!("-Duser.home={}", home.display()));
        v.push(format!("-Djava.io.tmpdir={}", tmp.display()));
        if self == App::Dubbo27 {
            // Dubbo 2.7 on Java 17: javassist defines its proxy classes through
            // ClassLoader.defineClass (fatal without java.lang); hessian-lite's default
            // serializers reach into BigInteger (a warning per field without java.math).
            v.extend(
                [
                    "--add-opens",
                    "java.base/java.lang=ALL-UNNAMED",
                    "--add-opens",
                    "java.base/java.math=ALL-UNNAMED",
                ]
                .map(String::from),
            );
        }
        if self.is_dubbo() {
            // Two JVMs in one namespace (a VPC provider and consumer) would both want QoS's
            // port 22222 (2.7 and 3.x spell the switch differently); a generous call timeout
            // for cold JVMs on a loaded machine.
            for p in [
                "dubbo.application.qos.enable=false",
                "dubbo.application.qos-enable=false",
                "dubbo.consumer.timeout=15000",
            ] {
                v.push(format!("-D{p}"));
            }
            v.extend(props.iter().map(|(k, val)| format!("-D{k}={val}")));
        }
        v.push("-jar".into());
        v.push(self.jar().to_string_lossy().into_owned());
        v.push(role.into());
        v.extend(args.iter().map(|s| s.to_string()));
        if !self.is_dubbo() {
            v.extend(props.iter().map(|(k, val)| format!("--{k}={val}")));
        }
        v
    }
}

/// The VPC namespace's name.
pub(crate) fn vpc_ns(tb: &Testbed) -> String {
    format!("{}-vpc", tb.name)
}

/// Starts a provider in namespace `ns` and waits for its "ready" line. Apps are SIGKILLed
/// when dropped (a JVM under `mse-vpn run` goes with the testbed's namespaces, whose
/// teardown kills everything in them).
pub(crate) fn start_provider(tb: &Testbed, ns: &str, argv: &[String]) -> (Vpn, String) {
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut app = Vpn::spawn(tb.cmd_in(ns, &argv));
    let ready = wait_ready(&mut app);
    (app, ready)
}

/// Waits (bounded) for an app's `ready ...` line and returns it.
pub(crate) fn wait_ready(app: &mut Vpn) -> String {
    let limit = Duration::from_secs(120);
    let start = Instant::now();
    loop {
        if let Some(line) = app.stdout().lines().find(|l| l.starts_with("ready ")) {
            println!("{line} (after {:?})", start.elapsed());
            return line.to_owned();
        }
        let exited = !app.running();
        assert!(
            start.elapsed() < limit && !exited,
            "the provider was not ready within {limit:?} (exited: {exited})\nstdout:\n{}\nstderr:\n{}",
            app.stdout(),
            tail(&app.stderr(), 60)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last `n` lines of `text`.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The value of `key=` in a line of words.
pub(crate) fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// What a consumer run printed: its summary and the callers its providers saw.
#[derive(Debug)]
pub(crate) struct Calls {
    /// Calls answered.
    pub(crate) ok: u32,
    /// Calls that failed (no provider, refused, timed out).
    pub(crate) failed: u32,
    /// Successful calls per provider id.
    pub(crate) providers: BTreeMap<String, u32>,
    /// The caller addresses the providers reported.
    pub(crate) callers: BTreeSet<String>,
}

/// Parses a consumer's output (panics, with the output, if it has no summary).
pub(crate) fn calls(out: &Output) -> Calls {
    let text = stdout(out);
    let summary = text
        .lines()
        .find(|l| l.starts_with("summary "))
        .unwrap_or_else(|| {
            panic!(
                "the consumer printed no summary (exit {:?})\nstdout:\n{text}\nstderr:\n{}",
                out.status,
                tail(&stderr(out), 60)
            )
        });
    let num = |k| field(summary, k).and_then(|v| v.parse().ok()).unwrap();
    let providers = field(summary, "providers")
        .unwrap_or_default()
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (id, n) = p.rsplit_once(':').unwrap();
            (id.to_owned(), n.parse().unwrap())
        })
        .collect();
    let callers = text
        .lines()
        .filter(|l| l.starts_with("call ") && l.contains(" ok "))
        .filter_map(|l| field(l, "caller").map(str::to_owned))
        .collect();
    let c = Calls {
        ok: num("ok"),
        failed: num("failed"),
        providers,
        callers,
    };
    println!("{summary}; callers seen: {:?}", c.callers);
    c
}

/// Runs a consumer to its end in namespace `ns` (bounded).
pub(crate) fn run_consumer(tb: &Testbed, ns: &str, argv: &[String]) -> Output {
    let mut full = vec!["timeout".to_owned(), "150".to_owned()];
    full.extend_from_slice(argv);
    let full: Vec<&str> = full.iter().map(String::as_str).collect();
    let start = Instant::now();
    let out = tb.cmd_in(ns, &full).output().expect("run a consumer");
    println!("consumer in {ns} ran {:?}", start.elapsed());
    out
}

/// Asserts every call reached provider `id` and the provider saw `caller` calling.
pub(crate) fn assert_all_reached(out: &Output, id: &str, caller: &str) {
    let c = calls(out);
    assert_eq!(
        (c.ok, c.failed),
        (CALLS, 0),
        "every call answered:\n{}\n{}",
        stdout(out),
        tail(&stderr(out), 40)
    );
    assert_eq!(c.providers, BTreeMap::from([(id.to_owned(), CALLS)]));
    assert_eq!(
        c.callers,
        BTreeSet::from([caller.to_owned()]),
        "the provider saw the caller's address"
    );
}

// ----- the registries' own records, read in the VPC -----

/// `zkCli.sh -server 10.0.0.14:2181 CMD PATH` in the VPC (Debian's ZooKeeper client).
fn zk_cli(tb: &Testbed, cmd: &str, path: &str) -> String {
    let out = tb
        .cmd_in(
            &vpc_ns(tb),
            &[
                "timeout",
                "60",
                "/usr/share/zookeeper/bin/zkCli.sh",
                "-server",
                ZK,
                cmd,
                path,
            ],
        )
        .env(
            "CLIENT_JVMFLAGS",
            "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC",
        )
        .output()
        .expect("run zkCli.sh");
    stdout(&out)
}

/// The children of a ZooKeeper node, URL-decoded (empty when it does not exist).
pub(crate) fn zk_children(tb: &Testbed, path: &str) -> Vec<String> {
    let text = zk_cli(tb, "ls", path);
    let Some(list) = text.lines().rev().find(|l| l.starts_with('[')) else {
        return Vec::new();
    };
    list.trim_matches(|c| c == '[' || c == ']')
        .split(", ")
        .filter(|s| !s.is_empty())
        .map(url_decode)
        .collect()
}

/// The JSON content of a ZooKeeper node.
pub(crate) fn zk_json(tb: &Testbed, path: &str) -> Value {
    let text = zk_cli(tb, "get", path);
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON in {path}:\n{text}"));
    serde_json::from_str(line).expect("a JSON node")
}

/// Polls the registry until `read` returns something (records may lag the "ready" line).
pub(crate) fn wait_record<T>(what: &str, mut read: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = read() {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no {what} in the registry within 30 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Decodes `%XX` escapes (Dubbo URL-encodes the provider URLs it puts in ZooKeeper).
fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = s.get(i + 1..i + 3).filter(|_| b[i] == b'%');
        if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The Dubbo provider URLs registered for `demo.Greeter` in ZooKeeper.
pub(crate) fn dubbo_zk_providers(tb: &Testbed) -> Vec<String> {
    zk_children(tb, "/dubbo/demo.Greeter/providers")
}

/// A Nacos service's instances as `ip:port`, from the server's own HTTP API.
pub(crate) fn nacos_instances(tb: &Testbed, service: &str) -> Vec<String> {
    let url = format!("http://{NACOS}/nacos/v1/ns/instance/list?serviceName={service}");
    let out = tb
        .cmd_in(&vpc_ns(tb), &["curl", "-sS", "-m", "10", &url])
        .output()
        .expect("run curl");
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "instance list of {service}: {e}: {}{}",
            stdout(&out),
            stderr(&out)
        )
    });
    doc["hosts"]
        .as_array()
        .map(|hosts| {
            hosts
                .iter()
                .map(|h| format!("{}:{}", h["ip"].as_str().unwrap_or("?"), h["port"]))
                .collect()
        })
        .unwrap_or_default()
}

// ----- the two directions -----

/// How a laptop provider gets mse-vpn's registration settings.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Launch {
    /// `mse-vpn run --expose PORT -- java ...`
    Run,
    /// `eval "$(mse-vpn env --expose PORT)"; java ...` (an IDE's environment).
    Env,
}

/// Starts a provider on the laptop through `mse-vpn run` or `env`, exposing `port` (the same
/// number on the jump host) with `options` (more `run`/`env` options), and waits for its
/// "ready" line.
pub(crate) fn start_laptop_provider(
    tb: &Testbed,
    launch: Launch,
    port: u16,
    options: &[&str],
    argv: &[String],
) -> (Vpn, String) {
    let port = port.to_string();
    let cmd: Command = match launch {
        Launch::Run => {
            let mut args = vec!["run", "--expose", &port];
            args.extend_from_slice(options);
            args.push("--");
            args.extend(argv.iter().map(String::as_str));
            tb.mse_vpn(&args)
        }
        Launch::Env => {
            let quoted: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
            let options: Vec<String> = options.iter().map(|o| shell_quote(o)).collect();
            let script = format!(
                "settings=$({} env --expose {port} {}) && eval \"$settings\" && exec {}",
                crate::harness::bin(),
                options.join(" "),
                quoted.join(" ")
            );
            let mut c = tb.cmd_in(&tb.lap(), &["bash", "-c", &script]);
            c.env("MSE_VPN_STATE_DIR", tb.state_dir());
            c
        }
    };
    let mut app = Vpn::spawn(cmd);
    let ready = wait_ready(&mut app);
    (app, ready)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

// ----- Dubbo 2.7 × ZooKeeper -----

#[test]
fn dubbo27_zookeeper_a_laptop_consumer_calls_a_cloud_provider() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("fw1", &["--with", "zookeeper"]);
    let registry = format!("zookeeper://{ZK}");
    let (provider, ready) = start_provider(
        &tb,
        &vpc_ns(&tb),
        &App::Dubbo27.argv(
            &tb,
            "provider",
            &[
                ("dubbo.registry.address", &registry),
                ("demo.id", "cloud-1"),
            ],
            &[],
        ),
    );
    let registered = field(&ready, "registered").unwrap().to_owned();
    assert!(registered.starts_with("10.0."), "{ready}");
    assert!(
        dubbo_zk_providers(&tb)
            .iter()
            .any(|u| u.starts_with(&format!("dubbo://{registered}/demo.Greeter"))),
        "the VPC provider's own private address is in ZooKeeper"
    );
    let vpn = tb.start(&["10.0.0.0/16"], &[]);
    let out = run_consumer(
        &tb,
        &tb.lap(),
        &App::Dubbo27.argv(
            &tb,
            "consumer",
            &[("dubbo.registry.address", &registry)],
            &[&CALLS.to_string()],
        ),
    );
    // The provider sees the jump host: the call left the tunnel there.
    assert_all_reached(&out, "cloud-1", JUMP);
    drop(provider);
    assert!(vpn.interrupt().success());
}

/// Cloud → laptop for a Dubbo app over ZooKeeper: the provider started on the laptop (by
/// `run`, or after `env`) registers the jump host's VPC address and the exposed port; a VPC
/// consumer (with `consumer_props` too) finds it in ZooKeeper and calls it; the provider sees
/// the consumer's address.
fn dubbo_zk_cloud_calls_laptop(
    name: &str,
    app: App,
    launch: Launch,
    consumer_props: &[(&str, &str)],
) {
    let tb = Testbed::up(name, &["--with", "zookeeper"]);
    let vpn = tb.start(&["10.0.0.0/16"], &[]);
    let registry = format!("zookeeper://{ZK}");
    let props = [
        ("dubbo.registry.address", registry.as_str()),
        ("demo.id", "laptop"),
    ];
    let (provider, ready) = start_laptop_provider(
        &tb,
        launch,
        20880,
        &[],
        &app.argv(&tb, "provider", &props, &[]),
    );
    assert_eq!(
        field(&ready, "registered"),
        Some("10.0.0.1:20880"),
        "{ready}"
    );
    let urls = wait_record("the laptop provider", || {
        let urls = dubbo_zk_providers(&tb);
        (!urls.is_empty()).then_some(urls)
    });
    assert_eq!(urls.len(), 1, "{urls:?}");
    assert!(
        urls[0].starts_with("dubbo://10.0.0.1:20880/demo.Greeter?"),
        "ZooKeeper holds the jump host's address: {}",
        urls[0]
    );
    let mut props = vec![("dubbo.registry.address", registry.as_str())];
    props.extend_from_slice(consumer_props);
    let out = run_consumer(
        &tb,
        &vpc_ns(&tb),
        &app.argv(&tb, "consumer", &props, &[&CALLS.to_string()]),
    );
    assert_all_reached(&out, "laptop", VPC_CALLER);
    drop(provider);
    assert!(vpn.interrupt().success());
}

#[test]
fn dubbo27_zookeeper_a_cloud_consumer_calls_a_provider_started_by_run() {
    if crate::harness::skip_unless_root() {
        return;
    }
    dubbo_zk_cloud_calls_laptop("fw2", App::Dubbo27, Launch::Run, &[]);
}

#[test]
fn dubbo27_zookeeper_a_provider_started_after_env_is_called_like_one_started_by_run() {
    if crate::harness::skip_unless_root() {
        return;
    }
    dubbo_zk_cloud_calls_laptop("fw3", App::Dubbo27, Launch::Env, &[]);
}

// ----- Dubbo 3.3 × ZooKeeper -----

#[test]
fn dubbo33_zookeeper_a_laptop_consumer_finds_the_registry_by_its_private_name() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("fw4", &["--with", "zookeeper,dns"]);
    let (provider, _) = start_provider(
        &tb,
        &vpc_ns(&tb),
        &App::Dubbo33.argv(
            &tb,
            "provider",
            &[
                ("dubbo.registry.address", &format!("zookeeper://{ZK}")),
                ("demo.id", "cloud-1"),
            ],
            &[],
        ),
    );
    // The laptop knows the registry only as zk.internal, a name of the VPC's private zone.
    let vpn = tb.start(
        &["10.0.0.0/16"],
        &["--dns-domain", "internal", "--dns", "10.0.0.13"],
    );
    let out = run_consumer(
        &tb,
        &tb.lap(),
        &App::Dubbo33.argv(
            &tb,
            "consumer",
            &[("dubbo.registry.address", "zookeeper://zk.internal:2181")],
            &[&CALLS.to_string()],
        ),
    );
    assert_all_reached(&out, "cloud-1", JUMP);
    let log = std::fs::read_to_string(tb.dir.join("dnsmasq-vpc.log")).unwrap_or_default();
    assert!(
        log.contains("query[A] zk.internal"),
        "the name was resolved by the VPC's resolver"
    );
    drop(provider);
    assert!(vpn.interrupt().success());
}

#[test]
fn dubbo33_zookeeper_a_cloud_consumer_calls_a_provider_started_by_run() {
    if crate::harness::skip_unless_root() {
        return;
    }
    // The consumer's default (APPLICATION_FIRST) finds the provider both ways, and uses the
    // interface-level record when the application-level one is of no use (below).
    dubbo_zk_cloud_calls_laptop("fw5", App::Dubbo33, Launch::Run, &[]);
}

/// Dubbo 3's own application-level discovery, alone: the consumer learns the provider's
/// services from the provider's MetadataService, at the address and port the instance
/// record names. The laptop provider's MetadataService listens on a port of its own (20881,
/// the next free one, when the app leaves `dubbo.protocol.port` at its default) while
/// `DUBBO_PORT_TO_REGISTRY` advertises it on the exposed port 20880, where the consumer gets
/// "Not found exported service: greeter-provider/org.apache.dubbo.metadata.MetadataService:
/// 1.0.0:20880", and so no provider. `-Ddubbo.application.metadata-service-port=LOCAL_PORT`
/// from `run`/`env` puts the MetadataService on the exposed port (checked by hand with the
/// `dubbo` and `tri` protocols: every call then answered).
#[test]
fn dubbo33_zookeeper_application_level_discovery_reaches_a_provider_started_by_run() {
    if crate::harness::skip_unless_root() {
        return;
    }
    dubbo_zk_cloud_calls_laptop(
        "fw13",
        App::Dubbo33,
        Launch::Run,
        &[(
            "dubbo.application.service-discovery.migration",
            "FORCE_APPLICATION",
        )],
    );
}

// ----- Dubbo 3.3 × Nacos -----

#[test]
fn dubbo33_nacos_triple_a_laptop_consumer_calls_a_cloud_provider() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("fw6", &["--with", "nacos"]);
    let registry = format!("nacos://{NACOS}");
    let (provider, ready) = start_provider(
        &tb,
        &vpc_ns(&tb),
        &App::Dubbo33.argv(
            &tb,
            "provider",
            &[
                ("dubbo.registry.address", &registry),
                ("dubbo.protocol.name", "tri"),
                ("demo.id", "cloud-1"),
            ],
            &[],
        ),
    );
    assert!(ready.contains(" url=tri://"), "{ready}");
    let vpn = tb.start(&["10.0.0.0/16"], &[]);
    let out = run_consumer(
        &tb,
        &tb.lap(),
        &App::Dubbo33.argv(
            &tb,
            "consumer",
            &[("dubbo.registry.address", &registry)],
            &[&CALLS.to_string()],
        ),
    );
    assert_all_reached(&out, "cloud-1", JUMP);
    drop(provider);
    assert!(vpn.interrupt().success());
}

#[test]
fn dubbo33_nacos_a_cloud_consumer_calls_a_provider_started_by_run() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("fw7", &["--with", "nacos"]);
    let vpn = tb.start(&["10.0.0.0/16"], &[]);
    let registry = format!("nacos://{NACOS}");
    let props = [
        ("dubbo.registry.address", registry.as_str()),
        ("demo.id", "laptop"),
    ];
    let (provider, ready) = start_laptop_provider(
        &tb,
        Launch::Run,
        20880,
        &[],
        &App::Dubbo33.argv(&tb, "provider", &props, &[]),
    );
    assert_eq!(
        field(&ready, "registered"),
        Some("10.0.0.1:20880"),
        "{ready}"
    );
    // Nacos's own record: the interface-level service and the application-level instance.
    for service in ["providers:demo.Greeter::", "greeter-provider"] {
        let hosts = wait_record(service, || {
            let h = nacos_instances(&tb, service);
            (!h.is_empty()).then_some(h)
        });
        assert_eq!(hosts, ["10.0.0.1:20880"], "{service}");
    }
    let out = run_consumer(
        &tb,
        &vpc_ns(&tb),
        &App::Dubbo33.argv(
            &tb,
            "consumer",
            &[("dubbo.registry.address", &registry)],
            &[&CALLS.to_string()],
        ),
    );
    assert_all_reached(&out, "laptop", VPC_CALLER);
    drop(provider);
    assert!(vpn.interrupt().success());
}

// ----- Spring Cloud × Nacos -----

/// The Spring apps' Nacos discovery setting.
const SPRING_NACOS: (&str, &str) = ("spring.cloud.nacos.discovery.server-addr", NACOS);

#[test]
fn spring_nacos_a_laptop_consumer_calls_a_cloud_provider_with_openfeign() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("fw8", &["--with", "nacos"]);
    let (provider, ready) = start_provider(
        &tb,
        &vpc_ns(&tb),
        &App::SpringNacos.argv(
            &tb,
            "provider",
            &[
                SPRING_NACOS,
                ("server.port", "8080"),
                ("demo.id", "cloud-1"),
            ],
            &[],
        ),
    );
    let registered = field(&ready, "registered").unwrap().to_owned();
    assert_eq!(nacos_instances(&tb, "greeter"), [registered.as_str()]);
    assert!(
        registered.starts_with("10.0.") && registered.ends_with(":8080"),
        "{ready}"
    );
    let vpn = tb.start(&["10.0.0.0/16"], &[]);
    let calls = CALLS.to_string();
    let out = run_consumer(
        &tb,
        &tb.lap(),
        &App::SpringNacos.argv(
            &tb,
            "consumer",
            &[
                SPRING_NACOS,
                ("demo.calls", &calls),
                ("demo.client", "feign"),
            ],
            &[],
        ),
    );
    assert_all_reached(&out, "cloud-1", JUMP);
    drop(provider);
    assert!(vpn.interrupt().success());
}

/// Cloud → laptop for a Spring Cloud app: the laptop provider (server.port 8080, exposed as
/// 8080) registers 10.0.0.1:8080, checked in the registry by `record`; a VPC consumer
/// (RestTemplate) calls it and the provider sees the consumer's VPC address.
fn spring_cloud_calls_laptop(
    tb: &Testbed,
    app: App,
    launch: Launch,
    registry: (&str, &str),
    record: impl Fn() -> Option<Vec<String>>,
) {
    let vpn = tb.start(&["10.0.0.0/16"], &[]);
    let (provider, ready) = start_laptop_provider(
        tb,
        launch,
        8080,
        &[],
        &app.argv(
            tb,
            "provider",
            &[registry, ("server.port", "8080"), ("demo.id", "laptop")],
            &[],
        ),
    );
    assert_eq!(
        field(&ready, "registered"),
        Some("10.0.0.1:8080"),
        "{ready}"
    );
    let hosts = wait_record("the laptop provider", &record);
    assert_eq!(hosts, ["10.0.0.1:8080"], "the registry's own record");
    let calls = CALLS.to_string();
    let out = run_consumer(
        tb,
        &vpc_ns(tb),
        &app.argv(tb, "consumer", &[registry, ("demo.calls", &calls)], &[]),
    );
    assert_all_reached(&out, "laptop", VPC_CALLER);
    drop(provider);
    assert!(vpn.interrupt().success());
}

#[test]
fn spring_nacos_a_cloud_consumer_calls_a_provider_started_by_run() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("fw9", &["--with", "nacos"]);
    spring_cloud_calls_laptop(&tb, App::SpringNacos, Launch::Run, SPRING_NACOS, || {
        let h = nacos_instances(&tb, "greeter");
        (!h.is_empty()).then_some(h)
    });
}

#[test]
fn spring_nacos_a_provider_started_after_env_is_called_like_one_started_by_run() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("fw10", &["--with", "nacos"]);
    spring_cloud_calls_laptop(&tb, App::SpringNacos, Launch::Env, SPRING_NACOS, || {
        let h = nacos_instances(&tb, "greeter");
        (!h.is_empty()).then_some(h)
    });
}

// ----- Spring Cloud × ZooKeeper -----

/// The Spring Cloud Zookeeper instances of service `greeter`, as `address:port`.
pub(crate) fn spring_zk_instances(tb: &Testbed) -> Vec<String> {
    zk_children(tb, "/services/greeter")
        .iter()
        .map(|id| {
            let node = zk_json(tb, &format!("/services/greeter/{id}"));
            format!(
                "{}:{}",
                node["address"].as_str().unwrap_or("?"),
                node["port"]
            )
        })
        .collect()
}

#[test]
fn spring_zookeeper_a_laptop_consumer_calls_a_cloud_provider_registered_by_private_name() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("fw11", &["--with", "zookeeper,dns"]);
    // Spring Cloud Zookeeper registers the host NAME (reverse DNS of the host's address):
    // the VPC's resolver names the app host 10.0.0.20 greeter.internal. The VPC namespace
    // holds many addresses, so the provider is told which one is its host's, with Spring
    // Cloud's own setting for a multi-homed host.
    let (provider, ready) = start_provider(
        &tb,
        &vpc_ns(&tb),
        &App::SpringZk.argv(
            &tb,
            "provider",
            &[
                ("spring.cloud.zookeeper.connect-string", ZK),
                ("spring.cloud.inetutils.preferred-networks", "10.0.0.20"),
                ("server.port", "8080"),
                ("demo.id", "cloud-1"),
            ],
            &[],
        ),
    );
    assert_eq!(
        field(&ready, "registered"),
        Some("greeter.internal:8080"),
        "{ready}"
    );
    assert_eq!(spring_zk_instances(&tb), ["greeter.internal:8080"]);
    let vpn = tb.start(
        &["10.0.0.0/16"],
        &["--dns-domain", "internal", "--dns", "10.0.0.13"],
    );
    let calls = CALLS.to_string();
    let out = run_consumer(
        &tb,
        &tb.lap(),
        &App::SpringZk.argv(
            &tb,
            "consumer",
            &[
                ("spring.cloud.zookeeper.connect-string", "zk.internal:2181"),
                ("demo.calls", &calls),
            ],
            &[],
        ),
    );
    assert_all_reached(&out, "cloud-1", JUMP);
    let log = std::fs::read_to_string(tb.dir.join("dnsmasq-vpc.log")).unwrap_or_default();
    assert!(log.contains("query[A] greeter.internal"), "{log}");
    drop(provider);
    assert!(vpn.interrupt().success());
}

/// Spring Cloud Zookeeper registers `spring.cloud.zookeeper.discovery.instance-host` /
/// `instance-port` (default: the host's own name or address, and `server.port`), which
/// run/env do not set: the provider registers the laptop's own address (172.31.X.2:8080)
/// and no VPC consumer can reach it. With `-Dspring.cloud.zookeeper.discovery.instance-host=
/// 10.0.0.1 -Dspring.cloud.zookeeper.discovery.instance-port=8080` in JAVA_TOOL_OPTIONS it
/// passes (checked).
#[test]
fn spring_zookeeper_a_cloud_consumer_calls_a_provider_started_by_run() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("fw12", &["--with", "zookeeper"]);
    spring_cloud_calls_laptop(
        &tb,
        App::SpringZk,
        Launch::Run,
        ("spring.cloud.zookeeper.connect-string", ZK),
        || {
            let h = spring_zk_instances(&tb);
            (!h.is_empty()).then_some(h)
        },
    );
}
