//! The load generator against the real relay for a few seconds: its accounting, overall
//! and per receiver class (healthy, rate-limited, pausing), and the relay keeping every
//! receiver that reads. A test binary of its own (not a module of `tests.rs`), because
//! cargo runs test binaries one after another: these runs need the machine's CPUs to
//! themselves. The relay comes from the shared harness (`util`); the generator runs in
//! this process through its library, with the same command line as its binary.

#[allow(dead_code)] // the harness serves tests.rs too; this binary uses part of it
mod util;

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};

use util::Relay;

/// These tests load the machine (the T10x30000 one needs both CPUs for the relay and the
/// generator): each holds this lock, so they run one at a time rather than starving each
/// other, which would turn "every receiver keeps reading" into a test of the machine.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the relay on two shards with `config`.
fn start_relay(config: &str) -> Relay {
    Relay::with_config(config, &["--shards", "2"])
}

/// Runs the generator in this process, as its command line would, against `relay`
/// with `args`; returns its JSON result.
fn loadgen(relay: &Relay, args: &[&str]) -> serde_json::Value {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, Ordering::Relaxed);
    let json = std::env::temp_dir().join(format!("corecast-loadgen-{}-{n}.json", std::process::id()));
    let target = relay.addr.to_string();
    let pid = relay.pid().to_string();
    let mut argv = vec!["corecast-loadgen", "--target", &target, "--no-progress"];
    argv.extend(["--json", json.to_str().unwrap(), "--server-pid", &pid]);
    argv.extend_from_slice(args);
    let status = corecast_loadgen::main_with(argv);
    assert_eq!(status, ExitCode::SUCCESS, "the generator failed (its error is above)");
    let result = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    result
}

#[test]
fn fan_out_against_corecast_is_complete_in_order_and_without_duplicates() {
    let _serial = one_at_a_time();
    let relay = start_relay(r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null}}"#);
    let r = loadgen(
        &relay,
        &[
            "--clients",
            "20",
            "--publishers",
            "5",
            "--rate",
            "200",
            "--duration",
            "3",
            "--warmup",
            "1",
            "--threads",
            "2",
        ],
    );
    assert_eq!(r["lost"], 0, "{r:#}");
    assert_eq!(r["reordered"], 0, "{r:#}");
    assert_eq!(r["duplicated"], 0, "{r:#}");
    assert!(r["expected"].as_u64().unwrap() > 0);
    assert_eq!(r["delivered"], r["expected"], "{r:#}");
    // 5 publishers × 200 lines/s × 19 recipients, over 4 s including the warm-up.
    assert!(r["sent"].as_u64().unwrap() >= 5 * 200 * 3);
    for key in [
        "msgs_per_sec",
        "mb_per_sec",
        "loadgen_cpu_s",
        "server_cpu_s",
        "server_cpu_ns_per_delivery",
    ] {
        assert!(r[key].as_f64().is_some(), "{key} missing: {r:#}");
    }
    for key in ["p50", "p90", "p99", "p999", "max"] {
        assert!(r["latency_us"][key].as_u64().is_some(), "latency {key} missing");
    }
    assert!(r["timeline"].as_array().unwrap().len() >= 3, "{r:#}");
    assert!(
        r.get("cross_node").is_none(),
        "one target, yet a cross-node result: {r:#}"
    );
}

#[test]
fn two_targets_count_the_deliveries_between_clients_on_different_targets_as_cross_node() {
    let _serial = one_at_a_time();
    // Both targets name the same relay, so all four clients share one room while the
    // generator treats even and odd clients as being on different nodes: each publisher's
    // lines reach 3 receivers, 2 of them on the other target, so exactly 2/3 cross.
    let relay = start_relay(r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null}}"#);
    let second = relay.addr.to_string();
    let r = loadgen(
        &relay,
        &[
            "--target",
            &second,
            "--clients",
            "4",
            "--publishers",
            "4",
            "--rate",
            "100",
            "--duration",
            "2",
            "--warmup",
            "1",
        ],
    );
    assert_eq!(r["lost"], 0, "{r:#}");
    assert_eq!(r["delivered"], r["expected"], "{r:#}");
    let cross = &r["cross_node"];
    let crossed = cross["delivered_in_window"].as_u64().expect("no cross_node result");
    // 4 publishers × 100 lines/s × 2 s × 2 receivers across: 1600; ask for half.
    assert!(crossed >= 800, "too few cross-node deliveries: {r:#}");
    let share = cross["share"].as_f64().unwrap();
    assert!(
        (share - 2.0 / 3.0).abs() < 1e-9,
        "cross-node share {share}, not 2/3: {r:#}"
    );
    assert!(cross["latency_us"]["p99"].as_u64().unwrap() > 0, "{r:#}");
    assert_eq!(r["target"], format!("{second},{second}"), "{r:#}");
}

