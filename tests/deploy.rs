//! The ops kit in `deploy/`: every series the Grafana dashboard and the Prometheus alert
//! rules query exists, with the label values they select, in a real `/metrics` scrape of a
//! running relay (admin endpoint and cluster on, so the `corecast_cluster_*` series are
//! there too). With `promtool` installed (CI installs it), the dashboard's queries are
//! also checked as PromQL; `.ci/run` checks and unit-tests the rules themselves.

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;

use crate::util::http::{relay_with_admin, scrape, Sample};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");

/// The `expr` of every alert rule (plain or `|` block scalars).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some((indent, rest)) = line.split_once("expr:") else {
            continue;
        };
        if !indent.trim().is_empty() {
            continue;
        }
        let rest = rest.trim();
        if rest != "|" {
            exprs.push(rest.to_string());
            continue;
        }
        let block: Vec<&str> = lines[i + 1..]
            .iter()
            .take_while(|l| l.len() - l.trim_start().len() > indent.len())
            .map(|l| l.trim())
            .collect();
        exprs.push(block.join(" "));
    }
    exprs
}

/// Every `expr` and variable query string of the dashboard.
fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// A series selector in a query: the metric name and its `label="value"` matchers
/// (regex and negative matchers select nothing that must exist, so they are left out).
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Selector {
    name: String,
    equal: Vec<(String, String)>,
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The `corecast_*` and `process_*` selectors of `expr`.
fn selectors(expr: &str) -> Vec<Selector> {
    let mut out = Vec::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let starts = (i == 0 || !is_ident(chars[i - 1])) && is_ident(chars[i]);
        if !starts {
            i += 1;
            continue;
        }
        let end = (i..chars.len()).find(|&j| !is_ident(chars[j])).unwrap_or(chars.len());
        let name: String = chars[i..end].iter().collect();
        i = end;
        if !(name.starts_with("corecast_") || name.starts_with("process_")) {
            continue;
        }
        let mut equal = Vec::new();
        if chars.get(end) == Some(&'{') {
            let close = (end..chars.len()).find(|&j| chars[j] == '}').expect("a closing brace");
            let body: String = chars[end + 1..close].iter().collect();
            for matcher in body.split(',').map(str::trim).filter(|m| !m.is_empty()) {
                if matcher.contains("=~") || matcher.contains("!=") || matcher.contains("!~") {
                    continue;
                }
                let (label, value) = matcher.split_once('=').expect("label=value");
                equal.push((label.trim().to_string(), value.trim().trim_matches('"').to_string()));
            }
            i = close + 1;
        }
        out.push(Selector { name, equal });
    }
    out
}

fn matches(s: &Sample, sel: &Selector) -> bool {
    s.name == sel.name && sel.equal.iter().all(|(k, v)| s.labels.get(k) == Some(v))
}

#[test]
fn every_series_the_dashboard_and_the_alert_rules_use_is_in_a_real_scrape() {
    let rules = std::fs::read_to_string(format!("{DEPLOY}/corecast-alerts.yml")).unwrap();
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{DEPLOY}/corecast-dashboard.json")).unwrap())
            .expect("the dashboard is JSON");
    let mut exprs = rule_exprs(&rules);
    assert_eq!(exprs.len(), rules.matches("- alert:").count(), "one expr per alert");
    let mut panel_exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut panel_exprs);
    assert!(panel_exprs.len() > 20, "{panel_exprs:?}");
    exprs.extend(panel_exprs.iter().cloned());
    let wanted: BTreeSet<Selector> = exprs.iter().flat_map(|e| selectors(e)).collect();
    // The kit covers every alert the issue asks for.
    for name in [
        "corecast_shard_up",
        "corecast_cluster_connected",
        "corecast_slow_consumer_closed_total",
        "corecast_quarantines_total",
        "corecast_pending_bytes_limit",
        "process_max_fds",
        "corecast_config_reloads_total",
        "corecast_relay_delay_seconds_bucket",
    ] {
        assert!(wanted.iter().any(|s| s.name == name), "no query uses {name}");
    }

    // Cluster on, towards a port where nothing listens: its series exist (disconnected).
    let (relay, admin) = relay_with_admin("{}", &["--shards", "2", "--cluster-nats", "nats://127.0.0.1:1"]);
    let samples = scrape(admin);
    let missing: Vec<&Selector> = wanted
        .iter()
        .filter(|sel| !samples.iter().any(|s| matches(s, sel)))
        .collect();
    assert!(missing.is_empty(), "not in the scrape: {missing:#?}");
    drop(relay);

    // The dashboard's queries are PromQL that Prometheus accepts: checked as recording
    // rules with Grafana's variables given values.
    if Command::new("promtool").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CORECAST_REQUIRE_PROMTOOL").is_none(),
            "promtool is not installed but CORECAST_REQUIRE_PROMTOOL is set (apt-get install prometheus)"
        );
        eprintln!("promtool not installed: skipping the PromQL check of the dashboard");
        return;
    }
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    // `label_values(...)` is Grafana's, not PromQL: only its metric is checked (above).
    for (i, e) in panel_exprs
        .iter()
        .filter(|e| !e.starts_with("label_values("))
        .enumerate()
    {
        let e = e
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*")
            .replace('\'', "''");
        file.push_str(&format!("      - record: dashboard:query{i}\n        expr: '{e}'\n"));
    }
    let path = std::env::temp_dir().join(format!("corecast-dashboard-rules-{}.yml", std::process::id()));
    std::fs::write(&path, file).unwrap();
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "promtool refused a dashboard query:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn selectors_are_read_from_queries_with_their_equality_matchers() {
    let sels = selectors(
        r#"sum by (instance) (rate(corecast_received_lines_total{instance=~"$instance", shard="0"}[5m])) / process_max_fds"#,
    );
    assert_eq!(
        sels,
        [
            Selector {
                name: "corecast_received_lines_total".into(),
                equal: vec![("shard".into(), "0".into())]
            },
            Selector {
                name: "process_max_fds".into(),
                equal: vec![]
            },
        ]
    );
    let yaml = "      - alert: A\n        expr: |\n          sum(x)\n            / corecast_y\n        for: 1m\n      - alert: B\n        expr: corecast_z == 0\n";
    assert_eq!(rule_exprs(yaml), ["sum(x) / corecast_y", "corecast_z == 0"]);
}
