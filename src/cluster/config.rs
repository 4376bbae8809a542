//! The `hyper_parameters.cluster` section and the `--cluster-nats` flag: parsed from a
//! `serde_json::Value` into one validated [`ClusterConfig`], so that `config.rs` only hands
//! the value over and maps the error. `null` (or no key) means a single node: no uplink,
//! no thread, no cost.

use std::fmt;

use serde_json::{json, Value};

/// The subject every node publishes to and subscribes on when the file gives none.
pub const DEFAULT_SUBJECT: &str = "corecast";

/// Most NATS URLs a node may list; more is a typo or a generated list gone wrong.
const MAX_URLS: usize = 64;

/// How a node joins the cluster (docs/cluster.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// NATS servers of one NATS cluster, `nats://host:port`; the uplink connects to one and
    /// fails over to the others (and to the servers they announce). At least one.
    pub nats: Vec<String>,
    /// The NATS subject the nodes share; nodes on different subjects are different
    /// broadcast domains. Default `corecast`.
    pub subject: String,
}

/// A value of the section with the wrong type or out of range, named by its JSON path (or
/// flag) the way `config.rs` names every other problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidValue {
    pub key: String,
    pub expected: String,
    pub found: String,
}

impl fmt::Display for InvalidValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: expected {}, found {}", self.key, self.expected, self.found)
    }
}

impl std::error::Error for InvalidValue {}

fn invalid(key: &str, expected: &str, found: &Value) -> InvalidValue {
    let mut shown = found.to_string();
    if shown.len() > 60 {
        let cut = (0..=57).rev().find(|&i| shown.is_char_boundary(i)).unwrap_or(0);
        shown.truncate(cut);
        shown.push_str("...");
    }
    InvalidValue {
        key: key.to_string(),
        expected: expected.to_string(),
        found: shown,
    }
}

const URLS_EXPECTED: &str = "a list of nats:// URLs";

/// Parses the section found at `path` (normally `hyper_parameters.cluster`): `Ok(None)` for
/// `null`, else the validated config. Unknown keys inside it are warnings, as elsewhere.
pub fn parse(value: &Value, path: &str, warnings: &mut Vec<String>) -> Result<Option<ClusterConfig>, InvalidValue> {
    let map = match value {
        Value::Null => return Ok(None),
        Value::Object(map) => map,
        other => return Err(invalid(path, "null or an object with \"nats\" and \"subject\"", other)),
    };
    let nats_path = format!("{path}.nats");
    let nats = match map.get("nats") {
        None => return Err(invalid(&nats_path, URLS_EXPECTED, &Value::Null)),
        Some(Value::Array(items)) => {
            let mut urls = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(url) => urls.push(validate_url(url, &format!("{nats_path}[{i}]"))?),
                    other => return Err(invalid(&format!("{nats_path}[{i}]"), "a nats:// URL", other)),
                }
            }
            check_count(&urls, &nats_path, &Value::Array(items.clone()))?;
            urls
        }
        // One URL as a plain string is what a hand-written config most likely means.
        Some(Value::String(url)) => vec![validate_url(url, &nats_path)?],
        Some(other) => return Err(invalid(&nats_path, URLS_EXPECTED, other)),
    };
    let subject_path = format!("{path}.subject");
    let subject = match map.get("subject") {
        None | Some(Value::Null) => DEFAULT_SUBJECT.to_string(),
        Some(Value::String(s)) => validate_subject(s, &subject_path)?,
        Some(other) => return Err(invalid(&subject_path, "a NATS subject", other)),
    };
    for key in map.keys() {
        if key != "nats" && key != "subject" {
            warnings.push(format!(
                "unknown config key {path}.{key} ignored (known: nats, subject)"
            ));
        }
    }
    Ok(Some(ClusterConfig { nats, subject }))
}

/// Applies `--cluster-nats URL` (repeatable): the flags replace the file's URL list and
/// keep its subject, or enable the cluster on the default subject.
pub fn apply_flags(current: Option<ClusterConfig>, urls: &[String]) -> Result<Option<ClusterConfig>, InvalidValue> {
    if urls.is_empty() {
        return Ok(current);
    }
    let nats = urls
        .iter()
        .map(|u| validate_url(u, "--cluster-nats"))
        .collect::<Result<Vec<_>, _>>()?;
    check_count(&nats, "--cluster-nats", &json!(urls))?;
    let subject = current.map_or_else(|| DEFAULT_SUBJECT.to_string(), |c| c.subject);
    Ok(Some(ClusterConfig { nats, subject }))
}

impl ClusterConfig {
    /// The section as `corecast check` prints it.
    pub fn to_json(&self) -> Value {
        json!({ "nats": self.nats, "subject": self.subject })
    }
}

fn check_count(urls: &[String], path: &str, found: &Value) -> Result<(), InvalidValue> {
    if urls.is_empty() || urls.len() > MAX_URLS {
        return Err(invalid(path, &format!("{URLS_EXPECTED} (1 to {MAX_URLS})"), found));
    }
    Ok(())
}

