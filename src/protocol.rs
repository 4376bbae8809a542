//! The wire protocol (docs/protocol.md#wire-protocol): inbound line framing, the outbound
//! JSON envelope and the notice texts. Pure functions over byte slices; the connection
//! module feeds it socket reads, the load generator and the tests use it to check what
//! comes back.
//!
//! Invariants: a [`Framer`] never holds more than `max_line_bytes + 1` bytes of a partial
//! line (the `+ 1` is a trailing `\r` that may still be stripped), and every line it hands
//! out is valid UTF-8 with the terminator and one trailing `\r` removed.

use std::fmt;

/// N1: a line was dropped by the rate limiter.
pub const NOTICE_RATE_LIMITED: &str = "Warning: You are sending messages too quickly. Please slow down.\n";
/// N2: idle timeout; the connection is closed after it.
pub const NOTICE_IDLE: &str = "Warning: You have been disconnected due to inactivity.\n";
/// N3: shutdown; the connection is closed after it.
pub const NOTICE_SHUTDOWN: &str = "Warning: Server is shutting down.\n";
/// N5: invalid UTF-8; the connection is closed after it.
pub const NOTICE_INVALID_UTF8: &str = "Warning: Message is not valid UTF-8. Disconnecting.\n";
/// N6: `max_connections` reached; the connection is closed after it.
pub const NOTICE_SERVER_FULL: &str = "Warning: Server is full. Please try again later.\n";
/// N7: `max_connections_per_ip` reached for the client's address; closed after it.
pub const NOTICE_HOST_FULL: &str = "Warning: Too many connections from your address. Please try again later.\n";

/// N4: a line over `max_line_bytes`; the connection is closed after it.
pub fn notice_line_too_long(max_line_bytes: usize) -> String {
    format!("Warning: Message too long (limit {max_line_bytes} bytes). Disconnecting.\n")
}

/// Why a connection's input cannot be framed any further. Both end the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// A line's content exceeded `max_line_bytes` (detected while still partial).
    LineTooLong,
    /// A complete line was not valid UTF-8.
    InvalidUtf8,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::LineTooLong => f.write_str("line too long"),
            FrameError::InvalidUtf8 => f.write_str("line is not valid UTF-8"),
        }
    }
}

/// Splits a byte stream into lines. Holds only the unfinished tail of the stream, so an
/// idle connection costs no buffer at all (the bytes themselves are read into a scratch
/// buffer owned by the shard).
#[derive(Debug)]
pub struct Framer {
    /// Bytes of the current line not yet terminated; empty (and unallocated) between lines.
    partial: Vec<u8>,
    /// Longest line content accepted, in bytes.
    max_line_bytes: usize,
}

impl Framer {
    pub fn new(max_line_bytes: usize) -> Self {
        Framer {
            partial: Vec::new(),
            max_line_bytes,
        }
    }

    /// Bytes currently held for an unfinished line.
    pub fn partial_len(&self) -> usize {
        self.partial.len()
    }

    /// Bytes allocated for the unfinished line (its capacity), what it pins in memory.
    pub fn held(&self) -> usize {
        self.partial.capacity()
    }

