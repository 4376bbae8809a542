//! The `hyper_parameters.cluster` section's value and the checks of its two keys. The keys
//! themselves (`nats`, `subject`: path, type, default, docs) are declared in the config key
//! table (`config/keys.rs`), which calls the checks here; `null` (or no section) means a
//! single node: no uplink, no thread, no cost.

/// The subject every node publishes to and subscribes on when the file gives none.
pub const DEFAULT_SUBJECT: &str = "corecast";

/// Most NATS URLs a node may list; more is a typo or a generated list gone wrong.
pub const MAX_URLS: usize = 64;

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

/// `nats://host:port` (the port may be left out: 4222). TLS is not built in, so `tls://`
/// is refused here rather than failing at every connect.
pub fn is_valid_url(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("nats://") else {
        return false;
    };
    // Credentials (`user:pass@`) are allowed by NATS URLs; the host part follows the last '@'.
    let hostport = rest.rsplit('@').next().unwrap_or(rest);
    if hostport.is_empty() || hostport.contains('/') || hostport.chars().any(char::is_whitespace) {
        return false;
    }
    let port = if hostport.starts_with('[') {
        // [v6]:port or [v6]
        match hostport.find(']') {
            Some(end) => hostport[end + 1..].strip_prefix(':'),
            None => return false,
        }
    } else {
        hostport.rsplit_once(':').map(|(_, p)| p)
    };
    port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p != 0))
}

/// A literal NATS subject: dot-separated non-empty tokens without wildcards or spaces.
pub fn is_valid_subject(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s.split('.')
            .all(|t| !t.is_empty() && t != "*" && t != ">" && !t.chars().any(|c| c.is_whitespace() || c.is_control()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_need_the_nats_scheme_and_a_usable_port() {
        for ok in [
            "nats://127.0.0.1:4222",
            "nats://h2",
            "nats://[::1]:4222",
            "nats://u:p@h:1",
        ] {
            assert!(is_valid_url(ok), "{ok}");
        }
        for bad in [
            "http://a:1",
            "nats://a:0",
            "nats://a:99999",
            "nats://",
            "nats://a/b",
            "nats://[::1",
        ] {
            assert!(!is_valid_url(bad), "{bad}");
        }
    }

    #[test]
    fn subjects_are_literal_dot_separated_tokens() {
        assert!(is_valid_subject("room.a"));
        for bad in ["", "a.*", "a..b", "a >", "a.>"] {
            assert!(!is_valid_subject(bad), "{bad}");
        }
    }
}