/// `nats://host:port` (the port may be left out: 4222). TLS is not built in, so `tls://`
/// is refused here rather than failing at every connect.
fn validate_url(url: &str, path: &str) -> Result<String, InvalidValue> {
    let bad = || invalid(path, "a nats://host:port URL", &Value::String(url.to_string()));
    let rest = url.strip_prefix("nats://").ok_or_else(bad)?;
    // Credentials (`user:pass@`) are allowed by NATS URLs; the host part follows the last '@'.
    let hostport = rest.rsplit('@').next().unwrap_or(rest);
    if hostport.is_empty() || hostport.contains('/') || hostport.chars().any(char::is_whitespace) {
        return Err(bad());
    }
    let port = if hostport.starts_with('[') {
        // [v6]:port or [v6]
        match hostport.find(']') {
            Some(end) => hostport[end + 1..].strip_prefix(':'),
            None => return Err(bad()),
        }
    } else {
        hostport.rsplit_once(':').map(|(_, p)| p)
    };
    if let Some(p) = port {
        if p.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(bad());
        }
    }
    Ok(url.to_string())
}

/// A literal NATS subject: dot-separated non-empty tokens without wildcards or spaces.
fn validate_subject(s: &str, path: &str) -> Result<String, InvalidValue> {
    let ok = !s.is_empty()
        && s.len() <= 200
        && s.split('.')
            .all(|t| !t.is_empty() && t != "*" && t != ">" && !t.chars().any(|c| c.is_whitespace() || c.is_control()));
    if ok {
        Ok(s.to_string())
    } else {
        Err(invalid(
            path,
            "a NATS subject (dot-separated tokens, no spaces or wildcards)",
            &Value::String(s.into()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Option<ClusterConfig>, InvalidValue> {
        let v: Value = serde_json::from_str(text).unwrap();
        parse(&v, "hyper_parameters.cluster", &mut Vec::new())
    }

    #[test]
    fn null_is_a_single_node() {
        assert_eq!(load("null").unwrap(), None);
    }

    #[test]
    fn urls_and_subject_load_and_the_subject_defaults() {
        let c = load(r#"{"nats":["nats://127.0.0.1:4222","nats://h2:4223"],"subject":"room.a"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(c.nats, vec!["nats://127.0.0.1:4222", "nats://h2:4223"]);
        assert_eq!(c.subject, "room.a");
        let c = load(r#"{"nats":["nats://[::1]:4222"]}"#).unwrap().unwrap();
        assert_eq!(c.subject, DEFAULT_SUBJECT);
        assert_eq!(
            c.to_json(),
            json!({"nats": ["nats://[::1]:4222"], "subject": "corecast"})
        );
    }

    #[test]
    fn wrong_values_name_their_json_path() {
        let e = load(r#"{"nats":5}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "hyper_parameters.cluster.nats: expected a list of nats:// URLs, found 5"
        );
        let e = load(r#"{"nats":["nats://a:1", 7]}"#).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("hyper_parameters.cluster.nats[1]: expected a nats:// URL"));
        let e = load(r#"{"nats":["http://a:1"]}"#).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("hyper_parameters.cluster.nats[0]: expected a nats://host:port URL"));
        assert!(load(r#"{"nats":["nats://a:0"]}"#).is_err());
        assert!(load(r#"{"nats":["nats://a:99999"]}"#).is_err());
        assert!(load(r#"{"nats":[]}"#).unwrap_err().to_string().contains("(1 to 64)"));
        assert!(load(r#"{"subject":"x"}"#).unwrap_err().key.ends_with(".nats"));
        let e = load(r#"{"nats":["nats://a:1"],"subject":"a.*"}"#).unwrap_err();
        assert_eq!(e.key, "hyper_parameters.cluster.subject");
        assert!(load(r#"{"nats":["nats://a:1"],"subject":"a..b"}"#).is_err());
        assert!(load(r#""nats://a:1""#)
            .unwrap_err()
            .to_string()
            .starts_with("hyper_parameters.cluster: expected null or an object"));
    }

    #[test]
    fn unknown_keys_in_the_section_are_warnings() {
        let mut w = Vec::new();
        let v: Value = serde_json::from_str(r#"{"nats":"nats://a:1","subjet":"x"}"#).unwrap();
        assert!(parse(&v, "hyper_parameters.cluster", &mut w).unwrap().is_some());
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("hyper_parameters.cluster.subjet"));
    }

    #[test]
    fn flags_replace_the_urls_and_keep_the_subject() {
        let file = Some(ClusterConfig {
            nats: vec!["nats://a:1".into()],
            subject: "s".into(),
        });
        assert_eq!(apply_flags(file.clone(), &[]).unwrap(), file);
        let c = apply_flags(file, &["nats://b:2".into(), "nats://c:3".into()])
            .unwrap()
            .unwrap();
        assert_eq!((c.nats.len(), c.subject.as_str()), (2, "s"));
        let c = apply_flags(None, &["nats://b:2".into()]).unwrap().unwrap();
        assert_eq!(c.subject, DEFAULT_SUBJECT);
        let e = apply_flags(None, &["b:2".into()]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--cluster-nats: expected a nats://host:port URL"),
            "{e}"
        );
    }
}
