//! docs/protocol.md#wire-protocol: framing and the byte-exact envelope, over real sockets.

use crate::util::{envelope, Relay};

#[test]
fn envelopes_are_byte_exact_for_awkward_content() {
    let relay = Relay::start(&["--shards", "2"]);
    let mut sender = relay.connect();
    let mut receiver = relay.connect();

    let mut every_control: String = (0u8..0x20).filter(|b| *b != b'\n').map(char::from).collect();
    every_control.push('\u{7f}');
    let cases: Vec<(Vec<u8>, String)> = vec![
        (b"say \"hi\"".to_vec(), r#"say \"hi\""#.into()),
        (b"back\\slash \\n".to_vec(), r#"back\\slash \\n"#.into()),
        (b"tab\there\x08\x0c".to_vec(), r#"tab\there\b\f"#.into()),
        (b"nul\x00esc\x1bus\x1f".to_vec(), r#"nul\u0000esc\u001bus\u001f"#.into()),
        (b"del\x7f / < > & '".to_vec(), "del\u{7f} / < > & '".into()),
        ("é 😀 \u{2028} 中文".as_bytes().to_vec(), "é 😀 \u{2028} 中文".into()),
        (
            br#"{"content":"x","remote_addr":"1.2.3.4:5"}"#.to_vec(),
            r#"{\"content\":\"x\",\"remote_addr\":\"1.2.3.4:5\"}"#.into(),
        ),
        (b"inner\rcr".to_vec(), r#"inner\rcr"#.into()),
        (
            every_control.clone().into_bytes(),
            serde_json::to_string(&every_control).unwrap().trim_matches('"').into(),
        ),
    ];
    for (raw, escaped) in &cases {
        let mut line = raw.clone();
        line.push(b'\n');
        sender.send(&line);
        let got = receiver.line_str();
        let want = format!(
            "{{\"content\":\"{escaped}\",\"remote_addr\":\"{}\"}}\n",
            sender.local_addr
        );
        assert_eq!(got, want, "raw line {raw:?}");
        // Independently: the same bytes serde_json would produce for the decoded line.
        assert_eq!(got, envelope(std::str::from_utf8(raw).unwrap(), sender.local_addr));
    }
}

#[test]
fn crlf_is_stripped_once_and_empty_lines_are_relayed() {
    let relay = Relay::start(&[]);
    let mut sender = relay.connect();
    let mut receiver = relay.connect();
    sender.send(b"a\r\n\nx\ry\r\r\n\r\n");
    assert_eq!(receiver.line_str(), sender.envelope("a"));
    assert_eq!(receiver.line_str(), sender.envelope(""));
    assert_eq!(receiver.line_str(), sender.envelope("x\ry\r"));
    assert_eq!(receiver.line_str(), sender.envelope(""));
}

#[test]
fn a_line_split_across_many_writes_arrives_whole() {
    let relay = Relay::start(&[]);
    let mut sender = relay.connect();
    let mut receiver = relay.connect();
    let text = "split across writes é";
    sender.stream.set_nodelay(true).unwrap();
    for chunk in text.as_bytes().chunks(3) {
        sender.send(chunk);
        // Separate segments, so the relay sees the line in pieces (and é split in two).
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    sender.send(b"\n");
    assert_eq!(receiver.line_str(), sender.envelope(text));
}

#[test]
fn the_sender_never_gets_its_own_lines_back() {
    let relay = Relay::start(&["--shards", "2"]);
    let mut a = relay.connect();
    let mut b = relay.connect();
    a.send(b"from a\n");
    assert_eq!(b.line_str(), a.envelope("from a"));
    b.send(b"from b\n");
    // Had "from a" been echoed, it would have been queued for `a` before "from b" existed.
    assert_eq!(a.line_str(), b.envelope("from b"));
}

#[test]
fn a_partial_line_at_eof_is_relayed_then_the_connection_closes() {
    let relay = Relay::start(&[]);
    let mut sender = relay.connect();
    let mut receiver = relay.connect();
    sender.send(b"complete\nno newline at the end");
    sender.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(receiver.line_str(), sender.envelope("complete"));
    assert_eq!(receiver.line_str(), sender.envelope("no newline at the end"));
    assert_eq!(sender.read_to_eof(), b"");
    relay
        .log
        .wait_for(&format!("client disconnected: {} (peer_closed)", sender.local_addr));
}
