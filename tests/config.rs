//! SPEC §3, §4: config files, flags, `corecast check`, and config errors.

use std::process::Output;

use crate::util::{corecast, temp_config, Relay};

fn check(args: &[&str]) -> Output {
    corecast().arg("check").args(args).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn every_shipped_config_validates_without_warnings() {
    let mut seen = 0;
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/configs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let out = check(&["--config", path.to_str().unwrap()]);
            assert!(out.status.success(), "{}: {}", path.display(), stderr(&out));
            assert!(
                !stderr(&out).contains("warning"),
                "{}: {}",
                path.display(),
                stderr(&out)
            );
            seen += 1;
        }
    }
    assert!(seen >= 3, "expected default.json, dev.json and server_config.json");
}

#[test]
fn check_prints_the_effective_config_with_flags_over_file_over_defaults() {
    let path = temp_config(r#"{"port": 7000, "host": "0.0.0.0", "logger": {"log_level": "warning"}}"#);
    let out = check(&["--config", path.to_str().unwrap(), "--port", "7001", "--shards", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let effective: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(effective["port"], 7001, "flag beats file");
    assert_eq!(effective["host"], "0.0.0.0", "file beats default");
    assert_eq!(effective["logger"]["log_level"], "WARNING");
    assert_eq!(effective["hyper_parameters"]["worker_threads"], 3);
    assert_eq!(
        effective["hyper_parameters"]["rate_limit_msgs_per_minute"], 300,
        "default"
    );
}

#[test]
fn a_wrong_type_names_the_json_path_and_exits_78() {
    let path = temp_config(r#"{"hyper_parameters": {"rate_limit_msgs_per_minute": "fast"}}"#);
    for sub in [&["check"][..], &[][..]] {
        let out = corecast()
            .args(sub)
            .args(["--config", path.to_str().unwrap(), "--port", "0"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
        assert!(
            stderr(&out).contains(r#"hyper_parameters.rate_limit_msgs_per_minute: expected an integer, found "fast""#),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn a_missing_or_malformed_config_file_exits_78() {
    let out = check(&["--config", "/nonexistent/corecast.json"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("cannot read config file /nonexistent/corecast.json"));
    let path = temp_config("{ not json");
    let out = check(&["--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("is not valid JSON"), "{}", stderr(&out));
}

#[test]
fn an_unknown_key_is_a_warning_that_suggests_the_closest_key() {
    let relay = Relay::with_config(r#"{"hyper_parameters": {"rate_limit_msg_per_minute": 5}}"#, &[]);
    let line = relay
        .log
        .wait_for("unknown config key hyper_parameters.rate_limit_msg_per_minute");
    assert!(line.contains(" - WARNING - "), "{line}");
    assert!(
        line.contains("did you mean hyper_parameters.rate_limit_msgs_per_minute"),
        "{line}"
    );
}

#[test]
fn log_lines_use_the_summoner_format_and_name() {
    let relay = Relay::start(&["--name", "relay:test"]);
    let line = relay.log.wait_for("listening on");
    // <date> - <name> - <LEVEL> - <message>
    let parts: Vec<&str> = line.splitn(4, " - ").collect();
    assert_eq!(parts.len(), 4, "{line}");
    assert!(chrono_like(parts[0]), "{line}");
    assert_eq!(&parts[1..3], &["relay:test", "INFO"]);
    assert!(parts[3].starts_with("listening on 127.0.0.1:"));
}

#[test]
fn relayed_messages_are_logged_only_at_debug() {
    let quiet = Relay::start(&[]);
    let verbose = Relay::start(&["--log-level", "DEBUG"]);
    for relay in [&quiet, &verbose] {
        let mut a = relay.connect();
        let mut b = relay.connect();
        a.send(b"secret payload\n");
        b.line();
    }
    verbose.log.wait_for("secret payload");
    assert!(verbose.log.wait_for("secret payload").contains(" - DEBUG - "));
    assert_eq!(quiet.log.count("secret payload"), 0);
}

/// `2026-11-20 23:32:42.727`
fn chrono_like(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 23 && b[4] == b'-' && b[10] == b' ' && b[13] == b':' && b[19] == b'.'
}
