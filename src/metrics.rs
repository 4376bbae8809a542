//! Per-shard counters (docs/protocol.md#observability), the one [`CloseReason`] enum that
//! logs, counters and tests share, and [`DropReason`] for everything that was not
//! delivered. Each shard is the only writer of its [`ShardStats`] and logs them when it
//! stops; the admin thread ([`crate::admin`]) reads them at any time through
//! [`ShardStats::snapshot`].
//!
//! A [`Counter`] is an `AtomicU64` that only its shard writes, so an update is a relaxed
//! load and a relaxed store (a plain `mov`/`add` on x86, no `lock` prefix) rather than a
//! `fetch_add`: the hot path costs what the `Cell`s it replaced cost, and a reader on
//! another thread sees each counter whole, possibly a few updates behind.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backpressure::{Rule, Stage};

/// Why a connection ended. Every close has exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The client closed its side (EOF).
    PeerClosed,
    /// Reading failed (reset, timeout at the TCP level).
    ReadError,
    /// Writing failed (reset, broken pipe).
    WriteError,
    /// A line was not valid UTF-8 (N5).
    InvalidUtf8,
    /// A line exceeded `max_line_bytes` (N4).
    LineTooLong,
    /// No inbound bytes for `client_timeout_secs` (N2).
    IdleTimeout,
    /// The outbox crossed the disconnect threshold or `max_pending_bytes`.
    SlowConsumer,
    /// The peer is in the quarantine table; closed with no bytes.
    Quarantined,
    /// `max_connections` reached (N6).
    ServerFull,
    /// The relay is shutting down (N3).
    Shutdown,
    /// Handling this connection panicked; only it was closed.
    InternalError,
    /// Reset by the peer after the kernel completed it and before the relay could read its
    /// peer address: accepted, never admitted, no bytes either way.
    ResetBeforeServed,
    /// On the TLS listener: the handshake failed (bad or missing client certificate,
    /// protocol error, peer gone) or did not finish within `tls.handshake_timeout_ms`.
    TlsHandshakeFailed,
    /// On the TLS listener: `tls.max_handshakes` were in progress on the shard; closed at
    /// once with no bytes.
    TlsBusy,
    /// The client's address is on the `deny` list or off the `allow` list; no bytes.
    Denied,
    /// `max_connections_per_ip` were open from the client's address (N7).
    HostFull,
    /// PROXY protocol on, and the connection came from outside `proxy_trusted`; no bytes.
    ProxyUntrusted,
    /// The PROXY header broke the specification; no bytes.
    ProxyMalformed,
    /// The PROXY header was longer than the protocol or the relay allows; no bytes.
    ProxyOversize,
    /// The connection ended before its PROXY header was complete.
    ProxyTruncated,
    /// The PROXY header was not complete within `proxy_header_timeout_ms`; no bytes.
    ProxyTimeout,
    /// A PROXY header with no client address (LOCAL, a health check): closed with no bytes.
    ProxyLocal,
}

impl CloseReason {
    pub const ALL: [CloseReason; 22] = [
        CloseReason::PeerClosed,
        CloseReason::ReadError,
        CloseReason::WriteError,
        CloseReason::InvalidUtf8,
        CloseReason::LineTooLong,
        CloseReason::IdleTimeout,
        CloseReason::SlowConsumer,
        CloseReason::Quarantined,
        CloseReason::ServerFull,
        CloseReason::Shutdown,
        CloseReason::InternalError,
        CloseReason::ResetBeforeServed,
        CloseReason::TlsHandshakeFailed,
        CloseReason::TlsBusy,
        CloseReason::Denied,
        CloseReason::HostFull,
        CloseReason::ProxyUntrusted,
        CloseReason::ProxyMalformed,
        CloseReason::ProxyOversize,
        CloseReason::ProxyTruncated,
        CloseReason::ProxyTimeout,
        CloseReason::ProxyLocal,
    ];

