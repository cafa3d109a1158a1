//! End-to-end tests of team isolation: a laptop provider that takes only its developer's calls
//! (`mse-vpn run --tag NAME`), an app that calls the cloud and registers nothing
//! (`--subscribe-only`), and the same settings for an IDE (`mse-vpn env --format ...`). Real
//! framework apps (tests/apps, tests/it/frameworks.rs), a real registry in the VPC, a real
//! sshd; every count below is read from the apps' own reports of who answered.
//!
//! The set-up of each: a provider of the same service already runs in the cloud (`cloud-1`),
//! as in every team's shared environment; the developer's laptop provider joins it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::frameworks::{
    App, JUMP, NACOS, VPC_CALLER, ZK, calls, dubbo_zk_providers, field, nacos_instances,
    run_consumer, start_provider, tail, vpc_ns, wait_ready,
};
use crate::harness::{Testbed, Vpn, stderr, stdout};

/// Calls per consumer run: enough that "none" and "all" are not luck.
const N: u32 = 200;

/// Waits (bounded) until `app`'s stderr holds `want`; returns that line.
fn wait_stderr_line(app: &Vpn, want: &str, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        if let Some(l) = app.stderr().lines().find(|l| l.contains(want)) {
            return l.to_owned();
        }
        assert!(
            start.elapsed() < limit,
            "no line with {want:?} within {limit:?}\nstderr:\n{}",
            tail(&app.stderr(), 40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `mse-vpn run ARGS -- ARGV` on the laptop (its output collected).
fn run_on_laptop(tb: &Testbed, args: &[&str], argv: &[String]) -> Vpn {
    let mut full: Vec<&str> = vec!["run"];
    full.extend_from_slice(args);
    full.push("--");
    full.extend(argv.iter().map(String::as_str));
    Vpn::spawn(tb.mse_vpn(&full))
}

/// `N` calls from a consumer in the VPC with `props`; the calls per provider id.
fn vpc_calls(
    tb: &Testbed,
    app: App,
    props: &[(&str, &str)],
    args: &[&str],
) -> BTreeMap<String, u32> {
    let out = run_consumer(tb, &vpc_ns(tb), &app.argv(tb, "consumer", props, args));
    let c = calls(&out);
    assert_eq!(
        (c.ok, c.failed),
        (N, 0),
        "every call answered:\n{}\n{}",
        tail(&stdout(&out), 20),
        tail(&stderr(&out), 40)
    );
    c.providers
}

/// Dubbo over ZooKeeper: 200 untagged calls from the VPC never reach the tagged laptop
/// provider, 200 tagged ones (consumer tag, and per-call attachment) all do, and the laptop
/// sees its callers' VPC address; then `--subscribe-only`: the registry holds no laptop
/// address, and the laptop app's own calls reach the cloud.
fn dubbo_tag_isolation(name: &str, app: App) {
    let tb = Testbed::up(name, &["--with", "zookeeper"]);
    let registry = format!("zookeeper://{ZK}");
    let reg = ("dubbo.registry.address", registry.as_str());
    let (cloud, _) = start_provider(
        &tb,
        &vpc_ns(&tb),
        &app.argv(&tb, "provider", &[reg, ("demo.id", "cloud-1")], &[]),
    );
    let vpn = tb.start(&["10.0.0.0/16"], &[]);

    // Untagged, the laptop provider takes a share of everybody's calls (which `run` says).
    let mut shared = run_on_laptop(
        &tb,
        &["--expose", "20880"],
        &app.argv(&tb, "provider", &[reg, ("demo.id", "laptop")], &[]),
    );
    wait_ready(&mut shared);
    assert!(
        shared
            .stderr()
            .contains("your teammates' consumers will send you a share of THEIR calls"),
        "{}",
        shared.stderr()
    );
    let untagged = vpc_calls(&tb, app, &[reg], &[&N.to_string()]);
    assert!(
        untagged.get("laptop").copied().unwrap_or(0) > N / 5
            && untagged.get("cloud-1").copied().unwrap_or(0) > N / 5,
        "both providers share the calls: {untagged:?}"
    );
    stop_and_unregister(&tb, shared);

    // The developer's provider, tagged: mse-vpn finds the registry on the app's command line
    // and confirms what ZooKeeper holds.
    let mut laptop = run_on_laptop(
        &tb,
        &["--tag", "alice", "--expose", "20880"],
        &app.argv(&tb, "provider", &[reg, ("demo.id", "laptop")], &[]),
    );
    let ready = wait_ready(&mut laptop);
    assert_eq!(
        field(&ready, "registered"),
        Some("10.0.0.1:20880"),
        "{ready}"
    );
    let said = laptop.stderr();
    assert!(
        said.contains(
            "the app registers 10.0.0.1:20880 tagged alice: only calls tagged alice reach it"
        ),
        "{said}"
    );
    assert!(
        !said.contains("teammates"),
        "no teammates notice for a tagged provider: {said}"
    );
    let confirmed = wait_stderr_line(
        &laptop,
        "registered in zookeeper://",
        Duration::from_secs(60),
    );
    assert!(
        confirmed.contains("/dubbo/demo.Greeter/providers -> 10.0.0.1:20880 (dubbo.tag=alice)"),
        "{confirmed}"
    );
    // ZooKeeper's own record, read in the VPC.
    let urls = dubbo_zk_providers(&tb);
    let mine: Vec<&String> = urls
        .iter()
        .filter(|u| u.starts_with("dubbo://10.0.0.1:20880/"))
        .collect();
    assert_eq!(mine.len(), 1, "{urls:?}");
    assert!(mine[0].contains("dubbo.tag=alice"), "{}", mine[0]);

    // A teammate's ordinary consumer: none of its calls reach the laptop.
    let untagged = vpc_calls(&tb, app, &[reg], &[&N.to_string()]);
    assert_eq!(untagged, BTreeMap::from([("cloud-1".to_owned(), N)]));
    // The developer's own consumer, tagged by configuration: every call does.
    let out = run_consumer(
        &tb,
        &vpc_ns(&tb),
        &app.argv(
            &tb,
            "consumer",
            &[reg, ("dubbo.consumer.tag", "alice")],
            &[&N.to_string()],
        ),
    );
    let c = calls(&out);
    assert_eq!((c.ok, c.failed), (N, 0), "{}", tail(&stdout(&out), 20));
    assert_eq!(c.providers, BTreeMap::from([("laptop".to_owned(), N)]));
    assert_eq!(c.callers.into_iter().collect::<Vec<_>>(), [VPC_CALLER]);
    // Tagged per call (the dubbo.tag attachment): every call too.
    let attached = vpc_calls(&tb, app, &[reg], &[&N.to_string(), "alice"]);
    assert_eq!(attached, BTreeMap::from([("laptop".to_owned(), N)]));
    stop_and_unregister(&tb, laptop);

    // Subscribe only: the same provider app registers nothing ...
    let mut quiet = run_on_laptop(
        &tb,
        &["--subscribe-only"],
        &app.argv(&tb, "provider", &[reg, ("demo.id", "laptop")], &[]),
    );
    wait_ready(&mut quiet);
    assert!(
        quiet
            .stderr()
            .contains("the app registers nothing (subscribe only)"),
        "{}",
        quiet.stderr()
    );
    let urls = dubbo_zk_providers(&tb);
    assert!(!urls.iter().any(|u| from_laptop(u)), "{urls:?}");
    if app == App::Dubbo33 {
        // Nor an application-level instance (Dubbo 3 registers both by default).
        for id in crate::frameworks::zk_children(&tb, "/services/greeter-provider") {
            let node = crate::frameworks::zk_json(&tb, &format!("/services/greeter-provider/{id}"));
            let host = node["address"].as_str().unwrap_or_default();
            assert!(!from_laptop(&format!("x://{host}/")), "{node}");
        }
    }
    drop(quiet);
    // ... and a consumer on the laptop, subscribe only, calls the cloud.
    let consumer = run_on_laptop(
        &tb,
        &["--subscribe-only"],
        &app.argv(&tb, "consumer", &[reg], &["20"]),
    );
    let mut consumer = consumer;
    let status = consumer.wait_exit(Duration::from_secs(150));
    let text = consumer.stdout();
    assert!(status.success(), "{text}\n{}", tail(&consumer.stderr(), 40));
    assert!(
        text.contains("summary calls=20 ok=20 failed=0 providers=cloud-1:20"),
        "{text}"
    );
    assert!(text.contains(&format!("caller={JUMP}")), "{text}");
    // Nothing of the laptop in ZooKeeper: no provider, and no consumer entry either.
    let consumers = crate::frameworks::zk_children(&tb, "/dubbo/demo.Greeter/consumers");
    assert!(!consumers.iter().any(|c| from_laptop(c)), "{consumers:?}");
    assert!(!dubbo_zk_providers(&tb).iter().any(|u| from_laptop(u)));
    drop(cloud);
    assert!(vpn.interrupt().success());
}

/// Stops a laptop provider started by `run` (SIGTERM, passed on to the JVM, whose shutdown
/// hook unregisters) and waits until ZooKeeper holds no provider URL of the laptop.
fn stop_and_unregister(tb: &Testbed, mut app: Vpn) {
    app.signal(nix::sys::signal::Signal::SIGTERM);
    app.wait_exit(Duration::from_secs(30));
    let start = Instant::now();
    loop {
        let urls = dubbo_zk_providers(tb);
        let laptop: Vec<&String> = urls.iter().filter(|u| from_laptop(u)).collect();
        if laptop.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "the registry still holds the stopped laptop provider: {laptop:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// True when a registry URL (`proto://HOST[:PORT]/...`) names the laptop: the jump host's
/// VPC address it advertises, or any address outside the VPC (its own LAN or TUN address).
fn from_laptop(url: &str) -> bool {
    let host = url
        .split_once("://")
        .map(|(_, rest)| rest.split(['/', ':', '?']).next().unwrap_or_default())
        .unwrap_or_default();
    host == JUMP || !host.starts_with("10.0.")
}

#[test]
fn dubbo33_zookeeper_a_tagged_laptop_provider_takes_only_tagged_calls() {
    if crate::harness::skip_unless_root() {
        return;
    }
    dubbo_tag_isolation("iso1", App::Dubbo33);
}

#[test]
fn dubbo27_zookeeper_a_tagged_laptop_provider_takes_only_tagged_calls() {
    if crate::harness::skip_unless_root() {
        return;
    }
    dubbo_tag_isolation("iso2", App::Dubbo27);
}

#[test]
fn a_tag_that_dubbo_leaves_out_of_the_registry_is_warned_about() {
    if crate::harness::skip_unless_root() {
        return;
    }
    // Dubbo 3.3 with dubbo.registry.simplified=true: the registered URL loses dubbo.tag, and
    // untagged calls reach the laptop after all. mse-vpn reads the registry and says so.
    let tb = Testbed::up("iso3", &["--with", "zookeeper"]);
    let registry = format!("zookeeper://{ZK}");
    let vpn = tb.start(&["10.0.0.0/16"], &[]);
    let mut laptop = run_on_laptop(
        &tb,
        &[
            "--tag",
            "alice",
            "--expose",
            "20880",
            "--registry",
            &registry,
        ],
        &App::Dubbo33.argv(
            &tb,
            "provider",
            &[
                ("dubbo.registry.address", &registry),
                ("dubbo.registry.simplified", "true"),
                ("demo.id", "laptop"),
            ],
            &[],
        ),
    );
    wait_ready(&mut laptop);
    let warning = wait_stderr_line(&laptop, "WARNING", Duration::from_secs(60));
    assert!(
        warning.contains(
            "holds /dubbo/demo.Greeter/providers -> 10.0.0.1:20880 WITHOUT dubbo.tag=alice"
        ),
        "{warning}"
    );
    assert!(
        warning.contains("dubbo.registry.simplified=false"),
        "{warning}"
    );
    // What the warning says is true: ZooKeeper's record has no tag, and an untagged VPC
    // consumer reaches the laptop.
    let urls = dubbo_zk_providers(&tb);
    assert!(
        urls.iter()
            .any(|u| u.starts_with("dubbo://10.0.0.1:20880/") && !u.contains("dubbo.tag")),
        "{urls:?}"
    );
    let untagged = vpc_calls(
        &tb,
        App::Dubbo33,
        &[("dubbo.registry.address", &registry)],
        &[&N.to_string()],
    );
    assert_eq!(untagged, BTreeMap::from([("laptop".to_owned(), N)]));
    drop(laptop);
    assert!(vpn.interrupt().success());
}

/// Spring Cloud Alibaba (Nacos): the tagged laptop provider registers in cluster NAME;
/// consumers that keep to their own cluster (`spring.cloud.loadbalancer.nacos.enabled=true`
/// and a `cluster-name`, the team's one-time setting) stay off it, and a consumer in cluster
/// NAME reaches only it.
/// Without that setting Spring Cloud LoadBalancer's round robin shares the calls: measured
/// and asserted, so the README's claim stays true.
#[test]
fn spring_nacos_a_tagged_laptop_provider_takes_only_its_clusters_calls() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("iso4", &["--with", "nacos"]);
    let server = ("spring.cloud.nacos.discovery.server-addr", NACOS);
    let (cloud, _) = start_provider(
        &tb,
        &vpc_ns(&tb),
        &App::SpringNacos.argv(
            &tb,
            "provider",
            &[server, ("server.port", "8080"), ("demo.id", "cloud-1")],
            &[],
        ),
    );
    let vpn = tb.start(&["10.0.0.0/16"], &[]);
    let mut laptop = run_on_laptop(
        &tb,
        &["--tag", "alice", "--expose", "18080:8080"],
        &App::SpringNacos.argv(
            &tb,
            "provider",
            &[server, ("server.port", "8080"), ("demo.id", "laptop")],
            &[],
        ),
    );
    let ready = wait_ready(&mut laptop);
    assert_eq!(
        field(&ready, "registered"),
        Some("10.0.0.1:18080"),
        "{ready}"
    );
    let confirmed = wait_stderr_line(&laptop, "registered in nacos://", Duration::from_secs(60));
    assert!(
        confirmed.contains("nacos service greeter -> 10.0.0.1:18080 (cluster alice)"),
        "{confirmed}"
    );
    let mut hosts = nacos_instances(&tb, "greeter");
    hosts.sort();
    assert_eq!(hosts.len(), 2, "{hosts:?}");
    let n = N.to_string();
    let spring_calls = |props: &[(&str, &str)]| {
        let mut all = vec![server, ("demo.calls", n.as_str())];
        all.extend_from_slice(props);
        vpc_calls(&tb, App::SpringNacos, &all, &[])
    };
    let own_cluster = ("spring.cloud.loadbalancer.nacos.enabled", "true");
    // A teammate's consumer that keeps to its cluster: none reach the laptop. (Spring Cloud
    // Alibaba 2025 leaves a consumer's own cluster name blank, and NacosLoadBalancer then
    // calls across clusters: the team names theirs, DEFAULT being where providers land when
    // they name none.)
    assert_eq!(
        spring_calls(&[
            own_cluster,
            ("spring.cloud.nacos.discovery.cluster-name", "DEFAULT")
        ]),
        BTreeMap::from([("cloud-1".to_owned(), N)])
    );
    // The developer's consumer, in cluster alice: all do.
    assert_eq!(
        spring_calls(&[
            own_cluster,
            ("spring.cloud.nacos.discovery.cluster-name", "alice")
        ]),
        BTreeMap::from([("laptop".to_owned(), N)])
    );
    // Plain Spring Cloud LoadBalancer (round robin): the laptop gets a share.
    let shared = spring_calls(&[]);
    assert!(
        shared.get("laptop").copied().unwrap_or(0) > 0
            && shared.get("cloud-1").copied().unwrap_or(0) > 0,
        "{shared:?}"
    );
    drop(laptop);
    drop(cloud);
    assert!(vpn.interrupt().success());
}

/// Prints the settings a JVM got, sorted: system properties of the frameworks as `-Dname=v`,
/// and the frameworks' environment variables as `NAME=v`.
const PRINT_SETTINGS: &str = r#"
public class PrintSettings {
    public static void main(String[] a) {
        java.util.TreeMap<String, String> out = new java.util.TreeMap<>();
        String[] props = {"dubbo.", "DUBBO_", "spring.cloud.", "eureka.", "hsf."};
        for (String k : System.getProperties().stringPropertyNames()) {
            for (String p : props) if (k.startsWith(p)) out.put("-D" + k, System.getProperty(k));
        }
        for (java.util.Map.Entry<String, String> e : System.getenv().entrySet()) {
            String k = e.getKey();
            if ((k.startsWith("DUBBO_") || k.startsWith("SPRING_CLOUD_") || k.startsWith("MSE_VPN_"))
                    && !k.equals("MSE_VPN_STATE_DIR")) out.put(k, e.getValue());
        }
        out.forEach((k, v) -> System.out.println(k + "=" + v));
    }
}
"#;

/// `-Dname=value` words of a VM options string.
fn vm_words(vm: &str) -> Vec<String> {
    vm.split_whitespace().map(str::to_owned).collect()
}

/// What PrintSettings prints when started in the laptop namespace with `vm` options and
/// `env` variables (and nothing else of ours in its environment).
fn jvm_settings(tb: &Testbed, program: &str, vm: &[String], env: &[(String, String)]) -> String {
    let mut argv: Vec<&str> = vec!["timeout", "60", "java"];
    argv.extend(vm.iter().map(String::as_str));
    argv.push(program);
    let mut cmd = tb.cmd_in(&tb.lap(), &argv);
    cmd.env_remove("JAVA_TOOL_OPTIONS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run java");
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
}

#[test]
fn every_env_format_gives_a_jvm_the_same_settings_as_run() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("iso5", &[]);
    let program = tb.dir.join("PrintSettings.java");
    std::fs::write(&program, PRINT_SETTINGS).unwrap();
    let program = program.to_string_lossy().into_owned();
    let vpn = tb.start(&["10.0.0.0/16"], &[]);

    // run: the reference.
    let out = tb
        .mse_vpn(&[
            "run", "--tag", "alice", "--expose", "20883", "--", "java", &program,
        ])
        .env_remove("JAVA_TOOL_OPTIONS")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let by_run = stdout(&out);
    for want in [
        "-DDUBBO_IP_TO_REGISTRY=10.0.0.1",
        "-Ddubbo.provider.tag=alice",
        "-Dspring.cloud.nacos.discovery.cluster-name=alice",
        "-Dspring.cloud.zookeeper.discovery.instance-port=20883",
        "MSE_VPN_TAG=alice",
        "DUBBO_PORT_TO_REGISTRY=20883",
    ] {
        assert!(
            by_run.lines().any(|l| l == want),
            "{want} missing:\n{by_run}"
        );
    }
    assert!(
        stderr(&out).contains("only calls tagged alice reach it"),
        "{}",
        stderr(&out)
    );

    // env adds the port to the session once; later calls use the session's port.
    let env_out = |format: &str, expose: bool| {
        let mut args = vec![
            "env",
            "--tag",
            "alice",
            "--format",
            format,
            "--main-class",
            "PrintSettings",
        ];
        if expose {
            args.extend(["--expose", "20883"]);
        }
        let out = tb
            .mse_vpn(&args)
            .env_remove("JAVA_TOOL_OPTIONS")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "env --format {format}: {}",
            stderr(&out)
        );
        stdout(&out)
    };

    // shell: eval in bash, then the JVM.
    let text = env_out("shell", true);
    let file = tb.dir.join("env.sh");
    std::fs::write(&file, &text).unwrap();
    let script = format!(
        "unset JAVA_TOOL_OPTIONS; eval \"$(cat {})\" && exec java {program}",
        file.display()
    );
    let out = tb.sh(60, &script);
    assert_eq!(stdout(&out), by_run, "shell:\n{text}");

    // dotenv: read back with a dotenv parser.
    let text = env_out("dotenv", false);
    let mut env = Vec::new();
    for item in dotenvy::from_read_iter(text.as_bytes()) {
        env.push(item.expect("a dotenv line"));
    }
    assert_eq!(
        jvm_settings(&tb, &program, &[], &env),
        by_run,
        "dotenv:\n{text}"
    );

    // VS Code: launch.json's vmArgs and env.
    let text = env_out("vscode", false);
    let doc: serde_json::Value = serde_json::from_str(&text).expect("launch.json is JSON");
    let conf = &doc["configurations"][0];
    assert_eq!(conf["mainClass"], "PrintSettings");
    let vm = vm_words(conf["vmArgs"].as_str().unwrap());
    let env: Vec<(String, String)> = conf["env"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(
        jvm_settings(&tb, &program, &vm, &env),
        by_run,
        "vscode:\n{text}"
    );

    // IntelliJ: the run configuration's VM options and environment.
    let text = env_out("intellij", false);
    let doc = roxmltree::Document::parse(&text).expect("the run configuration is XML");
    let conf = doc
        .descendants()
        .find(|n| n.has_tag_name("configuration"))
        .unwrap();
    let vm = conf
        .children()
        .find(|n| n.attribute("name") == Some("VM_PARAMETERS"))
        .and_then(|n| n.attribute("value"))
        .unwrap();
    let env: Vec<(String, String)> = conf
        .descendants()
        .filter(|n| n.has_tag_name("env"))
        .map(|n| {
            (
                n.attribute("name").unwrap().to_owned(),
                n.attribute("value").unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        jvm_settings(&tb, &program, &vm_words(vm), &env),
        by_run,
        "intellij:\n{text}"
    );
    assert!(vpn.interrupt().success());
}
