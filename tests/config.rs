//! docs/protocol.md#configuration, #command-line: config files, flags, `corecast check`,
//! and config errors.

use std::process::Output;

use crate::util::{corecast, output_within_patience, temp_config, Relay};

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

/// configs/default.json is documented as listing every key with its default: `check` on it
/// must print exactly what `check` prints without a file. Only the two keys whose default
/// depends on the machine (`worker_threads`, `max_connections`) may be left out.
#[test]
fn default_json_lists_every_key_with_its_default() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/default.json");
    let defaults = check(&[]);
    let from_file = check(&["--config", path]);
    assert!(defaults.status.success(), "{}", stderr(&defaults));
    assert!(from_file.status.success(), "{}", stderr(&from_file));
    assert_eq!(
        String::from_utf8_lossy(&from_file.stdout),
        String::from_utf8_lossy(&defaults.stdout),
        "configs/default.json sets a value that is not the default"
    );
    let file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let effective: serde_json::Value = serde_json::from_slice(&defaults.stdout).unwrap();
    let mut missing = Vec::new();
    missing_keys(&effective, &file, "", &mut missing);
    missing.retain(|k| k != "hyper_parameters.worker_threads" && k != "hyper_parameters.max_connections");
    assert!(missing.is_empty(), "configs/default.json lacks {missing:?}");
}

