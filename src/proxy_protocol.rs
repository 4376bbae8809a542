//! The PROXY protocol header (versions 1 and 2, as HAProxy's specification defines them),
//! decoded from bytes with no I/O (docs/protocol.md#proxy-protocol).
//!
//! A proxy in front of the relay opens each connection with one header naming the client
//! it stands for. [`parse`] looks at the bytes received so far and returns `Ok(Some(..))`
//! with the header and its length, `Ok(None)` when they are a correct beginning that needs
//! more bytes, or `Err` when they can never become a valid header. It never reads past the
//! header, so the caller consumes exactly [`Parsed::len`] bytes and the client's first line
//! stays in the socket. `listener/proxy_header.rs` feeds it from the socket under a
//! deadline.
//!
//! Invariants: a header is at most [`MAX_HEADER_BYTES`] long (longer is [`HeaderError::Oversize`]);
//! only TCP over IPv4/IPv6 yields a client address; LOCAL commands, v1 `UNKNOWN` and v2
//! headers with an unspecified or UNIX family yield [`Header::Local`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The twelve bytes every version 2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];
/// The longest version 1 line the specification allows, `\r\n` included.
pub const V1_MAX_BYTES: usize = 107;
/// The longest header accepted, either version: a v2 header with TLVs (TLS details, a
/// unique id) fits with room to spare; the specification allows up to 16 + 65535, which
/// would let every connection waiting for its header pin 64 KiB.
pub const MAX_HEADER_BYTES: usize = 4096;
/// Fixed part of a v2 header: signature, version and command, family, length.
const V2_FIXED: usize = 16;
const V1_PREFIX: &[u8] = b"PROXY ";

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A client connected to the proxy from `source`, to the proxy's `destination`.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// The proxy speaks for itself (a health check) or for a client with no IP address:
    /// v2 LOCAL, v1 `UNKNOWN`, v2 with an unspecified or UNIX address family.
    Local,
}

/// A complete header and how many bytes it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    pub header: Header,
    pub len: usize,
}

/// Why bytes can never become a valid header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// Not a header, or a header that breaks the specification; says what is wrong.
    Malformed(&'static str),
    /// Longer than [`V1_MAX_BYTES`] (v1) or [`MAX_HEADER_BYTES`] (v2).
    Oversize,
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::Malformed(why) => write!(f, "malformed PROXY header: {why}"),
            HeaderError::Oversize => write!(f, "PROXY header longer than {MAX_HEADER_BYTES} bytes"),
        }
    }
}

/// Decodes the header at the start of `buf` (see the module docs).
pub fn parse(buf: &[u8]) -> Result<Option<Parsed>, HeaderError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let v2_seen = buf.len().min(V2_SIGNATURE.len());
    if buf[..v2_seen] == V2_SIGNATURE[..v2_seen] {
        return if buf.len() < V2_FIXED { Ok(None) } else { parse_v2(buf) };
    }
    let v1_seen = buf.len().min(V1_PREFIX.len());
    if buf[..v1_seen] == V1_PREFIX[..v1_seen] {
        return if buf.len() < V1_PREFIX.len() {
            Ok(None)
        } else {
            parse_v1(buf)
        };
    }
    Err(HeaderError::Malformed("no PROXY signature"))
}

