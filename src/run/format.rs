//! The forms `mse-vpn env --format` prints [`Settings`] in, each the one its consumer reads
//! with no plug-in:
//!
//! - `shell`: `export` lines for `eval` (`JAVA_TOOL_OPTIONS` keeps the user's own options
//!   first, as `run` does);
//! - `dotenv`: a `.env` file (docker compose, VS Code's `envFile`, IntelliJ's EnvFile,
//!   spring-dotenv): `NAME="VALUE"` lines, the JVM properties in `JAVA_TOOL_OPTIONS`;
//! - `vscode`: a `.vscode/launch.json` with one Java configuration: `vmArgs` and `env`;
//! - `intellij`: a `.run/NAME.run.xml` Application run configuration, which IntelliJ IDEA
//!   reads from the project directory: `VM_PARAMETERS` and `envs`.
//!
//! The IDE forms carry only mse-vpn's settings (the IDE starts the app with its own
//! environment, not this shell's). Pure: text out, nothing written.

use std::collections::BTreeMap;

use super::{Settings, shell_quote};

/// An output form of `mse-vpn env`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `export NAME='VALUE'` lines, for `eval "$(mse-vpn env ...)"`.
    #[default]
    Shell,
    /// A `.env` file: `NAME="VALUE"` lines.
    Dotenv,
    /// A VS Code `.vscode/launch.json` (Java): `vmArgs` and `env`.
    Vscode,
    /// An IntelliJ IDEA run configuration (`.run/NAME.run.xml`): VM options and environment.
    Intellij,
}

/// What an IDE run configuration needs besides the settings.
#[derive(Clone, Copy, Debug)]
pub struct Launch<'a> {
    /// The configuration's name.
    pub name: &'a str,
    /// The app's main class (VS Code: `${file}`, the open file, when unset; IntelliJ: chosen
    /// in the dialog).
    pub main_class: Option<&'a str>,
    /// IntelliJ's module (the classpath of the configuration), if given.
    pub module: Option<&'a str>,
}

/// `settings` in `format`, with `notes` as comments where the form has them (not in JSON).
/// `current` is the environment of the shell `env` runs in (its `JAVA_TOOL_OPTIONS`).
pub fn render(
    format: Format,
    settings: &Settings,
    current: &BTreeMap<String, String>,
    launch: Launch<'_>,
    notes: &[String],
) -> String {
    match format {
        Format::Shell => shell(settings, current, notes),
        Format::Dotenv => dotenv(settings, notes),
        Format::Vscode => vscode(settings, launch),
        Format::Intellij => intellij(settings, launch, notes),
    }
}

fn comments(notes: &[String]) -> String {
    notes.iter().map(|n| format!("# {n}\n")).collect()
}

fn shell(settings: &Settings, current: &BTreeMap<String, String>, notes: &[String]) -> String {
    let mut out = comments(notes);
    for s in settings.process_env(current) {
        out.push_str(&format!("export {}={}\n", s.name, shell_quote(&s.value)));
    }
    out
}