/// The paths of `effective`'s leaves (and null or absent sections) that `file` does not have.
fn missing_keys(effective: &serde_json::Value, file: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    let Some(map) = effective.as_object() else { return };
    for (key, value) in map {
        let path = format!("{prefix}{key}");
        match file.get(key) {
            None => out.push(path),
            Some(inner) if value.is_object() => missing_keys(value, inner, &format!("{path}."), out),
            Some(_) => {}
        }
    }
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
/// The default timestamp: RFC 3339 with milliseconds and the local offset,
/// `2026-12-07T02:33:28.123+00:00`.
fn chrono_like(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 29
        && b[4] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[19] == b'.'
        && matches!(b[23], b'+' | b'-')
        && b[26] == b':'
}

/// `corecast <sub> args` run to its end (bounded), as (exit code, last stderr line).
fn outcome(sub: Option<&str>, args: &[&str]) -> (Option<i32>, String, Vec<u8>) {
    let mut cmd = corecast();
    cmd.args(sub).args(args);
    let out = output_within_patience(cmd);
    let err = stderr(&out);
    (
        out.status.code(),
        err.lines().last().unwrap_or_default().to_string(),
        out.stdout,
    )
}

#[test]
fn check_refuses_what_serve_refuses_with_the_same_message_and_exit_code() {
    // A regular file where the log directory should be: the log file cannot be opened.
    let not_a_dir = temp_config("{}");
    let log_config = temp_config(&format!(
        r#"{{"logger":{{"enable_file_log":true,"log_file_path":"{}/logs"}}}}"#,
        not_a_dir.display()
    ));
    let host_in_file = temp_config(r#"{"host":"999.1.1.1"}"#);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let admin_on_listen_port = format!("127.0.0.1:{port}");
    let cases: [(&[&str], i32, &str); 6] = [
        (&["--host", "999.1.1.1"], 1, "cannot listen on 999.1.1.1:"),
        (
            &["--config", host_in_file.to_str().unwrap()],
            1,
            "cannot listen on 999.1.1.1:",
        ),
        (
            &["--host", "no-such-host.invalid"],
            1,
            "cannot listen on no-such-host.invalid:",
        ),
        // TEST-NET-1: never an address of this machine.
        (&["--host", "192.0.2.1"], 1, "cannot listen on 192.0.2.1:"),
        (
            &["--config", log_config.to_str().unwrap()],
            78,
            "logger.log_file_path: cannot open log file",
        ),
        (
            &["--admin", "192.0.2.1:0"],
            1,
            "cannot serve the admin endpoint on 192.0.2.1:0",
        ),
    ];
    let overlap: &[&str] = &["--port", &port, "--admin", &admin_on_listen_port];
    for (args, code, message) in cases.iter().map(|(a, c, m)| (a.to_vec(), *c, *m)).chain([(
        overlap.to_vec(),
        1,
        "cannot serve the admin endpoint on 127.0.0.1:",
    )]) {
        let mut serve_args = args.clone();
        if !args.contains(&"--port") {
            serve_args.extend(["--port", "0"]);
        }
        let served = outcome(None, &serve_args);
        let checked = outcome(Some("check"), &serve_args);
        assert_eq!(served.0, Some(code), "serve {args:?}: {}", served.1);
        assert!(served.1.contains(message), "serve {args:?}: {}", served.1);
        assert_eq!(
            (checked.0, &checked.1),
            (served.0, &served.1),
            "check {args:?} differs from serve"
        );
        assert!(
            checked.2.is_empty(),
            "check {args:?} printed a config although it failed"
        );
    }
}

#[test]
fn check_passes_beside_a_relay_that_already_serves_the_port() {
    let relay = Relay::start(&["--admin", "127.0.0.1:0"]);
    let port = relay.addr.port().to_string();
    let admin = relay.admin_addr().to_string();
    // The port and the admin address are in use, by the relay this config would replace.
    let (code, err, stdout) = outcome(Some("check"), &["--port", &port, "--admin", &admin]);
    assert_eq!(code, Some(0), "{err}");
    let effective: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(effective["port"].to_string(), port);
}

#[test]
fn check_strict_makes_an_unknown_key_an_error_with_exit_78() {
    let path = temp_config(r#"{"hyper_parameters": {"rate_limit_msg_per_minute": 5}}"#);
    let lenient = check(&["--config", path.to_str().unwrap()]);
    assert!(lenient.status.success(), "{}", stderr(&lenient));
    assert!(
        stderr(&lenient).contains("corecast: warning: unknown config key hyper_parameters.rate_limit_msg_per_minute")
    );
    let strict = check(&["--strict", "--config", path.to_str().unwrap()]);
    assert_eq!(strict.status.code(), Some(78), "{}", stderr(&strict));
    assert!(
        stderr(&strict).contains(
            "corecast: config error: unknown config key hyper_parameters.rate_limit_msg_per_minute ignored \
             (did you mean hyper_parameters.rate_limit_msgs_per_minute?)"
        ),
        "{}",
        stderr(&strict)
    );
    assert!(strict.stdout.is_empty());
    let clean = temp_config(r#"{"hyper_parameters": {"rate_limit_msgs_per_minute": 5}}"#);
    let out = check(&["--strict", "--config", clean.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn corecast_environment_variables_set_the_flags_and_a_flag_beats_its_variable() {
    let path = temp_config(r#"{"port": 7000, "name": "from-file"}"#);
    let out = corecast()
        .args(["check"])
        .env("CORECAST_CONFIG", &path)
        .env("CORECAST_PORT", "7002")
        .env("CORECAST_SHARDS", "3")
        .env("CORECAST_LOG_LEVEL", "debug")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let effective: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(effective["name"], "from-file", "CORECAST_CONFIG names the file");
    assert_eq!(effective["port"], 7002, "the variable beats the file");
    assert_eq!(effective["hyper_parameters"]["worker_threads"], 3);
    assert_eq!(effective["logger"]["log_level"], "DEBUG");
    let out = corecast()
        .args(["check", "--port", "7003"])
        .env("CORECAST_PORT", "7002")
        .output()
        .unwrap();
    let effective: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(effective["port"], 7003, "the flag beats the variable");
    let out = corecast().args(["check"]).env("CORECAST_SHARDS", "0").output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("--shards: expected an integer from 1 to 1024, found 0"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn help_shows_each_flags_key_default_and_variable() {
    let out = corecast().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "[key: port] [default: 8888] [env: CORECAST_PORT=]",
        "[key: host] [default: 127.0.0.1] [env: CORECAST_HOST=]",
        "[default: one per usable CPU] [env: CORECAST_SHARDS=]",
        "[key: logger.log_level] [default: INFO] [env: CORECAST_LOG_LEVEL=]",
        "[key: hyper_parameters.admin_addr] [default: none] [env: CORECAST_ADMIN=]",
    ] {
        assert!(help.contains(needle), "{needle} not in:\n{help}");
    }
    let out = corecast().args(["check", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("--strict"));
}

#[test]
fn version_names_the_commit_it_was_built_from() {
    let out = corecast().arg("--version").output().unwrap();
    let version = String::from_utf8(out.stdout).unwrap();
    let commit = version
        .trim()
        .strip_prefix(concat!("corecast ", env!("CARGO_PKG_VERSION"), " (commit "))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{version:?}"));
    // Built in a git checkout (as the tests are), the commit is HEAD's, unless the build
    // was given one in CORECAST_COMMIT.
    let head = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match (option_env!("CORECAST_COMMIT"), head) {
        (Some(given), _) if !given.is_empty() => assert_eq!(commit, given),
        (_, Some(head)) => assert!(commit.len() >= 7 && head.starts_with(commit), "{commit} vs {head}"),
        _ => assert_eq!(commit, "unknown"),
    }
}

#[test]
fn keys_prints_the_declared_table() {
    let out = corecast().arg("keys").output().unwrap();
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    assert_eq!(table, corecast::config::keys::markdown());
    assert!(table.contains(
        "| `hyper_parameters.rate_limit_msgs_per_minute` | `300` | ≥ 0 or `null` | lines per minute | live |"
    ));
}

#[test]
fn check_with_a_file_log_creates_nothing() {
    let base = std::env::temp_dir().join(format!("corecast-check-{}", std::process::id()));
    std::fs::create_dir_all(&base).unwrap();
    let logs = base.join("new").join("logs");
    let config = temp_config(&format!(
        r#"{{"logger":{{"enable_file_log":true,"log_file_path":"{}"}}}}"#,
        logs.display()
    ));
    let (code, err, stdout) = outcome(Some("check"), &["--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!stdout.is_empty());
    let left: Vec<_> = std::fs::read_dir(&base).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "check created {left:?}");
    // An existing log file is left as it was, neither truncated nor appended to.
    std::fs::create_dir_all(&logs).unwrap();
    let file = logs.join("corecast.log");
    std::fs::write(&file, "earlier line\n").unwrap();
    let (code, err, _) = outcome(Some("check"), &["--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "earlier line\n");
    assert_eq!(std::fs::read_dir(&logs).unwrap().count(), 1);
    std::fs::remove_dir_all(&base).unwrap();
}