    /// Feeds `input` and calls `on_line` with every complete line, in order. Lines before a
    /// bad one are handed out before the error is returned; after an error the framer
    /// must not be fed again.
    pub fn feed(&mut self, mut input: &[u8], mut on_line: impl FnMut(&str)) -> Result<(), FrameError> {
        while let Some(pos) = memchr::memchr(b'\n', input) {
            let (head, rest) = (&input[..pos], &input[pos + 1..]);
            input = rest;
            if self.partial.is_empty() {
                on_line(self.check(head)?);
            } else {
                self.partial.extend_from_slice(head);
                let line = std::mem::take(&mut self.partial);
                on_line(self.check(&line)?);
                // Keep the allocation only while lines keep spanning reads.
                self.partial = line;
                self.partial.clear();
            }
        }
        if !input.is_empty() {
            // One byte of slack: a trailing `\r` at the limit may still be stripped.
            let needed = self.partial.len() + input.len();
            if needed > self.max_line_bytes + 1 {
                return Err(FrameError::LineTooLong);
            }
            if needed > self.partial.capacity() {
                // Grown in steps of at most 64 KiB, not doubled: what a partial line holds
                // (`held`) counts against the process-wide bound, and doubling could hold
                // twice the line.
                let step = 64 << 10;
                let target = if needed < step {
                    needed.next_power_of_two()
                } else {
                    needed.next_multiple_of(step)
                };
                let target = target.min(self.max_line_bytes + 1).max(needed);
                self.partial.reserve_exact(target - self.partial.len());
            }
            self.partial.extend_from_slice(input);
        } else if self.partial.capacity() > 0 && self.partial.is_empty() {
            self.partial = Vec::new();
        }
        Ok(())
    }

    /// Ends the stream: a final unterminated line is returned as a message
    /// (docs/protocol.md#inbound-framing).
    pub fn finish(&mut self, on_line: impl FnOnce(&str)) -> Result<(), FrameError> {
        if self.partial.is_empty() {
            return Ok(());
        }
        let line = std::mem::take(&mut self.partial);
        on_line(self.check(&line)?);
        Ok(())
    }

    /// Strips one trailing `\r`, then enforces the length limit and UTF-8.
    fn check<'a>(&self, line: &'a [u8]) -> Result<&'a str, FrameError> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > self.max_line_bytes {
            return Err(FrameError::LineTooLong);
        }
        std::str::from_utf8(line).map_err(|_| FrameError::InvalidUtf8)
    }
}

/// What each byte becomes inside a JSON string: 0 = copied raw, `b'u'` = `\u00xx`, any
/// other value = a two-byte escape `\<value>`. This is serde_json's compact table.
const ESCAPE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        table[i] = b'u';
        i += 1;
    }
    table[0x08] = b'b';
    table[0x09] = b't';
    table[0x0A] = b'n';
    table[0x0C] = b'f';
    table[0x0D] = b'r';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `s` to `out` escaped as the inside of a JSON string
/// (docs/protocol.md#the-envelope).
pub fn escape_json_into(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let mut start = 0;
    while let Some(i) = next_to_escape(bytes, start) {
        out.extend_from_slice(&bytes[start..i]);
        let (b, esc) = (bytes[i], ESCAPE[bytes[i] as usize]);
        if esc == b'u' {
            out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[(b >> 4) as usize], HEX[(b & 0xF) as usize]]);
        } else {
            out.extend_from_slice(&[b'\\', esc]);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// The index of the first byte at or after `from` that JSON needs escaped (a control byte,
/// `"` or a backslash).
fn next_to_escape(bytes: &[u8], from: usize) -> Option<usize> {
    let from = skip_plain(bytes, from);
    bytes[from..]
        .iter()
        .position(|&b| ESCAPE[b as usize] != 0)
        .map(|i| from + i)
}

#[cfg(target_arch = "x86_64")]
use skip_plain_sse2 as skip_plain;
#[cfg(not(target_arch = "x86_64"))]
use skip_plain_swar as skip_plain;

/// Skips 16 bytes at a time while none of them needs escaping, with SSE2 (part of every
/// x86_64 CPU). Returns the index of the first byte to escape, or where fewer than 16
/// bytes are left.
#[cfg(target_arch = "x86_64")]
fn skip_plain_sse2(bytes: &[u8], mut from: usize) -> usize {
    use std::arch::x86_64::*;
    // SAFETY: SSE2 is in the x86_64 baseline, and every load reads 16 bytes in bounds
    // (unaligned loads are allowed).
    unsafe {
        let quote = _mm_set1_epi8(b'"' as i8);
        let backslash = _mm_set1_epi8(b'\\' as i8);
        let last_control = _mm_set1_epi8(0x1f);
        while from + 16 <= bytes.len() {
            let v = _mm_loadu_si128(bytes.as_ptr().add(from).cast());
            // A control byte is one that min(byte, 0x1f) leaves unchanged (unsigned).
            let control = _mm_cmpeq_epi8(_mm_min_epu8(v, last_control), v);
            let quoting = _mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash));
            let mask = _mm_movemask_epi8(_mm_or_si128(control, quoting));
            if mask != 0 {
                return from + mask.trailing_zeros() as usize;
            }
            from += 16;
        }
    }
    from
}