/// A double-quoted `.env` value: `\` and `"` escaped, and `$` too (dotenv parsers expand
/// `${VAR}` in double quotes).
fn dotenv_quote(value: &str) -> String {
    let mut q = String::from("\"");
    for c in value.chars() {
        match c {
            '\\' | '"' | '$' => {
                q.push('\\');
                q.push(c);
            }
            '\n' => q.push_str("\\n"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

fn dotenv(settings: &Settings, notes: &[String]) -> String {
    let mut out = comments(notes);
    let mut vars = settings.env.clone();
    let vm = settings.vm_options();
    if !vm.is_empty() {
        vars.push(super::Setting::new("JAVA_TOOL_OPTIONS", vm));
    }
    for s in vars {
        out.push_str(&format!("{}={}\n", s.name, dotenv_quote(&s.value)));
    }
    out
}

fn vscode(settings: &Settings, launch: Launch<'_>) -> String {
    let env: serde_json::Map<String, serde_json::Value> = settings
        .env
        .iter()
        .map(|s| (s.name.clone(), s.value.clone().into()))
        .collect();
    let config = serde_json::json!({
        "type": "java",
        "name": launch.name,
        "request": "launch",
        "mainClass": launch.main_class.unwrap_or("${file}"),
        "vmArgs": settings.vm_options(),
        "env": env,
    });
    let doc = serde_json::json!({ "version": "0.2.0", "configurations": [config] });
    let mut text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    text.push('\n');
    text
}

/// `value` escaped for an XML attribute.
fn xml_attr(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' => out.push_str("&#10;"),
            c => out.push(c),
        }
    }
    out
}

fn intellij(settings: &Settings, launch: Launch<'_>, notes: &[String]) -> String {
    let mut out = String::from("<component name=\"ProjectRunConfigurationManager\">\n");
    for n in notes {
        // "--" may not appear inside an XML comment.
        out.push_str(&format!("  <!-- {} -->\n", n.replace("--", "- -")));
    }
    out.push_str(&format!(
        "  <configuration default=\"false\" name=\"{}\" type=\"Application\" factoryName=\"Application\">\n",
        xml_attr(launch.name)
    ));
    if let Some(main) = launch.main_class {
        out.push_str(&format!(
            "    <option name=\"MAIN_CLASS_NAME\" value=\"{}\" />\n",
            xml_attr(main)
        ));
    }
    if let Some(module) = launch.module {
        out.push_str(&format!("    <module name=\"{}\" />\n", xml_attr(module)));
    }
    out.push_str(&format!(
        "    <option name=\"VM_PARAMETERS\" value=\"{}\" />\n",
        xml_attr(&settings.vm_options())
    ));
    if !settings.env.is_empty() {
        out.push_str("    <envs>\n");
        for s in &settings.env {
            out.push_str(&format!(
                "      <env name=\"{}\" value=\"{}\" />\n",
                xml_attr(&s.name),
                xml_attr(&s.value)
            ));
        }
        out.push_str("    </envs>\n");
    }
    out.push_str(
        "    <method v=\"2\">\n      <option name=\"Make\" enabled=\"true\" />\n    </method>\n",
    );
    out.push_str("  </configuration>\n</component>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::super::{Plan, UserSettings, settings as make};
    use super::*;

    fn sample() -> Settings {
        let plan = Plan {
            advertise: Some("10.0.0.1:20880".parse().unwrap()),
            local_port: Some(20880),
            tag: Some("alice".parse().unwrap()),
            subscribe_only: false,
        };
        let env = BTreeMap::new();
        make(
            &plan,
            UserSettings {
                env: &env,
                args: &[],
            },
        )
    }

    const LAUNCH: Launch<'static> = Launch {
        name: "provider <dev> & \"mse\"",
        main_class: Some("org.example.Provider"),
        module: Some("provider"),
    };

    fn notes() -> Vec<String> {
        vec!["mse-vpn: register 10.0.0.1:20880 --tag alice".to_owned()]
    }

    /// The settings as a map: name → value, properties as `-Dname` keys.
    fn expected(s: &Settings) -> BTreeMap<String, String> {
        let mut m: BTreeMap<String, String> = s
            .env
            .iter()
            .map(|v| (v.name.clone(), v.value.clone()))
            .collect();
        for p in &s.properties {
            m.insert(format!("-D{}", p.name), p.value.clone());
        }
        m
    }

    /// `-Dname=value` words of a VM options string, as map entries.
    fn vm_entries(vm: &str, into: &mut BTreeMap<String, String>) {
        for w in vm.split_whitespace() {
            let (k, v) = w.split_once('=').expect("-Dname=value");
            into.insert(k.to_owned(), v.to_owned());
        }
    }

    #[test]
    fn intellij_prints_a_run_configuration_that_parses_as_xml() {
        let s = sample();
        let text = render(Format::Intellij, &s, &BTreeMap::new(), LAUNCH, &notes());
        let doc = roxmltree::Document::parse(&text).expect("well-formed XML");
        let root = doc.root_element();
        assert_eq!(
            root.attribute("name"),
            Some("ProjectRunConfigurationManager")
        );
        let conf = root
            .children()
            .find(|n| n.has_tag_name("configuration"))
            .expect("a configuration");
        assert_eq!(conf.attribute("type"), Some("Application"));
        assert_eq!(conf.attribute("name"), Some(LAUNCH.name));
        let option = |name: &str| {
            conf.children()
                .find(|n| n.has_tag_name("option") && n.attribute("name") == Some(name))
                .and_then(|n| n.attribute("value"))
                .map(str::to_owned)
        };
        assert_eq!(
            option("MAIN_CLASS_NAME").as_deref(),
            Some("org.example.Provider")
        );
        let module = conf.children().find(|n| n.has_tag_name("module")).unwrap();
        assert_eq!(module.attribute("name"), Some("provider"));
        let mut got = BTreeMap::new();
        vm_entries(&option("VM_PARAMETERS").unwrap(), &mut got);
        let envs = conf.children().find(|n| n.has_tag_name("envs")).unwrap();
        for e in envs.children().filter(|n| n.has_tag_name("env")) {
            got.insert(
                e.attribute("name").unwrap().to_owned(),
                e.attribute("value").unwrap().to_owned(),
            );
        }
        assert_eq!(got, expected(&s));
        assert!(!got.contains_key("JAVA_TOOL_OPTIONS"));
    }

    #[test]
    fn vscode_prints_a_launch_json_with_vm_args_and_env() {
        let s = sample();
        let text = render(Format::Vscode, &s, &BTreeMap::new(), LAUNCH, &notes());
        let doc: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(doc["version"], "0.2.0");
        let c = &doc["configurations"][0];
        assert_eq!(c["type"], "java");
        assert_eq!(c["request"], "launch");
        assert_eq!(c["mainClass"], "org.example.Provider");
        let mut got = BTreeMap::new();
        vm_entries(c["vmArgs"].as_str().unwrap(), &mut got);
        for (k, v) in c["env"].as_object().unwrap() {
            got.insert(k.clone(), v.as_str().unwrap().to_owned());
        }
        assert_eq!(got, expected(&s));
        let bare = Launch {
            main_class: None,
            ..LAUNCH
        };
        let doc: serde_json::Value =
            serde_json::from_str(&render(Format::Vscode, &s, &BTreeMap::new(), bare, &[])).unwrap();
        assert_eq!(doc["configurations"][0]["mainClass"], "${file}");
    }

    #[test]
    fn dotenv_prints_a_file_a_dotenv_parser_reads_back() {
        let mut s = sample();
        // A value with every character that needs care.
        s.env.push(super::super::Setting::new(
            "MSE_VPN_NOTE",
            r#"a "quoted" $HOME \ value"#,
        ));
        let text = render(Format::Dotenv, &s, &BTreeMap::new(), LAUNCH, &notes());
        let mut got = BTreeMap::new();
        for item in dotenvy::from_read_iter(text.as_bytes()) {
            let (k, v) = item.expect("a dotenv line");
            if k == "JAVA_TOOL_OPTIONS" {
                vm_entries(&v, &mut got);
            } else {
                got.insert(k, v);
            }
        }
        assert_eq!(got, expected(&s));
    }

    #[test]
    fn shell_keeps_the_users_java_tool_options_first() {
        let s = sample();
        let mut cur = BTreeMap::new();
        cur.insert("JAVA_TOOL_OPTIONS".to_owned(), "-Xmx1g".to_owned());
        let text = render(Format::Shell, &s, &cur, LAUNCH, &notes());
        assert!(text.starts_with("# mse-vpn: register"));
        let jto = text
            .lines()
            .find_map(|l| l.strip_prefix("export JAVA_TOOL_OPTIONS='"))
            .expect("an export of JAVA_TOOL_OPTIONS");
        assert!(
            jto.starts_with("-Xmx1g -DDUBBO_IP_TO_REGISTRY=10.0.0.1 "),
            "{jto}"
        );
        assert!(text.contains("export MSE_VPN_TAG='alice'\n"));
    }
}