#[test]
fn over_rate_senders_are_reported_as_lost_with_notices() {
    let _serial = one_at_a_time();
    // The relay's default limit: 300 lines per minute per connection, a minute's burst.
    let relay = start_relay("{}");
    let r = loadgen(
        &relay,
        &[
            "--clients",
            "4",
            "--publishers",
            "2",
            "--rate",
            "200",
            "--duration",
            "3",
            "--warmup",
            "1",
            "--scenario",
            "over-rate",
        ],
    );
    assert!(r["lost"].as_u64().unwrap() > 0, "{r:#}");
    assert!(r["notices"].as_u64().unwrap() > 0, "{r:#}");
    assert_eq!(r["duplicated"], 0);
    assert_eq!(r["reordered"], 0);
}

/// The class entry `name` of a result, or a failure that shows the whole result.
fn class<'a>(r: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    r["classes"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["class"] == name))
        .unwrap_or_else(|| panic!("no {name} class in {r:#}"))
}

#[test]
fn per_line_writers_reach_a_pausing_and_a_rate_limited_reader_completely_and_close_nobody() {
    let _serial = one_at_a_time();
    // Little enough traffic that the pausing and the rate-limited reader fall behind by
    // less than the socket buffers hold, so even a relay that closes slow consumers at
    // its first stall keeps them.
    let relay = start_relay(r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null}}"#);
    let r = loadgen(
        &relay,
        &[
            "--clients",
            "6",
            "--publishers",
            "2",
            "--rate",
            "100",
            "--burst-us",
            "0",
            "--duration",
            "2",
            "--warmup",
            "1",
            "--drain",
            "10",
            // Client 4 reads 16 kB/s, a fifth of what it is sent: it ends seconds behind.
            "--reader-rate",
            "16000",
            "--slow-readers",
            "1",
            // Client 5 stops reading for 400 ms, half a second into the window.
            "--pause-readers",
            "1",
            "--pause-ms",
            "400",
            "--pause-at-ms",
            "500",
        ],
    );
    for name in ["healthy", "rate-limited", "pausing"] {
        let c = class(&r, name);
        assert!(c["expected"].as_u64().unwrap() > 0, "{name}: {r:#}");
        assert_eq!(c["delivered"], c["expected"], "{name}: {r:#}");
        assert_eq!(c["lost"], 0, "{name}: {r:#}");
        assert_eq!(c["reordered"], 0, "{name}: {r:#}");
        assert_eq!(c["duplicated"], 0, "{name}: {r:#}");
        assert_eq!(c["disconnected"], 0, "{name}: {r:#}");
        assert!(c["max_gap_ms"].as_f64().is_some(), "{name}: {r:#}");
    }
    assert_eq!(class(&r, "healthy")["receivers"], 4);
    assert_eq!(r["closed_no_reader"], true, "{r:#}");
    assert_eq!(r["closed_by_server"], 0, "{r:#}");
    // The two did read as told: the pausing one went without a delivery for its pause,
    // the rate-limited one ended far behind (about 2.5 s; without the limit, milliseconds).
    let pause_gap = class(&r, "pausing")["max_gap_ms"].as_f64().unwrap();
    assert!(pause_gap >= 350.0, "pausing reader's longest gap {pause_gap} ms: {r:#}");
    let behind_us = class(&r, "rate-limited")["latency_us"]["max"].as_u64().unwrap();
    assert!(
        behind_us >= 500_000,
        "rate-limited reader at most {behind_us} µs behind: {r:#}"
    );
}

