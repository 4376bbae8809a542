//! `GET /connections`: one JSON object per open connection (what nats-server's `/connz`
//! and Redis's `CLIENT LIST` show), so that an operator can find the slow consumer:
//! address, shard, when it connected, lines and bytes in and out, bytes queued for it and
//! its backpressure stage. Paged with `limit` and `offset`, sorted by `sort` (largest
//! first; `queued_bytes` by default, `connected_since` oldest first, `addr` ascending).
//!
//! Reads each shard's table of [`ConnStats`] (the lock is held only to clone the list) and
//! the connections' relaxed atomics: figures may be a few updates behind, never torn.

use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

use serde_json::{json, Value};

use super::report::stage_name;
use crate::metrics::ConnStats;
use crate::shared::Shared;

/// Connections per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: usize = 100;
/// Largest `limit` accepted: bounds the response's size.
pub const MAX_LIMIT: usize = 10_000;

/// What a `/connections` sort key orders by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    QueuedBytes,
    BytesOut,
    BytesIn,
    LinesOut,
    LinesIn,
    ConnectedSince,
    Addr,
}

impl SortKey {
    const ALL: [(SortKey, &'static str); 7] = [
        (SortKey::QueuedBytes, "queued_bytes"),
        (SortKey::BytesOut, "bytes_out"),
        (SortKey::BytesIn, "bytes_in"),
        (SortKey::LinesOut, "lines_out"),
        (SortKey::LinesIn, "lines_in"),
        (SortKey::ConnectedSince, "connected_since"),
        (SortKey::Addr, "addr"),
    ];

    fn name(self) -> &'static str {
        SortKey::ALL.iter().find(|(k, _)| *k == self).map_or("", |(_, n)| n)
    }

    /// Largest first for figures; oldest first for `connected_since`; ascending `addr`.
    fn compare(self, a: &ConnStats, b: &ConnStats) -> Ordering {
        let desc = |f: fn(&ConnStats) -> u64| f(b).cmp(&f(a));
        match self {
            SortKey::QueuedBytes => desc(|c| c.queued_bytes.get()),
            SortKey::BytesOut => desc(|c| c.bytes_out.get()),
            SortKey::BytesIn => desc(|c| c.bytes_in.get()),
            SortKey::LinesOut => desc(|c| c.envelopes_out.get()),
            SortKey::LinesIn => desc(|c| c.lines_in.get()),
            SortKey::ConnectedSince => a.connected_at_ms.cmp(&b.connected_at_ms),
            SortKey::Addr => Ordering::Equal,
        }
        // Ties in a stable order, so that pages neither skip nor repeat a connection.
        .then_with(|| a.addr.cmp(&b.addr))
        .then_with(|| a.shard.cmp(&b.shard))
    }
}

/// One page request, from the query string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub limit: usize,
    pub offset: usize,
    pub sort: SortKey,
}

/// A query string `/connections` refuses (400).
#[derive(Debug, PartialEq, Eq)]
pub struct PageError(String);

impl fmt::Display for PageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Page {
    /// `limit` (1 to [`MAX_LIMIT`], default [`DEFAULT_LIMIT`]), `offset` (default 0) and
    /// `sort` (default `queued_bytes`); anything else is an error naming it.
    pub fn parse(query: &str) -> Result<Page, PageError> {
        let mut page = Page {
            limit: DEFAULT_LIMIT,
            offset: 0,
            sort: SortKey::QueuedBytes,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let number = |min: usize, max: usize| {
                value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (min..=max).contains(n))
                    .ok_or_else(|| {
                        PageError(format!(
                            "{key}: expected an integer from {min} to {max}, found {value:?}"
                        ))
                    })
            };
            match key {
                "limit" => page.limit = number(1, MAX_LIMIT)?,
                "offset" => page.offset = number(0, usize::MAX)?,
                "sort" => {
                    page.sort = SortKey::ALL
                        .iter()
                        .find(|(_, n)| *n == value)
                        .map(|(k, _)| *k)
                        .ok_or_else(|| {
                            let names: Vec<&str> = SortKey::ALL.iter().map(|(_, n)| *n).collect();
                            PageError(format!("sort: expected one of {}, found {value:?}", names.join(", ")))
                        })?
                }
                other => {
                    return Err(PageError(format!(
                        "unknown parameter {other:?}; expected limit, offset or sort"
                    )))
                }
            }
        }
        Ok(page)
    }
}

fn connection_json(c: &ConnStats) -> Value {
    let since = chrono::DateTime::from_timestamp_millis(c.connected_at_ms as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default();
    json!({
        "addr": c.addr.to_string(),
        "shard": c.shard,
        "connected_since": since,
        "lines_in": c.lines_in.get(),
        "bytes_in": c.bytes_in.get(),
        "lines_out": c.envelopes_out.get(),
        "bytes_out": c.bytes_out.get(),
        "queued_bytes": c.queued_bytes.get(),
        "backpressure_stage": stage_name(c.stage()),
    })
}

/// The page: `total` open connections, the `offset`, `limit` and `sort` used, and the
/// page's `connections`.
pub fn connections_json(shared: &Shared, page: &Page) -> Value {
    let mut all: Vec<Arc<ConnStats>> = shared.stats.iter().flat_map(|s| s.connection_list()).collect();
    // Figures move while sorting; the comparison reads each once per call, which can only
    // misplace a connection whose figures changed meanwhile.
    all.sort_by(|a, b| page.sort.compare(a, b));
    let items: Vec<Value> = all
        .iter()
        .skip(page.offset)
        .take(page.limit)
        .map(|c| connection_json(c))
        .collect();
    json!({
        "total": all.len(),
        "offset": page.offset,
        "limit": page.limit,
        "sort": page.sort.name(),
        "connections": items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_is_parsed_with_defaults_and_bad_values_are_named() {
        assert_eq!(
            Page::parse(""),
            Ok(Page {
                limit: DEFAULT_LIMIT,
                offset: 0,
                sort: SortKey::QueuedBytes
            })
        );
        assert_eq!(
            Page::parse("limit=5&offset=10&sort=bytes_in"),
            Ok(Page {
                limit: 5,
                offset: 10,
                sort: SortKey::BytesIn
            })
        );
        let err = |q: &str| Page::parse(q).unwrap_err().to_string();
        assert_eq!(
            err("limit=0"),
            "limit: expected an integer from 1 to 10000, found \"0\""
        );
        assert_eq!(
            err("limit=10001"),
            "limit: expected an integer from 1 to 10000, found \"10001\""
        );
        assert!(err("offset=-1").starts_with("offset: expected an integer"));
        assert!(err("sort=speed").starts_with("sort: expected one of queued_bytes, bytes_out"));
        assert_eq!(
            err("page=2"),
            "unknown parameter \"page\"; expected limit, offset or sort"
        );
    }

    #[test]
    fn sorting_puts_the_largest_first_and_breaks_ties_by_address() {
        let conn = |port: u16, queued: u64| {
            let c = ConnStats::new(format!("127.0.0.1:{port}").parse().unwrap(), 0);
            c.queued_bytes.set(queued);
            c
        };
        let mut list = [conn(3, 5), conn(1, 9), conn(2, 5)];
        list.sort_by(|a, b| SortKey::QueuedBytes.compare(a, b));
        let ports: Vec<u16> = list.iter().map(|c| c.addr.port()).collect();
        assert_eq!(ports, [1, 2, 3]);
    }
}