    /// The label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::ReadError => "read_error",
            CloseReason::WriteError => "write_error",
            CloseReason::InvalidUtf8 => "invalid_utf8",
            CloseReason::LineTooLong => "line_too_long",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Quarantined => "quarantined",
            CloseReason::ServerFull => "server_full",
            CloseReason::Shutdown => "shutdown",
            CloseReason::InternalError => "internal_error",
            CloseReason::ResetBeforeServed => "reset_before_served",
            CloseReason::TlsHandshakeFailed => "tls_handshake_failed",
            CloseReason::TlsBusy => "tls_busy",
            CloseReason::Denied => "denied",
            CloseReason::HostFull => "host_full",
            CloseReason::ProxyUntrusted => "proxy_untrusted",
            CloseReason::ProxyMalformed => "proxy_malformed",
            CloseReason::ProxyOversize => "proxy_oversize",
            CloseReason::ProxyTruncated => "proxy_truncated",
            CloseReason::ProxyTimeout => "proxy_timeout",
            CloseReason::ProxyLocal => "proxy_local",
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why something was not delivered. Units differ by reason and are part of the name in the
/// docs: lines for the first three, envelopes for the next two, connections for the two
/// after, envelopes for the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A line the sender's token bucket refused (lines).
    RateLimited,
    /// The line that exceeded `max_line_bytes` (lines).
    LineTooLong,
    /// The line that was not valid UTF-8 (lines).
    InvalidUtf8,
    /// Envelopes queued for a recipient closed as a slow consumer (envelopes).
    SlowConsumer,
    /// Envelopes queued for a recipient that closed for any other reason (envelopes).
    RecipientGone,
    /// Connections refused because the peer is quarantined (connections).
    Quarantined,
    /// Connections refused because `max_connections` was reached (connections).
    ServerFull,
    /// Envelopes of a batch handed to a peer (a shard, the cluster uplink) whose end of the
    /// mesh is gone: only at shutdown, or if its thread died beyond restarting (envelopes).
    PeerGone,
}

impl DropReason {
    pub const ALL: [DropReason; 8] = [
        DropReason::RateLimited,
        DropReason::LineTooLong,
        DropReason::InvalidUtf8,
        DropReason::SlowConsumer,
        DropReason::RecipientGone,
        DropReason::Quarantined,
        DropReason::ServerFull,
        DropReason::PeerGone,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::RateLimited => "rate_limited",
            DropReason::LineTooLong => "line_too_long",
            DropReason::InvalidUtf8 => "invalid_utf8",
            DropReason::SlowConsumer => "slow_consumer",
            DropReason::RecipientGone => "recipient_gone",
            DropReason::Quarantined => "quarantined",
            DropReason::ServerFull => "server_full",
            DropReason::PeerGone => "peer_gone",
        }
    }
}

/// A counter with one writer (its shard's thread) and any number of readers.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }

    /// Only the owning shard calls this: load + store is not atomic as a whole, which is
    /// fine with a single writer and cheaper than `fetch_add`.
    pub fn add(&self, n: u64) {
        self.0.store(self.get().wrapping_add(n), Relaxed);
    }

    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed);
    }
}

/// Where a shard is in its life, as the admin endpoint reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardState {
    /// Spawned, not yet accepting.
    Starting,
    /// Connected to its peers and accepting.
    Running,
    /// Shutdown started: no more accepts or reads, flushing what is queued.
    Draining,
    /// Its thread's future ended or unwound.
    Stopped,
}

impl ShardState {
    pub fn as_str(self) -> &'static str {
        match self {
            ShardState::Starting => "starting",
            ShardState::Running => "running",
            ShardState::Draining => "draining",
            ShardState::Stopped => "stopped",
        }
    }
}