/// Skips eight bytes at a time while none of them needs escaping: the portable version,
/// also tested on x86_64 against the SSE2 one.
#[cfg_attr(all(target_arch = "x86_64", not(test)), allow(dead_code))]
fn skip_plain_swar(bytes: &[u8], mut from: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // Non-zero iff some byte of `w` is below `n` (n <= 128); a borrow only spreads upward
    // from a byte that already is.
    let any_below = |w: u64, n: u8| w.wrapping_sub(ONES * n as u64) & !w & HIGHS;
    let any_equal = |w: u64, b: u8| any_below(w ^ (ONES * b as u64), 1);
    while let Some(chunk) = bytes.get(from..from + 8) {
        let w = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        if any_below(w, 0x20) | any_equal(w, b'"') | any_equal(w, b'\\') != 0 {
            break;
        }
        from += 8;
    }
    from
}

/// Appends the envelope `{"content":"<line>","remote_addr":"<addr>"}\n` to `out`.
/// `remote_addr` is the sender's `SocketAddr` as Display prints it; it never needs
/// escaping.
pub fn encode_envelope(out: &mut Vec<u8>, line: &str, remote_addr: &str) {
    out.reserve(line.len() + remote_addr.len() + 32);
    out.extend_from_slice(b"{\"content\":\"");
    escape_json_into(out, line);
    out.extend_from_slice(b"\",\"remote_addr\":\"");
    out.extend_from_slice(remote_addr.as_bytes());
    out.extend_from_slice(b"\"}\n");
}

/// A decoded envelope, for clients of the relay (the load generator, the tests).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Envelope {
    pub content: String,
    pub remote_addr: String,
}

