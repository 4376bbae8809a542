//! Per-shard counters (SPEC §6), the one [`CloseReason`] enum that logs, counters and tests
//! share, and [`DropReason`] for everything that was not delivered. Each shard owns its
//! [`ShardStats`] (plain `Cell`s, no atomics) and logs them when it stops.

use std::cell::Cell;
use std::fmt;

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
}

impl CloseReason {
    pub const ALL: [CloseReason; 11] = [
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
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why something was not delivered. Units differ by reason and are part of the name in
/// the docs: lines for the first three, envelopes for the next two, connections for the last two.
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
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::RateLimited,
        DropReason::LineTooLong,
        DropReason::InvalidUtf8,
        DropReason::SlowConsumer,
        DropReason::RecipientGone,
        DropReason::Quarantined,
        DropReason::ServerFull,
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
        }
    }
}

/// Counters owned by one shard. Only that shard's thread touches them.
#[derive(Default)]
pub struct ShardStats {
    /// Connections accepted (including ones closed at once by admission).
    pub accepted: Cell<u64>,
    /// Connections currently registered for fan-out.
    pub open: Cell<u64>,
    /// Closes, indexed like [`CloseReason::ALL`].
    pub closed: [Cell<u64>; CloseReason::ALL.len()],
    /// Complete lines received and accepted for relaying.
    pub lines_in: Cell<u64>,
    /// Envelopes written to recipients' sockets.
    pub envelopes_out: Cell<u64>,
    pub bytes_in: Cell<u64>,
    pub bytes_out: Cell<u64>,
    /// `send` calls that wrote at least one byte.
    pub socket_writes: Cell<u64>,
    /// Drops, indexed like [`DropReason::ALL`].
    pub dropped: [Cell<u64>; DropReason::ALL.len()],
    /// Largest number of messages queued for a stalled recipient seen on this shard.
    pub max_stalled_depth: Cell<u64>,
    /// Times a sender's reads were paused by throttle or flow control.
    pub sender_pauses: Cell<u64>,
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

    pub fn on_sender_pause(&self) {
        bump(&self.sender_pauses, 1);
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

    pub fn drop_counter(&self, reason: DropReason) -> &Cell<u64> {
        let i = DropReason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        &self.dropped[i]
    }

    /// One line with every counter, `key=value` separated by spaces (logged at shutdown).
    pub fn summary(&self) -> String {
        let mut s = format!(
            "accepted={} open={} lines_in={} envelopes_out={} bytes_in={} bytes_out={} socket_writes={} max_stalled_depth={} sender_pauses={}",
            self.accepted.get(),
            self.open.get(),
            self.lines_in.get(),
            self.envelopes_out.get(),
            self.bytes_in.get(),
            self.bytes_out.get(),
            self.socket_writes.get(),
            self.max_stalled_depth.get(),
            self.sender_pauses.get(),
        );
        for r in CloseReason::ALL {
            s.push_str(&format!(" closed.{}={}", r.as_str(), self.closed(r)));
        }
        for r in DropReason::ALL {
            s.push_str(&format!(" dropped.{}={}", r.as_str(), self.dropped(r)));
        }
        s
    }
}

fn bump(c: &Cell<u64>, n: u64) {
    c.set(c.get().wrapping_add(n));
}