/// Counters owned by one shard: only that shard's thread writes them; the admin thread
/// reads them. Shared through an `Arc` held by the shard and by [`crate::shared::Shared`].
#[derive(Default)]
pub struct ShardStats {
    /// Connections accepted (including ones closed at once by admission).
    pub accepted: Counter,
    /// Connections currently registered for fan-out.
    pub open: Counter,
    /// Closes, indexed like [`CloseReason::ALL`].
    pub closed: [Counter; CloseReason::ALL.len()],
    /// Complete lines received and accepted for relaying.
    pub lines_in: Counter,
    /// Envelopes written to recipients' sockets.
    pub envelopes_out: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    /// `send` calls that wrote at least one byte.
    pub socket_writes: Counter,
    /// Drops, indexed like [`DropReason::ALL`].
    pub dropped: [Counter; DropReason::ALL.len()],
    /// Largest number of messages queued for a stalled recipient seen on this shard.
    pub max_stalled_depth: Counter,
    /// Times a sender's reads were paused by throttle, flow control or the process-wide
    /// bound on queued bytes.
    pub sender_pauses: Counter,
    /// Total time of those pauses, in milliseconds (exported in seconds).
    pub sender_pause_ms: Counter,
    /// `slow_consumer` closes, indexed like [`Rule::ALL`].
    pub slow_consumer_by_rule: [Counter; Rule::ALL.len()],
    /// Socket reads done at the flush task's runs rather than on a readiness wake-up of
    /// their own: busy senders at their turns, occasional ones found in the ready set.
    pub reads_at_runs: Counter,
    /// Slow-consumer closes recorded as a strike against their key (quarantine on).
    pub quarantine_strikes: Counter,
    /// Strikes that quarantined their key (the `quarantine_strikes`-th in the window).
    pub quarantines: Counter,
    /// [`ShardState`] as a `u8`, written by the shard (and by its stop guard).
    state: AtomicU8,
    /// Milliseconds since [`crate::shared::Shared::epoch`] at the shard's last heartbeat,
    /// written by a timer task on the shard: it stops moving when the shard's thread is
    /// stuck.
    heartbeat_ms: Counter,
    /// Times the main thread woke this shard's thread because its heartbeat was stale
    /// (glommio parked it with work queued; see `executor::kick`). Written by the main thread.
    pub kicks: Counter,
    /// The relay's own delay, per batch: from its first line's read to the first socket
    /// write on this shard after the batch was queued (see `Fanout::on_first_write`).
    pub relay_delay: DelayHistogram,
    /// The shard's open connections, for `/connections`: the shard inserts and removes
    /// (once per connection), the admin thread clones the list at request time.
    pub connections: Mutex<HashMap<u64, Arc<ConnStats>>>,
}

/// Every figure of one shard at one moment, for export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub accepted: u64,
    pub open: u64,
    pub closed: [u64; CloseReason::ALL.len()],
    pub lines_in: u64,
    pub envelopes_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub socket_writes: u64,
    pub dropped: [u64; DropReason::ALL.len()],
    pub max_stalled_depth: u64,
    pub sender_pauses: u64,
    pub sender_pause_ms: u64,
    pub slow_consumer_by_rule: [u64; Rule::ALL.len()],
    pub reads_at_runs: u64,
    pub quarantine_strikes: u64,
    pub quarantines: u64,
    pub kicks: u64,
}

impl ShardStats {
    pub fn on_accept(&self) {
        bump(&self.accepted, 1);
    }

    pub fn on_open(&self) {
        bump(&self.open, 1);
    }

    pub fn on_close(&self, reason: CloseReason, was_open: bool) {
        let i = CloseReason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        bump(&self.closed[i], 1);
        if was_open {
            self.open.set(self.open.get().saturating_sub(1));
        }
    }

    pub fn on_read(&self, bytes: usize) {
        bump(&self.bytes_in, bytes as u64);
    }

    pub fn on_line(&self) {
        bump(&self.lines_in, 1);
    }

    pub fn on_write(&self, bytes: usize) {
        bump(&self.socket_writes, 1);
        bump(&self.bytes_out, bytes as u64);
    }

    pub fn on_delivered(&self, envelopes: u64) {
        bump(&self.envelopes_out, envelopes);
    }

    pub fn on_drop(&self, reason: DropReason, n: u64) {
        bump(self.drop_counter(reason), n);
    }

    pub fn on_sender_pause(&self, took: std::time::Duration) {
        bump(&self.sender_pauses, 1);
        bump(&self.sender_pause_ms, took.as_millis() as u64);
    }

    pub fn on_slow_consumer(&self, rule: Rule) {
        let i = Rule::ALL.iter().position(|r| *r == rule).unwrap_or(0);
        bump(&self.slow_consumer_by_rule[i], 1);
    }

    pub fn on_read_at_run(&self) {
        bump(&self.reads_at_runs, 1);
    }

    /// A strike against a slow consumer's key; `quarantined` when it was the last one.
    pub fn on_strike(&self, quarantined: bool) {
        bump(&self.quarantine_strikes, 1);
        if quarantined {
            bump(&self.quarantines, 1);
        }
    }

    pub fn on_stalled_depth(&self, depth: u64) {
        if depth > self.max_stalled_depth.get() {
            self.max_stalled_depth.set(depth);
        }
    }

    pub fn closed(&self, reason: CloseReason) -> u64 {
        let i = CloseReason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        self.closed[i].get()
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drop_counter(reason).get()
    }

    pub fn drop_counter(&self, reason: DropReason) -> &Counter {
        let i = DropReason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        &self.dropped[i]
    }

    pub fn set_state(&self, state: ShardState) {
        self.state.store(state as u8, Relaxed);
    }

