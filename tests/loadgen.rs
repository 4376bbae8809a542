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