#[test]
fn per_line_writers_at_t10x30000_close_nobody_twice_in_a_row() {
    let _serial = one_at_a_time();
    // Issue 14: ten clients each writing 30,000 lines/s, one write per line, reading with
    // a plain loop. A relay may slow the senders down (TCP pushes back) but must not
    // close any of these receivers: every one of them keeps reading. The second run
    // shows that nothing from the first locked this address out.
    let relay = start_relay(r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null}}"#);
    for run in 1..=2 {
        let r = loadgen(
            &relay,
            &[
                "--clients",
                "10",
                "--publishers",
                "10",
                "--rate",
                "30000",
                "--burst-us",
                "0",
                "--duration",
                "1.5",
                "--warmup",
                "0.5",
                "--drain",
                "2",
                "--threads",
                "2",
            ],
        );
        assert!(r["sent"].as_u64().unwrap() > 0, "run {run}: {r:#}");
        assert_eq!(r["closed_by_server"], 0, "run {run}: {r:#}");
        assert_eq!(r["readers_disconnected"], 0, "run {run}: {r:#}");
        assert_eq!(r["closed_no_reader"], true, "run {run}: {r:#}");
    }
}

/// `corecast-loadgen compare` with this build's corecast on `T3x100`, 1 s runs after 0.5 s
/// of warm-up, and `extra` flags.
fn compare_t3x100(extra: &[&str]) -> ExitCode {
    let mut argv = vec![
        "corecast-loadgen",
        "compare",
        "--corecast-bin",
        env!("CARGO_BIN_EXE_corecast"),
        "--workloads",
        "T3x100",
        "--duration",
        "1",
        "--warmup",
        "0.5",
    ];
    argv.extend_from_slice(extra);
    corecast_loadgen::main_with(argv)
}