    pub fn state(&self) -> ShardState {
        match self.state.load(Relaxed) {
            s if s == ShardState::Running as u8 => ShardState::Running,
            s if s == ShardState::Draining as u8 => ShardState::Draining,
            s if s == ShardState::Stopped as u8 => ShardState::Stopped,
            _ => ShardState::Starting,
        }
    }

    /// Records that the shard's thread ran a timer task `now_ms` after the epoch.
    pub fn on_heartbeat(&self, now_ms: u64) {
        self.heartbeat_ms.set(now_ms);
    }

    /// The main thread (the only writer of `kicks`) woke the shard.
    pub fn on_kick(&self) {
        bump(&self.kicks, 1);
    }

    pub fn last_heartbeat_ms(&self) -> u64 {
        self.heartbeat_ms.get()
    }

    /// Every counter as plain numbers (each read on its own; see the module docs).
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            accepted: self.accepted.get(),
            open: self.open.get(),
            closed: std::array::from_fn(|i| self.closed[i].get()),
            lines_in: self.lines_in.get(),
            envelopes_out: self.envelopes_out.get(),
            bytes_in: self.bytes_in.get(),
            bytes_out: self.bytes_out.get(),
            socket_writes: self.socket_writes.get(),
            dropped: std::array::from_fn(|i| self.dropped[i].get()),
            max_stalled_depth: self.max_stalled_depth.get(),
            sender_pauses: self.sender_pauses.get(),
            sender_pause_ms: self.sender_pause_ms.get(),
            slow_consumer_by_rule: std::array::from_fn(|i| self.slow_consumer_by_rule[i].get()),
            reads_at_runs: self.reads_at_runs.get(),
            quarantine_strikes: self.quarantine_strikes.get(),
            quarantines: self.quarantines.get(),
            kicks: self.kicks.get(),
        }
    }

    /// Registers an open connection for `/connections`.
    pub fn add_connection(&self, id: u64, conn: Arc<ConnStats>) {
        self.connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, conn);
    }

    pub fn remove_connection(&self, id: u64) {
        self.connections.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }

    /// The open connections now (the lock is held only to clone the list).
    pub fn connection_list(&self) -> Vec<Arc<ConnStats>> {
        let table = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        table.values().cloned().collect()
    }
}

/// Upper bounds of [`DelayHistogram`]'s buckets, in seconds: 50 µs to 1 s (the flush
/// window is 1.5 ms by default; a delay past 1 s is counted only in `+Inf`).
pub const DELAY_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// A latency histogram with one writer (its shard): per-bucket counts (not cumulative;
/// the last one is `+Inf`) and the sum in nanoseconds. Observing is a bucket search over
/// 14 bounds and two relaxed stores.
#[derive(Default)]
pub struct DelayHistogram {
    buckets: [Counter; DELAY_BUCKETS.len() + 1],
    sum_ns: Counter,
}

impl DelayHistogram {
    pub fn observe(&self, delay: Duration) {
        let secs = delay.as_secs_f64();
        let i = DELAY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(DELAY_BUCKETS.len());
        self.buckets[i].add(1);
        self.sum_ns.add(delay.as_nanos().min(u64::MAX as u128) as u64);
    }

    /// `(sum in seconds, count, [(upper bound, count in that bucket)])`, `+Inf` last.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let counts: Vec<u64> = self.buckets.iter().map(Counter::get).collect();
        let bounds = DELAY_BUCKETS.iter().copied().chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = bounds.zip(counts.iter().copied()).collect();
        (self.sum_ns.get() as f64 / 1e9, counts.iter().sum(), buckets)
    }
}

/// One connection's figures for `/connections`: written only by its shard (relaxed
/// stores), read by the admin thread. Shared through an `Arc` held by the `Client` and by
/// its shard's [`ShardStats::connections`] while it is open.
pub struct ConnStats {
    pub addr: SocketAddr,
    pub shard: usize,
    /// Unix time of the accept, in milliseconds.
    pub connected_at_ms: u64,
    /// Complete lines accepted for relaying.
    pub lines_in: Counter,
    pub bytes_in: Counter,
    /// Envelopes written to its socket.
    pub envelopes_out: Counter,
    pub bytes_out: Counter,
    /// Bytes queued for it and not yet taken by its socket, as of its last enqueue or write.
    pub queued_bytes: Counter,
    /// Its backpressure [`Stage`] as of the policy's last look at it.
    stage: AtomicU8,
}

