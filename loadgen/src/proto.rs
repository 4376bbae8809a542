//! The three wire protocols the generator speaks, so one workload shape runs against
//! corecast (Summoner lines and envelopes), nats-server (CONNECT with echo off, SUB, PUB)
//! and redis-server (RESP pub/sub; a subscribed connection cannot publish, so Redis
//! publishers use a second connection and drop their own messages on receipt).
//!
//! Every payload starts with a fixed-width header: publisher id, sequence number and the
//! scheduled send time in nanoseconds since the generator's epoch, padded to `--size`.

use std::fmt;

/// `PPPPPPPP SSSSSSSSSSSS TTTTTTTTTTTTTTTTTTTT`
pub const HEADER_LEN: usize = 8 + 1 + 12 + 1 + 20;
/// Prefix of the lines used to check that every receiver is subscribed before the run.
pub const SYNC_PREFIX: &[u8] = b"SYNC";
const SUBJECT: &str = "corecast.bench";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Summoner,
    Nats,
    Redis,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Summoner => "summoner",
            Protocol::Nats => "nats",
            Protocol::Redis => "redis",
        })
    }
}

/// What a payload header carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub publisher: u32,
    pub seq: u64,
    pub sched_ns: u64,
}

/// Appends a payload of `size` bytes (at least [`HEADER_LEN`]).
pub fn write_payload(out: &mut Vec<u8>, h: Header, size: usize) {
    let start = out.len();
    push_digits(out, h.publisher as u64, 8);
    out.push(b' ');
    push_digits(out, h.seq, 12);
    out.push(b' ');
    push_digits(out, h.sched_ns, 20);
    let pad = size.saturating_sub(out.len() - start);
    if pad > 0 {
        out.push(b' ');
        out.resize(out.len() + pad - 1, b'x');
    }
}

