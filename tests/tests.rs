//! corecast's integration tests: the real relay over real sockets. One module per area;
//! `util` is the harness they share. The load generator's runs against the relay are a
//! second binary, `tests/loadgen.rs`, on the same harness: cargo runs it on its own, so
//! those runs do not share the CPUs with these tests.

/// The admin endpoint: `/metrics`, `/healthz`, `/stats`, bad requests and its bounds.
mod admin;
/// Admission by network and the PROXY protocol: allow/deny, per-host cap, HAProxy in front.
mod admission;
/// Slow consumers with realistic blocking readers: who gets everything, who is closed.
mod backpressure;
/// Several nodes over a NATS cluster: cross-node delivery, NATS and node failures.
mod cluster;
/// Config files, flags, `corecast check`, config errors and the log format.
mod config;
/// The ops kit in deploy/: the dashboard's and alert rules' series exist in a real scrape.
mod deploy;
/// The markdown documents' intra-repo links and anchors resolve.
mod docs;
/// Fan-out: everyone else gets every line in per-sender order; the flush window and reads.
mod fanout;
/// Operations: file and JSON logs, `log_keys`, systemd readiness and the shipped unit.
mod ops;
/// Limits, notices and policies: rate limit, quarantine, idle timeout, admission, shutdown.
mod policy;
/// One test per fixed bug.
mod regression;
/// SIGHUP reload: live keys on connected clients, the log level, invalid files, restart-only keys.
mod reload;
/// Many shards: prompt start-up, a shard that does not start, fan-out over 8 and more.
mod shards;
/// Start-up checks: port in use, port guard, locked memory, io_uring.
mod startup;
/// TLS on the second listener: Python `ssl` clients beside plain ones, mTLS, bad files,
/// shutdown notice over TLS, handshake bounds.
mod tls;
/// The harness: starts the relay binary, clients, logs, waits, HTTP to the admin endpoint.
mod util;
/// The wire protocol: framing and the byte-exact envelope.
mod wire;