impl ConnStats {
    pub fn new(addr: SocketAddr, shard: usize) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        ConnStats {
            addr,
            shard,
            connected_at_ms: now.as_millis() as u64,
            lines_in: Counter::default(),
            bytes_in: Counter::default(),
            envelopes_out: Counter::default(),
            bytes_out: Counter::default(),
            queued_bytes: Counter::default(),
            stage: AtomicU8::new(Stage::None as u8),
        }
    }

    pub fn set_stage(&self, stage: Stage) {
        self.stage.store(stage as u8, Relaxed);
    }

    pub fn stage(&self) -> Stage {
        Stage::from_u8(self.stage.load(Relaxed))
    }
}

/// SIGHUP reloads by outcome, for `corecast_config_reloads_total{result}`: written by the
/// main thread's reload, read by the admin thread.
#[derive(Default)]
pub struct ReloadCounts {
    pub success: AtomicU64,
    pub failure: AtomicU64,
}

impl ReloadCounts {
    pub fn on_reload(&self, ok: bool) {
        let counter = if ok { &self.success } else { &self.failure };
        counter.fetch_add(1, Relaxed);
    }
}

/// The process's reload counts (one config per process).
pub static CONFIG_RELOADS: ReloadCounts = ReloadCounts {
    success: AtomicU64::new(0),
    failure: AtomicU64::new(0),
};

impl StatsSnapshot {
    /// The plain counters (everything but the per-reason arrays), by name.
    pub fn scalars(&self) -> [(&'static str, u64); 14] {
        [
            ("accepted", self.accepted),
            ("open", self.open),
            ("lines_in", self.lines_in),
            ("envelopes_out", self.envelopes_out),
            ("bytes_in", self.bytes_in),
            ("bytes_out", self.bytes_out),
            ("socket_writes", self.socket_writes),
            ("max_stalled_depth", self.max_stalled_depth),
            ("sender_pauses", self.sender_pauses),
            ("sender_pause_ms", self.sender_pause_ms),
            ("reads_at_runs", self.reads_at_runs),
            ("quarantine_strikes", self.quarantine_strikes),
            ("quarantines", self.quarantines),
            ("kicks", self.kicks),
        ]
    }

    /// Adds `other` into `self` (the high-water mark takes the larger of the two).
    pub fn merge(&mut self, other: &StatsSnapshot) {
        self.accepted += other.accepted;
        self.open += other.open;
        self.lines_in += other.lines_in;
        self.envelopes_out += other.envelopes_out;
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.socket_writes += other.socket_writes;
        self.max_stalled_depth = self.max_stalled_depth.max(other.max_stalled_depth);
        self.sender_pauses += other.sender_pauses;
        self.sender_pause_ms += other.sender_pause_ms;
        for (a, b) in self.slow_consumer_by_rule.iter_mut().zip(other.slow_consumer_by_rule) {
            *a += b;
        }
        self.reads_at_runs += other.reads_at_runs;
        self.quarantine_strikes += other.quarantine_strikes;
        self.quarantines += other.quarantines;
        self.kicks += other.kicks;
        for (a, b) in self.closed.iter_mut().zip(other.closed) {
            *a += b;
        }
        for (a, b) in self.dropped.iter_mut().zip(other.dropped) {
            *a += b;
        }
    }

    pub fn closed(&self, reason: CloseReason) -> u64 {
        let i = CloseReason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        self.closed[i]
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        let i = DropReason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        self.dropped[i]
    }

    /// One line with `accepted` and every other counter that is not zero, `key=value`
    /// separated by spaces (a shard that saw little says little).
    pub fn summary(&self) -> String {
        let mut parts: Vec<String> = self.scalars().iter().map(|(k, v)| format!("{k}={v}")).collect();
        parts.extend(
            CloseReason::ALL
                .iter()
                .map(|r| format!("closed.{}={}", r.as_str(), self.closed(*r))),
        );
        parts.extend(
            Rule::ALL
                .iter()
                .zip(self.slow_consumer_by_rule)
                .map(|(r, n)| format!("slow_consumer.{}={n}", r.as_str())),
        );
        parts.extend(
            DropReason::ALL
                .iter()
                .map(|r| format!("dropped.{}={}", r.as_str(), self.dropped(*r))),
        );
        parts.retain(|p| p.starts_with("accepted=") || !p.ends_with("=0"));
        parts.join(" ")
    }
}

fn bump(c: &Counter, n: u64) {
    c.add(n);
}