/// `compare` with nats-server when it is installed (as in CI): the report has, per
/// workload, the latency by percentile per server, CPU per delivery and p99 with a point
/// per round and server, and (with a peer) the per-round ratios; the JSON carries the
/// metadata with every setting applied to each server; the CSV and `.hgrm` files agree;
/// every round has its send-cost probe and fan-out floor, and every run its multiple of the
/// least and of the floor.
#[test]
fn compare_writes_a_report_with_a_chart_per_view_and_the_settings_of_every_server() {
    let _serial = one_at_a_time();
    let nats = std::env::var_os("CORECAST_REQUIRE_NATS").is_some()
        || std::process::Command::new("nats-server")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    let servers: &[&str] = if nats {
        &["corecast", "nats-server"]
    } else {
        &["corecast"]
    };
    let rounds = 2;
    let dir = std::env::temp_dir().join(format!("corecast-compare-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let (json, report, prefix) = (path("c.json"), path("c.html"), path("c"));
    let peers = if nats { "nats" } else { "" };
    let extra = ["--rounds", "2", "--peers", peers, "--json", &json, "--report", &report];
    let outputs = ["--hgrm", &prefix, "--csv", &prefix];
    assert_eq!(compare_t3x100(&[&extra[..], &outputs[..]].concat()), ExitCode::SUCCESS);
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), rounds * servers.len());

    // Metadata: each server's version and every setting applied to it.
    let meta = &doc["meta"];
    let named: Vec<&str> = meta["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(named, servers);
    let corecast = &meta["servers"][0];
    assert!(corecast["version"].as_str().unwrap().starts_with("corecast "), "{meta}");
    let settings = corecast["settings"].to_string();
    assert!(
        settings.contains("--shards") && settings.contains("rate_limit_msgs_per_minute"),
        "{settings}"
    );
    if nats {
        assert!(
            meta["servers"][1]["version"].as_str().unwrap().contains("nats-server"),
            "{meta}"
        );
    }
    for key in ["kernel", "cpu_model", "date", "loadgen_version"] {
        assert!(meta[key].is_string(), "meta.{key}: {meta}");
    }
    assert_eq!(meta["command_line"][1], "compare");

    // The report: one figure per view, each with a series per server (or per ratio).
    let html = std::fs::read_to_string(&report).unwrap();
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let html = roxmltree::Document::parse_with_options(&html, options).expect("the report parses as XML");
    let svg_ns = "http://www.w3.org/2000/svg";
    let figures: Vec<_> = html.descendants().filter(|n| n.has_tag_name("figure")).collect();
    let mut views = vec![
        ("T3x100-latency-spectrum", "latency (ms, log scale)"),
        ("T3x100-cpu-per-delivery", "server CPU per delivery (ns)"),
        ("T3x100-p99", "p99 latency (ms)"),
    ];
    if nats {
        views.push(("T3x100-ratios", "ratio corecast ÷ peer (log scale, 1 = equal)"));
    }
    assert_eq!(figures.len(), views.len());
    for (figure, (id, y_label)) in figures.iter().zip(&views) {
        assert_eq!(figure.attribute("id"), Some(*id));
        let svg = figure.children().find(|n| n.has_tag_name((svg_ns, "svg"))).unwrap();
        let texts: Vec<&str> = svg
            .descendants()
            .filter(|n| n.has_tag_name((svg_ns, "text")))
            .map(|n| n.text().unwrap_or("").trim())
            .collect();
        assert!(texts.contains(y_label), "{id}: {texts:?}");
        let x_label = if id.ends_with("spectrum") {
            "percentile (log scale of 1/(1-p))"
        } else {
            "round"
        };
        assert!(texts.contains(&x_label), "{id}: {texts:?}");
        // Lines (the spectrum) are 2 px polylines, points are circles: one mark per point
        // or line plus one legend mark per series, one colour per series.
        let (marks, colour): (Vec<_>, &str) = if id.ends_with("spectrum") {
            let m = svg
                .descendants()
                .filter(|n| n.has_tag_name((svg_ns, "polyline")) && n.attribute("stroke-width") == Some("2"))
                .collect();
            (m, "stroke")
        } else {
            (
                svg.descendants()
                    .filter(|n| n.has_tag_name((svg_ns, "circle")))
                    .collect(),
                "fill",
            )
        };
        let colours: std::collections::BTreeSet<&str> = marks.iter().filter_map(|n| n.attribute(colour)).collect();
        let series = if id.ends_with("ratios") {
            2 * (servers.len() - 1)
        } else {
            servers.len()
        };
        assert_eq!(colours.len(), series, "{id}");
        // Points: one per round that has the value (CPU time is counted in clock ticks,
        // so a light run can show none, and a ratio needs both values above zero).
        let value = |server: &str, round: usize, key: &str| -> Option<f64> {
            let run = runs.iter().find(|r| r["server"] == server && r["round"] == round)?;
            match key {
                "cpu" => run["result"]["server_cpu_ns_per_delivery"].as_f64(),
                _ => run["result"]["latency_us"]["p99"].as_f64(),
            }
        };
        let points: usize = if id.ends_with("spectrum") {
            series
        } else if id.ends_with("ratios") {
            let positive = |s: &str, r: usize, k: &str| value(s, r, k).is_some_and(|v| v > 0.0);
            (0..rounds)
                .flat_map(|r| ["cpu", "p99"].map(move |k| (r, k)))
                .filter(|&(r, k)| positive("corecast", r, k) && positive("nats-server", r, k))
                .count()
        } else {
            let key = if id.ends_with("p99") { "p99" } else { "cpu" };
            servers
                .iter()
                .flat_map(|s| (0..rounds).map(move |r| (*s, r)))
                .filter(|&(s, r)| value(s, r, key).is_some())
                .count()
        };
        assert_eq!(marks.len(), points + series, "{id}");
        for s in servers.iter().filter(|_| !id.ends_with("ratios")) {
            assert!(texts.contains(s), "{id}: legend without {s}");
        }
    }

    // CSV: a row per run, labelled, agreeing with the JSON; .hgrm per server over its rounds.
    let csv = std::fs::read_to_string(format!("{prefix}-summary.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), runs.len());
    for (row, run) in rows.iter().zip(runs) {
        assert_eq!(row[col("workload")], "T3x100");
        assert_eq!(row[col("round")], (run["round"].as_u64().unwrap() + 1).to_string());
        assert_eq!(row[col("server")], run["server"].as_str().unwrap());
        assert_eq!(row[col("p99_us")], run["result"]["latency_us"]["p99"].to_string());
        assert_eq!(row[col("delivered")], run["result"]["delivered"].to_string());
        for key in [
            "least_ns_per_delivery",
            "cpu_over_least",
            "floor_p99_us",
            "p99_over_floor",
        ] {
            let field = row[col(key)];
            match run["result"][key].as_f64() {
                // serde_json's float parsing is not always correctly rounded.
                Some(v) => assert!((field.parse::<f64>().unwrap() - v).abs() <= 1e-9 * v.abs(), "{key}"),
                None => assert_eq!(field, "", "{key}"),
            }
        }
    }

    // The physical anchor: a send-cost probe per round, and every run's CPU per delivery
    // as a multiple of the least that probe gives the workload at the 1 ms default bound.
    let anchor = &doc["anchor"];
    assert_eq!(anchor["latency_bound_ms"], 1.0);
    let probes = anchor["rounds"].as_array().unwrap();
    assert_eq!(probes.len(), rounds, "{anchor}");
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs());
    for (round, probe) in probes.iter().enumerate() {
        assert_eq!(probe["workload"], "T3x100");
        assert_eq!(probe["round"], round);
        let cost = &probe["send_cost"];
        assert_eq!(cost["sockets"], 3, "{probe}");
        for key in ["small_ns", "large_ns", "a_ns"] {
            assert!(cost[key].as_f64().unwrap() > 0.0, "{probe}");
        }
        let (a, b) = (cost["a_ns"].as_f64().unwrap(), cost["b_ns_per_byte"].as_f64().unwrap());
        // T3x100: each client receives the other two clients' 100 lines/s; 100-byte lines
        // make 147-byte envelopes.
        let least = &probe["least"];
        assert_eq!(least["lines_per_s_per_recipient"], 200.0, "{probe}");
        assert_eq!(least["envelope_bytes"], 147, "{probe}");
        let w = least["writes_per_delivery"].as_f64().unwrap();
        assert!(close(w, 1.0 / 1.2), "{probe}");
        let least_ns = least["ns_per_delivery"].as_f64().unwrap();
        assert!(close(least_ns, w * a + b * 147.0), "{probe}");
        // The fan-out floor: every delivery of its lines timed, percentiles in order.
        let floor = &probe["floor"];
        let lines = floor["lines"].as_u64().unwrap();
        assert!(lines >= 4, "{probe}");
        assert_eq!(floor["deliveries"].as_u64(), Some(lines * 3), "{probe}");
        let (p50, p99, max) = (
            floor["p50_us"].as_f64().unwrap(),
            floor["p99_us"].as_f64().unwrap(),
            floor["max_us"].as_f64().unwrap(),
        );
        assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{probe}");
        for run in runs.iter().filter(|r| r["round"] == round) {
            let r = &run["result"];
            assert_eq!(r["least_ns_per_delivery"].as_f64(), Some(least_ns), "{run}");
            match r["server_cpu_ns_per_delivery"].as_f64() {
                Some(cpu) => assert!(close(r["cpu_over_least"].as_f64().unwrap(), cpu / least_ns), "{run}"),
                None => assert!(r.get("cpu_over_least").is_none(), "{run}"),
            }
            assert_eq!(r["floor_p99_us"].as_f64(), Some(p99), "{run}");
            let over = r["latency_us"]["p99"].as_f64().unwrap() / p99;
            assert!(close(r["p99_over_floor"].as_f64().unwrap(), over), "{run}");
        }
    }
    let table = doc["table_markdown"].as_str().unwrap();
    assert!(
        table
            .lines()
            .next()
            .unwrap()
            .contains("| p99 latency | p99 ÷ floor | server CPU ns/delivery | CPU/delivery ÷ least |"),
        "{table}"
    );
    let anchor_rows = html
        .descendants()
        .find(|n| n.has_tag_name("table") && n.attribute("id") == Some("anchor"))
        .expect("the report has the anchor table")
        .children()
        .filter(|n| n.has_tag_name("tr"))
        .count();
    assert_eq!(anchor_rows, 1 + rounds);
    for s in servers {
        let hgrm = std::fs::read_to_string(format!("{prefix}-T3x100-{s}.hgrm")).unwrap();
        let total: u64 = hgrm
            .lines()
            .find_map(|l| {
                l.split_once("Total count    =")
                    .map(|(_, v)| v.trim_end_matches(']').trim().parse().unwrap())
            })
            .unwrap();
        let in_window: f64 = runs
            .iter()
            .filter(|r| r["server"] == *s)
            .map(|r| r["result"]["msgs_per_sec"].as_f64().unwrap() * r["result"]["duration_s"].as_f64().unwrap())
            .sum();
        assert_eq!(total, in_window.round() as u64, "{s}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `compare --corecast-windows 0`: corecast with back-to-back write passes runs as a server
/// of its own beside the default one, with its window in its recorded settings, and both
/// deliver everything.
#[test]
fn compare_runs_corecast_with_another_flush_window_as_a_server_of_its_own() {
    let _serial = one_at_a_time();
    let json = std::env::temp_dir().join(format!("corecast-compare-windows-{}.json", std::process::id()));
    let extra = [
        "--rounds",
        "1",
        "--peers",
        "",
        "--corecast-windows",
        "0",
        "--json",
        json.to_str().unwrap(),
    ];
    assert_eq!(compare_t3x100(&extra), ExitCode::SUCCESS);
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    let servers: Vec<&str> = doc["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["server"].as_str().unwrap())
        .collect();
    assert_eq!(servers, ["corecast", "corecast-w0"]);
    for run in doc["runs"].as_array().unwrap() {
        let r = &run["result"];
        assert!(r["delivered"].as_u64().unwrap() > 0, "{run}");
        assert_eq!(r["delivered"], r["expected"], "{run}");
    }
    let settings = |i: usize| doc["meta"]["servers"][i]["settings"].to_string();
    assert!(!settings(0).contains("flush_window_us"), "{}", settings(0));
    assert!(settings(1).contains(r#"\"flush_window_us\":0"#), "{}", settings(1));
    let table = doc["table_markdown"].as_str().unwrap();
    assert!(table.contains("| T3x100 | corecast-w0 |"), "{table}");
    // A window listed twice is refused before anything starts.
    assert_ne!(
        compare_t3x100(&["--corecast-windows", "0,0", "--peers", ""]),
        ExitCode::SUCCESS
    );
}

#[test]
fn fan_out_over_tls_is_complete_with_the_generators_tls() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let _serial = one_at_a_time();
    // A throwaway CA and a server certificate for `localhost`, made here.
    let dir = std::env::temp_dir().join(format!("corecast-loadgen-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    std::fs::write(path("ca.pem"), ca.pem()).unwrap();
    std::fs::write(path("cert.pem"), cert.pem()).unwrap();
    std::fs::write(path("key.pem"), key.serialize_pem()).unwrap();
    let relay = start_relay(&format!(
        r#"{{"hyper_parameters":{{"rate_limit_msgs_per_minute":null,
            "tls":{{"listen":"127.0.0.1:0","cert_file":"{}","key_file":"{}"}}}}}}"#,
        path("cert.pem"),
        path("key.pem")
    ));
    let line = relay.log.wait_for("listening for TLS on ");
    let target = line.split("listening for TLS on ").nth(1).unwrap().trim().to_string();
    let json = dir.join("result.json");
    let ca_file = path("ca.pem");
    let argv = [
        "corecast-loadgen",
        "--target",
        &target,
        "--no-progress",
        "--tls",
        "--tls-ca",
        &ca_file,
        "--json",
        json.to_str().unwrap(),
        "--clients",
        "10",
        "--publishers",
        "3",
        "--rate",
        "200",
        "--duration",
        "2",
        "--warmup",
        "1",
    ];
    assert_eq!(corecast_loadgen::main_with(argv), ExitCode::SUCCESS);
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(r["expected"].as_u64().unwrap() > 0, "{r:#}");
    assert_eq!(r["lost"], 0, "{r:#}");
    assert_eq!(r["delivered"], r["expected"], "{r:#}");
    assert_eq!(
        relay.log.count("(shard 0, tls)") + relay.log.count("(shard 1, tls)"),
        10
    );
}