fn parse_v1(buf: &[u8]) -> Result<Option<Parsed>, HeaderError> {
    let window = &buf[..buf.len().min(V1_MAX_BYTES)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        return if buf.len() >= V1_MAX_BYTES {
            Err(HeaderError::Oversize)
        } else if window.contains(&b'\n') {
            Err(HeaderError::Malformed("v1 line ends without \\r"))
        } else {
            Ok(None)
        };
    };
    match window.get(cr + 1) {
        None if cr + 1 >= V1_MAX_BYTES => return Err(HeaderError::Oversize),
        None => return Ok(None),
        Some(b'\n') => {}
        Some(_) => return Err(HeaderError::Malformed("v1 \\r not followed by \\n")),
    }
    let len = cr + 2;
    let line =
        std::str::from_utf8(&buf[V1_PREFIX.len()..cr]).map_err(|_| HeaderError::Malformed("v1 line is not ASCII"))?;
    let mut fields = line.split(' ');
    let protocol = fields.next().unwrap_or("");
    if protocol == "UNKNOWN" {
        // The specification lets the rest of an UNKNOWN line be anything; it is ignored.
        return Ok(Some(Parsed {
            header: Header::Local,
            len,
        }));
    }
    let v6 = match protocol {
        "TCP4" => false,
        "TCP6" => true,
        _ => return Err(HeaderError::Malformed("v1 protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(HeaderError::Malformed("v1 line does not have four address fields"));
    };
    let ip = |text: &str| -> Result<IpAddr, HeaderError> {
        let parsed = if v6 {
            text.parse::<Ipv6Addr>().map(IpAddr::V6)
        } else {
            text.parse::<Ipv4Addr>().map(IpAddr::V4)
        };
        parsed.map_err(|_| HeaderError::Malformed("v1 address does not match its protocol"))
    };
    let source = SocketAddr::new(ip(src)?, v1_port(sport)?);
    let destination = SocketAddr::new(ip(dst)?, v1_port(dport)?);
    Ok(Some(Parsed {
        header: Header::Proxied { source, destination },
        len,
    }))
}

/// A v1 port: decimal digits only, no leading zero, at most 65535.
fn v1_port(text: &str) -> Result<u16, HeaderError> {
    let digits_only = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    if !digits_only || (text.len() > 1 && text.starts_with('0')) {
        return Err(HeaderError::Malformed("v1 port is not a decimal number"));
    }
    text.parse()
        .map_err(|_| HeaderError::Malformed("v1 port is over 65535"))
}

fn parse_v2(buf: &[u8]) -> Result<Option<Parsed>, HeaderError> {
    let version_command = buf[12];
    if version_command >> 4 != 2 {
        return Err(HeaderError::Malformed("v2 version is not 2"));
    }
    let local = match version_command & 0x0F {
        0 => true,
        1 => false,
        _ => return Err(HeaderError::Malformed("v2 command is neither LOCAL nor PROXY")),
    };
    let family = buf[13] >> 4;
    let transport = buf[13] & 0x0F;
    let body = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let len = V2_FIXED + body;
    if len > MAX_HEADER_BYTES {
        return Err(HeaderError::Oversize);
    }
    // Checked before the whole header is there, so a bad header is refused at once.
    let address_bytes = match family {
        0 => 0,
        1 => 12,
        2 => 36,
        3 => 216,
        _ => return Err(HeaderError::Malformed("v2 address family is unknown")),
    };
    if !local && family != 0 && transport != 1 {
        return Err(HeaderError::Malformed("v2 transport is not STREAM"));
    }
    if transport > 2 {
        return Err(HeaderError::Malformed("v2 transport is unknown"));
    }
    if body < address_bytes {
        return Err(HeaderError::Malformed("v2 length is shorter than its addresses"));
    }
    if buf.len() < len {
        return Ok(None);
    }
    if local {
        // LOCAL: the addresses, if any, are to be ignored.
        return Ok(Some(Parsed {
            header: Header::Local,
            len,
        }));
    }
    let a = &buf[V2_FIXED..];
    let port = |at: usize| u16::from_be_bytes([a[at], a[at + 1]]);
    let header = match family {
        1 => {
            let ip = |at: usize| IpAddr::V4(Ipv4Addr::new(a[at], a[at + 1], a[at + 2], a[at + 3]));
            Header::Proxied {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            }
        }
        2 => {
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&a[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            Header::Proxied {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            }
        }
        // UNSPEC or UNIX: no IP address to stand for.
        _ => Header::Local,
    };
    Ok(Some(Parsed { header, len }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_v1_tcp4_header_gives_the_client_and_stops_at_its_crlf() {
        let bytes = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 8888\r\nhello\n";
        let parsed = parse(bytes).unwrap().unwrap();
        assert_eq!(parsed.len, bytes.len() - "hello\n".len());
        assert_eq!(
            parsed.header,
            Header::Proxied {
                source: addr("192.0.2.7:56324"),
                destination: addr("198.51.100.1:8888")
            }
        );
    }

    #[test]
    fn a_v1_tcp6_header_and_unknown_parse() {
        let bytes = b"PROXY TCP6 2001:db8::1 ::1 65535 1\r\n";
        let parsed = parse(bytes).unwrap().unwrap();
        assert_eq!(
            parsed.header,
            Header::Proxied {
                source: addr("[2001:db8::1]:65535"),
                destination: addr("[::1]:1")
            }
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap().unwrap().header, Header::Local);
        assert_eq!(
            parse(b"PROXY UNKNOWN ffff::1 ::1 1 2\r\nx").unwrap().unwrap(),
            Parsed {
                header: Header::Local,
                len: 31
            }
        );
    }

    #[test]
    fn every_prefix_of_a_valid_header_needs_more_bytes() {
        let v1 = b"PROXY TCP4 10.0.0.1 10.0.0.2 1000 2000\r\n".to_vec();
        let mut body = vec![10, 0, 0, 1, 10, 0, 0, 2];
        body.extend_from_slice(&1000u16.to_be_bytes());
        body.extend_from_slice(&2000u16.to_be_bytes());
        let v2 = v2(1, 0x11, &body);
        for whole in [v1, v2] {
            for cut in 0..whole.len() {
                assert_eq!(parse(&whole[..cut]), Ok(None), "cut at {cut} of {whole:?}");
            }
            assert_eq!(
                parse(&whole).unwrap().unwrap().header,
                Header::Proxied {
                    source: addr("10.0.0.1:1000"),
                    destination: addr("10.0.0.2:2000")
                }
            );
        }
    }

    #[test]
    fn v2_ipv6_local_unspec_and_tlvs() {
        let mut body = Vec::new();
        body.extend_from_slice(&"2001:db8::5".parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        body.extend_from_slice(&[0x12, 0x34, 0x22, 0xb8]);
        body.extend_from_slice(&[0x04, 0x00, 0x02, b'i', b'd']); // a TLV, skipped
        let header = v2(1, 0x21, &body);
        let parsed = parse(&header).unwrap().unwrap();
        assert_eq!(parsed.len, header.len());
        assert_eq!(
            parsed.header,
            Header::Proxied {
                source: addr("[2001:db8::5]:4660"),
                destination: addr("[::1]:8888")
            }
        );
        assert_eq!(parse(&v2(0, 0x00, &[])).unwrap().unwrap().header, Header::Local);
        // LOCAL with addresses: they are ignored.
        assert_eq!(parse(&v2(0, 0x11, &[0; 12])).unwrap().unwrap().header, Header::Local);
        assert_eq!(parse(&v2(1, 0x00, &[])).unwrap().unwrap().header, Header::Local);
        assert_eq!(parse(&v2(1, 0x31, &[0; 216])).unwrap().unwrap().header, Header::Local);
    }

    #[test]
    fn malformed_headers_are_refused_as_soon_as_they_show() {
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXX",
            b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\rx",
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 1.2.3.4 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(HeaderError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut wrong_version = v2(1, 0x11, &[0; 12]);
        wrong_version[12] = 0x11;
        let mut wrong_command = v2(1, 0x11, &[0; 12]);
        wrong_command[12] = 0x22;
        for bad in [
            wrong_version,
            wrong_command,
            v2(1, 0x41, &[0; 12]),
            v2(1, 0x12, &[0; 12]),
            v2(1, 0x11, &[0; 8]),
            v2(1, 0x21, &[0; 12]),
        ] {
            assert!(matches!(parse(&bad[..16]), Err(HeaderError::Malformed(_))), "{bad:?}");
        }
    }

    #[test]
    fn oversize_headers_are_refused() {
        let long = format!("PROXY TCP4 {}", "1".repeat(200));
        assert_eq!(parse(long.as_bytes()), Err(HeaderError::Oversize));
        let mut exactly = b"PROXY UNKNOWN ".to_vec();
        exactly.resize(V1_MAX_BYTES - 2, b'x');
        exactly.extend_from_slice(b"\r\n");
        assert_eq!(parse(&exactly).unwrap().unwrap().len, V1_MAX_BYTES);
        exactly.insert(20, b'x');
        assert_eq!(parse(&exactly), Err(HeaderError::Oversize));
        let too_long = v2(1, 0x11, &vec![0; MAX_HEADER_BYTES - 16 + 1]);
        assert_eq!(parse(&too_long[..16]), Err(HeaderError::Oversize));
        let longest = v2(1, 0x11, &vec![0; MAX_HEADER_BYTES - 16]);
        assert_eq!(parse(&longest).unwrap().unwrap().len, MAX_HEADER_BYTES);
    }
}