/// Appends `n` in decimal, zero-padded to `width` digits (its low digits if wider).
fn push_digits(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let start = out.len();
    out.resize(start + width, b'0');
    for d in out[start..].iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

pub fn parse_header(p: &[u8]) -> Option<Header> {
    if p.len() < HEADER_LEN || p[8] != b' ' || p[21] != b' ' {
        return None;
    }
    Some(Header {
        publisher: parse_digits(&p[..8])? as u32,
        seq: parse_digits(&p[9..21])?,
        sched_ns: parse_digits(&p[22..42])?,
    })
}

/// Parses ASCII decimal digits (wrapping past `u64`), eight at a time: this runs for every
/// message received, millions of times a second.
fn parse_digits(s: &[u8]) -> Option<u64> {
    let (head, eights) = s.split_at(s.len() % 8);
    let mut n = head.iter().try_fold(0u64, |acc, &b| {
        b.is_ascii_digit()
            .then(|| acc.wrapping_mul(10).wrapping_add((b - b'0') as u64))
    })?;
    for chunk in eights.chunks_exact(8) {
        let v = u64::from_le_bytes(chunk.try_into().expect("chunks of 8"));
        // Every byte is 0x30..=0x39: its high nibble is 3 and adding 6 does not carry.
        let digits = v.wrapping_sub(0x3030_3030_3030_3030);
        if v & 0xF0F0_F0F0_F0F0_F0F0 != 0x3030_3030_3030_3030
            || (digits.wrapping_add(0x0606_0606_0606_0606) & 0xF0F0_F0F0_F0F0_F0F0) != 0
        {
            return None;
        }
        // Combine neighbours: pairs, then fours, then the eight (first byte most significant).
        let v = (digits.wrapping_mul(10) + (digits >> 8)) & 0x00FF_00FF_00FF_00FF;
        let v = (v.wrapping_mul(100) + (v >> 16)) & 0x0000_FFFF_0000_FFFF;
        let v = (v.wrapping_mul(10000) + (v >> 32)) & 0xFFFF_FFFF;
        n = n.wrapping_mul(100_000_000).wrapping_add(v);
    }
    Some(n)
}

/// Something a receiving connection read.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A relayed payload.
    Message(&'a [u8]),
    /// The subscription is in place (NATS PONG to our PING, Redis subscribe reply).
    Subscribed,
    /// NATS keep-alive: answer with PONG.
    Ping,
    /// A relay notice (`Warning: ...`) or a server error line.
    Notice(&'a [u8]),
}

impl Protocol {
    /// Bytes a receiving connection sends first.
    pub fn subscribe(self) -> Vec<u8> {
        match self {
            Protocol::Summoner => Vec::new(),
            Protocol::Nats => format!(
                "CONNECT {{\"verbose\":false,\"pedantic\":false,\"echo\":false}}\r\nSUB {SUBJECT} 1\r\nPING\r\n"
            )
            .into_bytes(),
            Protocol::Redis => resp(&[b"SUBSCRIBE", SUBJECT.as_bytes()]),
        }
    }

    /// Bytes a Redis publishing connection or a NATS connection sends before publishing.
    pub fn publisher_hello(self) -> Vec<u8> {
        match self {
            Protocol::Nats => b"CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false}\r\n".to_vec(),
            _ => Vec::new(),
        }
    }

    /// Whether publishers need a connection of their own (Redis: a subscribed connection
    /// may not publish).
    pub fn separate_publisher(self) -> bool {
        self == Protocol::Redis
    }

    /// Appends one published message.
    pub fn publish(self, out: &mut Vec<u8>, payload: &[u8]) {
        match self {
            Protocol::Summoner => {
                out.extend_from_slice(payload);
                out.push(b'\n');
            }
            Protocol::Nats => {
                out.extend_from_slice(format!("PUB {SUBJECT} {}\r\n", payload.len()).as_bytes());
                out.extend_from_slice(payload);
                out.extend_from_slice(b"\r\n");
            }
            Protocol::Redis => out.extend_from_slice(&resp(&[b"PUBLISH", SUBJECT.as_bytes(), payload])),
        }
    }

    /// Decodes complete messages from `buf`, calling `on_event` for each; returns the bytes
    /// consumed (an incomplete tail stays for the next read). `Err` on garbage.
    pub fn decode(self, buf: &[u8], mut on_event: impl FnMut(Event)) -> Result<usize, String> {
        let mut pos = 0;
        loop {
            let rest = &buf[pos..];
            let step = match self {
                Protocol::Summoner => decode_summoner(rest, &mut on_event),
                Protocol::Nats => decode_nats(rest, &mut on_event)?,
                Protocol::Redis => decode_redis(rest, &mut on_event)?,
            };
            match step {
                Some(n) => pos += n,
                None => return Ok(pos),
            }
        }
    }
}

/// RESP array of bulk strings.
fn resp(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for p in parts {
        out.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
    out
}

const ENVELOPE_PREFIX: &[u8] = b"{\"content\":\"";

fn decode_summoner(buf: &[u8], on_event: &mut impl FnMut(Event)) -> Option<usize> {
    let end = memchr::memchr(b'\n', buf)?;
    let line = &buf[..end];
    if let Some(body) = line.strip_prefix(ENVELOPE_PREFIX) {
        // Payloads are plain ASCII without quotes, so the content ends at the first quote
        // (the start of the middle marker).
        let content_end = memchr::memchr(b'"', body).unwrap_or(body.len());
        on_event(Event::Message(&body[..content_end]));
    } else {
        on_event(Event::Notice(line));
    }
    Some(end + 1)
}

/// Where the first `\r\n` starts. Control lines hold no bare `\n`, so the first `\n` ends
/// the line (a plain `memchr`; `memmem::find` builds a searcher on every call).
fn find_crlf(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    loop {
        let nl = from + memchr::memchr(b'\n', &buf[from..])?;
        if nl > 0 && buf[nl - 1] == b'\r' {
            return Some(nl - 1);
        }
        from = nl + 1;
    }
}

fn decode_nats(buf: &[u8], on_event: &mut impl FnMut(Event)) -> Result<Option<usize>, String> {
    let Some(eol) = find_crlf(buf) else {
        return Ok(None);
    };
    let line = &buf[..eol];
    if let Some(args) = line.strip_prefix(b"MSG ") {
        // MSG <subject> <sid> [reply-to] <#bytes>
        let len: usize = args
            .rsplit(|&b| b == b' ')
            .next()
            .and_then(|n| std::str::from_utf8(n).ok())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("bad MSG line {:?}", String::from_utf8_lossy(line)))?;
        let start = eol + 2;
        if buf.len() < start + len + 2 {
            return Ok(None);
        }
        on_event(Event::Message(&buf[start..start + len]));
        return Ok(Some(start + len + 2));
    }
    match line {
        b"PING" => on_event(Event::Ping),
        b"PONG" => on_event(Event::Subscribed),
        _ if line.starts_with(b"-ERR") => on_event(Event::Notice(line)),
        _ => {} // INFO, +OK
    }
    Ok(Some(eol + 2))
}

/// Where a bulk string's bytes are in the buffer.
type Span = (usize, usize);

/// One RESP value: returns (end offset, bulk string payload if it was one).
fn resp_value(buf: &[u8], pos: usize) -> Result<Option<(usize, Option<Span>)>, String> {
    let Some(eol) = find_crlf(&buf[pos..]).map(|e| pos + e) else {
        return Ok(None);
    };
    let header = &buf[pos..eol];
    match header.first() {
        Some(b'$') => {
            let len: usize = std::str::from_utf8(&header[1..])
                .ok()
                .and_then(|n| n.parse().ok())
                .ok_or("bad RESP bulk length")?;
            let start = eol + 2;
            if buf.len() < start + len + 2 {
                return Ok(None);
            }
            Ok(Some((start + len + 2, Some((start, start + len)))))
        }
        Some(b':') | Some(b'+') | Some(b'-') => Ok(Some((eol + 2, None))),
        _ => Err(format!("unexpected RESP value {:?}", String::from_utf8_lossy(header))),
    }
}

fn decode_redis(buf: &[u8], on_event: &mut impl FnMut(Event)) -> Result<Option<usize>, String> {
    let Some(eol) = find_crlf(buf) else {
        return Ok(None);
    };
    let header = &buf[..eol];
    if header.first() != Some(&b'*') {
        // A plain reply (+OK, :n, -ERR) outside an array.
        if header.first() == Some(&b'-') {
            on_event(Event::Notice(header));
        }
        return Ok(Some(eol + 2));
    }
    let count: usize = std::str::from_utf8(&header[1..])
        .ok()
        .and_then(|n| n.parse().ok())
        .ok_or("bad RESP array length")?;
    let mut pos = eol + 2;
    let mut bulks = Vec::with_capacity(count);
    for _ in 0..count {
        let Some((end, bulk)) = resp_value(buf, pos)? else {
            return Ok(None);
        };
        bulks.push(bulk);
        pos = end;
    }
    match bulks.first().copied().flatten().map(|(s, e)| &buf[s..e]) {
        Some(b"message") => {
            if let Some(Some((s, e))) = bulks.get(2) {
                on_event(Event::Message(&buf[*s..*e]));
            }
        }
        Some(b"subscribe") => on_event(Event::Subscribed),
        _ => {}
    }
    Ok(Some(pos))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(p: Protocol, bytes: &[u8]) -> (Vec<String>, usize) {
        let mut out = Vec::new();
        let used = p
            .decode(bytes, |e| {
                out.push(match e {
                    Event::Message(m) => format!("msg:{}", String::from_utf8_lossy(m)),
                    Event::Subscribed => "subscribed".into(),
                    Event::Ping => "ping".into(),
                    Event::Notice(n) => format!("notice:{}", String::from_utf8_lossy(n)),
                })
            })
            .unwrap();
        (out, used)
    }

    #[test]
    fn payload_headers_round_trip_at_any_size() {
        let h = Header {
            publisher: 7,
            seq: 123456,
            sched_ns: 99,
        };
        for size in [0, HEADER_LEN, HEADER_LEN + 1, 100, 1000] {
            let mut p = Vec::new();
            write_payload(&mut p, h, size);
            assert_eq!(p.len(), size.max(HEADER_LEN));
            assert_eq!(parse_header(&p), Some(h));
        }
        assert_eq!(parse_header(b"SYNC 1"), None);
    }

    #[test]
    fn digits_parse_eight_at_a_time_and_reject_anything_else() {
        for n in [0u64, 7, 12345678, 99999999, 123456789012, 18446744073709551615] {
            for width in [8, 12, 20] {
                let mut s = Vec::new();
                push_digits(&mut s, n, width);
                let expect = if width == 20 { n } else { n % 10u64.pow(width as u32) };
                assert_eq!(parse_digits(&s), Some(expect), "{n} in {width}");
            }
        }
        for bad in [*b"1234567/", *b":2345678", *b"12 45678", *b"1234567a"] {
            assert_eq!(parse_digits(&bad), None, "{:?}", String::from_utf8_lossy(&bad));
        }
        assert_eq!(find_crlf(b"a\nb\r\nc"), Some(3));
        assert_eq!(find_crlf(b"\nab\r"), None);
    }

    #[test]
    fn summoner_envelopes_and_notices_decode() {
        let mut buf = Vec::new();
        corecast::protocol::encode_envelope(&mut buf, "hello", "127.0.0.1:9");
        buf.extend_from_slice(b"Warning: Server is shutting down.\n{\"content\":\"part");
        let (ev, used) = events(Protocol::Summoner, &buf);
        assert_eq!(ev, vec!["msg:hello", "notice:Warning: Server is shutting down."]);
        assert_eq!(&buf[used..], b"{\"content\":\"part");
    }

    #[test]
    fn nats_messages_pings_and_pongs_decode_across_partial_reads() {
        let mut pub_bytes = Vec::new();
        Protocol::Nats.publish(&mut pub_bytes, b"abc");
        assert_eq!(pub_bytes, b"PUB corecast.bench 3\r\nabc\r\n");
        let wire = b"INFO {}\r\nPONG\r\nMSG corecast.bench 1 5\r\nhello\r\nPING\r\nMSG corecast.bench 1 3\r\nab";
        let (ev, used) = events(Protocol::Nats, wire);
        assert_eq!(ev, vec!["subscribed", "msg:hello", "ping"]);
        assert_eq!(&wire[used..], b"MSG corecast.bench 1 3\r\nab");
    }

    #[test]
    fn redis_pubsub_messages_decode() {
        // A real subscribe reply ends with an integer, not a bulk.
        let mut wire = b"*3\r\n$9\r\nsubscribe\r\n$14\r\ncorecast.bench\r\n:1\r\n".to_vec();
        wire.extend_from_slice(&resp(&[b"message", b"corecast.bench", b"payload!"]));
        wire.extend_from_slice(b"*3\r\n$7\r\nmessage\r\n$14\r\ncorecast.be");
        let (ev, used) = events(Protocol::Redis, &wire);
        assert_eq!(ev, vec!["subscribed", "msg:payload!"]);
        assert!(wire[used..].starts_with(b"*3\r\n$7\r\nmessage"));
        let mut p = Vec::new();
        Protocol::Redis.publish(&mut p, b"hi");
        assert_eq!(p, b"*3\r\n$7\r\nPUBLISH\r\n$14\r\ncorecast.bench\r\n$2\r\nhi\r\n");
    }
}