/// Parses one envelope line (with or without its `\n`). `None` if it is not an envelope,
/// for example a notice.
pub fn decode_envelope(line: &[u8]) -> Option<Envelope> {
    serde_json::from_slice(line).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lines(framer: &mut Framer, input: &[u8]) -> (Vec<String>, Result<(), FrameError>) {
        let mut out = Vec::new();
        let r = framer.feed(input, |l| out.push(l.to_string()));
        (out, r)
    }

    fn envelope(line: &str) -> String {
        let mut out = Vec::new();
        encode_envelope(&mut out, line, "127.0.0.1:5000");
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn one_trailing_cr_is_stripped_and_inner_ones_kept() {
        let mut f = Framer::new(100);
        let (got, r) = lines(&mut f, b"a\r\nx\ry\r\r\n\n");
        assert_eq!(r, Ok(()));
        assert_eq!(got, vec!["a", "x\ry\r", ""]);
    }

    #[test]
    fn a_long_partial_line_holds_about_its_length_not_twice_it() {
        let mut f = Framer::new(1 << 20);
        for _ in 0..10 {
            assert_eq!(lines(&mut f, &[b'x'; 100_000]).1, Ok(()));
            assert!(f.held() >= f.partial_len() && f.held() < f.partial_len() + (64 << 10));
        }
        assert_eq!(lines(&mut f, b"\n").0.len(), 1);
        let mut small = Framer::new(1 << 20);
        assert_eq!(lines(&mut small, b"abc").1, Ok(()));
        assert!(small.held() <= 4, "{}", small.held());
    }

    #[test]
    fn lines_split_across_reads_are_joined() {
        let mut f = Framer::new(100);
        assert_eq!(lines(&mut f, b"hel").0, Vec::<String>::new());
        assert_eq!(f.partial_len(), 3);
        assert_eq!(lines(&mut f, b"lo\r").0, Vec::<String>::new());
        assert_eq!(lines(&mut f, b"\nwor").0, vec!["hello"]);
        let mut last = Vec::new();
        f.finish(|l| last.push(l.to_string())).unwrap();
        assert_eq!(last, vec!["wor"]);
    }

    #[test]
    fn partial_line_over_the_limit_is_refused_before_buffering_it() {
        let mut f = Framer::new(4);
        assert_eq!(lines(&mut f, b"abcd\r").1, Ok(()));
        assert_eq!(lines(&mut f, b"\n").0, vec!["abcd"]);
        assert_eq!(lines(&mut f, b"abcde").1, Ok(()));
        assert_eq!(lines(&mut f, b"f").1, Err(FrameError::LineTooLong));
        assert!(f.partial_len() <= 5);
    }

    #[test]
    fn complete_line_over_the_limit_is_refused() {
        let mut f = Framer::new(4);
        let (got, r) = lines(&mut f, b"ok\nabcde\nnext\n");
        assert_eq!(got, vec!["ok"]);
        assert_eq!(r, Err(FrameError::LineTooLong));
    }

    #[test]
    fn invalid_utf8_ends_framing_after_earlier_lines() {
        let mut f = Framer::new(100);
        let (got, r) = lines(&mut f, b"good\n\xff\xfe\nlater\n");
        assert_eq!(got, vec!["good"]);
        assert_eq!(r, Err(FrameError::InvalidUtf8));
    }

    #[test]
    fn utf8_split_across_reads_is_valid() {
        let mut f = Framer::new(100);
        let e = "é".as_bytes();
        assert_eq!(lines(&mut f, &e[..1]).1, Ok(()));
        let (got, r) = lines(&mut f, &[e[1], b'\n']);
        assert_eq!((got, r), (vec!["é".to_string()], Ok(())));
    }

    #[test]
    fn idle_framer_releases_its_buffer() {
        let mut f = Framer::new(1 << 20);
        assert_eq!(lines(&mut f, &[b'x'; 5000]).1, Ok(()));
        assert_eq!(lines(&mut f, b"\n").1, Ok(()));
        assert_eq!(f.partial.capacity(), 0);
    }

    #[test]
    fn envelope_is_byte_exact() {
        assert_eq!(
            envelope("hi"),
            "{\"content\":\"hi\",\"remote_addr\":\"127.0.0.1:5000\"}\n"
        );
        assert_eq!(envelope(""), "{\"content\":\"\",\"remote_addr\":\"127.0.0.1:5000\"}\n");
    }

    #[test]
    fn escaping_matches_the_spec_table() {
        let cases: &[(&str, &str)] = &[
            ("\"", "\\\""),
            ("\\", "\\\\"),
            ("\u{8}\u{c}\n\r\t", "\\b\\f\\n\\r\\t"),
            ("\u{0}\u{1b}\u{1f}", "\\u0000\\u001b\\u001f"),
            ("\u{7f}/<>&'", "\u{7f}/<>&'"),
            ("é😀\u{2028}", "é😀\u{2028}"),
            ("{\"a\":1}", "{\\\"a\\\":1}"),
        ];
        for (input, escaped) in cases {
            let mut out = Vec::new();
            escape_json_into(&mut out, input);
            assert_eq!(String::from_utf8(out).unwrap(), *escaped, "input {input:?}");
        }
    }

    #[test]
    fn escaping_agrees_with_serde_json_for_every_byte_below_0x80() {
        for b in 0u8..0x80 {
            let s = (b as char).to_string();
            let mut ours = b"\"".to_vec();
            escape_json_into(&mut ours, &s);
            ours.push(b'"');
            assert_eq!(ours, serde_json::to_vec(&s).unwrap(), "byte {b:#04x}");
        }
    }

    #[test]
    fn notices_keep_the_warning_prefix() {
        for n in [
            NOTICE_RATE_LIMITED,
            NOTICE_IDLE,
            NOTICE_SHUTDOWN,
            NOTICE_INVALID_UTF8,
            NOTICE_SERVER_FULL,
            NOTICE_HOST_FULL,
            &notice_line_too_long(10),
        ] {
            assert!(n.starts_with("Warning: ") && n.ends_with('\n'));
        }
        assert_eq!(
            notice_line_too_long(1048576),
            "Warning: Message too long (limit 1048576 bytes). Disconnecting.\n"
        );
    }

    /// The block-at-a-time scan (16 bytes with SSE2, else 8) must find a special byte at
    /// any offset, next to multi-byte characters and DEL (which is not escaped), and in the
    /// short tail.
    #[test]
    fn escaping_matches_serde_json_for_each_special_byte_at_each_offset() {
        let specials = (0u8..0x20).chain([b'"', b'\\']).map(char::from);
        for special in specials {
            for len in [7, 8, 9, 15, 16, 17, 23, 31, 32, 33, 40] {
                for at in 0..len {
                    let line: String = (0..len)
                        .map(|i| {
                            if i == at {
                                special
                            } else if i % 3 == 0 {
                                'é'
                            } else if i % 5 == 0 {
                                '\u{7f}'
                            } else {
                                'a'
                            }
                        })
                        .collect();
                    let mut out = Vec::new();
                    escape_json_into(&mut out, &line);
                    let reference = serde_json::to_string(&line).unwrap();
                    // Each scan stops at or before the special byte, within a block of it.
                    let first = line.bytes().position(|b| ESCAPE[b as usize] != 0).unwrap();
                    for (stop, block) in [
                        (skip_plain(line.as_bytes(), 0), 16),
                        (skip_plain_swar(line.as_bytes(), 0), 8),
                    ] {
                        assert!(stop <= first && first < stop + block, "{line:?}: {stop} for {first}");
                    }
                    assert_eq!(String::from_utf8(out).unwrap(), reference[1..reference.len() - 1]);
                }
            }
        }
    }

    proptest! {
        #[test]
        fn envelope_round_trips_through_json(line in any::<String>()) {
            let env = envelope(&line);
            let decoded = decode_envelope(env.as_bytes()).unwrap();
            prop_assert_eq!(decoded.content, line.clone());
            prop_assert_eq!(decoded.remote_addr, "127.0.0.1:5000");
            let well_formed = env.ends_with("\"}\n") && env.matches('\n').count() == 1;
            prop_assert!(well_formed, "envelope {:?}", env);
            // Byte-identical to serde_json's compact output.
            let reference = format!("{{\"content\":{},\"remote_addr\":\"127.0.0.1:5000\"}}\n",
                serde_json::to_string(&line).unwrap());
            prop_assert_eq!(env, reference);
        }

        #[test]
        fn framing_is_independent_of_read_boundaries(
            msgs in proptest::collection::vec("[^\n]{0,40}", 0..20),
            cuts in proptest::collection::vec(0usize..400, 0..10),
        ) {
            let mut stream = Vec::new();
            for m in &msgs { stream.extend_from_slice(m.as_bytes()); stream.push(b'\n'); }
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|&c| c <= stream.len()).collect();
            cuts.sort();
            let mut f = Framer::new(1 << 20);
            let mut got = Vec::new();
            let mut prev = 0;
            for c in cuts.into_iter().chain(std::iter::once(stream.len())) {
                f.feed(&stream[prev..c], |l| got.push(l.to_string())).unwrap();
                prev = c;
            }
            let want: Vec<String> = msgs.iter().map(|m| m.strip_suffix('\r').unwrap_or(m).to_string()).collect();
            prop_assert_eq!(got, want);
        }
    }
}
