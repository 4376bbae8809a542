//! The outputs of a run against a scripted broadcasting server (no relay): the HTML report
//! parses as XML and has one chart per promised view, each with its series and labelled
//! axes; the `.hgrm` distribution and the CSV files parse and agree with the JSON; the
//! metadata is there. The server runs as threads of this process, so `--server-pid` is
//! this process and the server CPU chart has data.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

const SVG: &str = "http://www.w3.org/2000/svg";

/// Accepts `clients` connections and sends every line one of them writes to all the
/// others, wrapped in the Summoner envelope, until they close.
fn broadcast_server(clients: usize) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let conns: Vec<TcpStream> = (0..clients).map(|_| listener.accept().unwrap().0).collect();
        let writers: Vec<Arc<Mutex<TcpStream>>> = conns
            .iter()
            .map(|c| Arc::new(Mutex::new(c.try_clone().unwrap())))
            .collect();
        for (i, conn) in conns.into_iter().enumerate() {
            let writers = writers.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(conn).split(b'\n') {
                    let Ok(line) = line else { break };
                    let envelope = format!(
                        "{{\"content\":\"{}\",\"remote_addr\":\"127.0.0.1:1\"}}\n",
                        String::from_utf8_lossy(&line)
                    );
                    for (j, w) in writers.iter().enumerate() {
                        if j != i {
                            let _ = w.lock().unwrap().write_all(envelope.as_bytes());
                        }
                    }
                }
            });
        }
    });
    port
}

/// The text of every `<text>` in `svg`, trimmed.
fn texts(svg: roxmltree::Node) -> Vec<String> {
    svg.descendants()
        .filter(|n| n.has_tag_name((SVG, "text")))
        .map(|n| n.text().unwrap_or("").trim().to_string())
        .collect()
}

/// Series drawn as lines: plotters draws each series and its legend mark as a polyline
/// 2 px wide in the series' colour (axes and grid are 1 px); one colour per series.
fn line_series(svg: roxmltree::Node) -> usize {
    let marks: Vec<_> = svg
        .descendants()
        .filter(|n| n.has_tag_name((SVG, "polyline")) && n.attribute("stroke-width") == Some("2"))
        .collect();
    let colours: BTreeSet<&str> = marks.iter().filter_map(|n| n.attribute("stroke")).collect();
    assert_eq!(marks.len(), 2 * colours.len(), "a line and a legend mark per series");
    colours.len()
}

/// One parsed `.hgrm` file: rows (value ms, percentile fraction, total count) and the
/// footer's total count and max.
struct Hgrm {
    rows: Vec<(f64, f64, u64)>,
    total: u64,
    max_ms: f64,
}

fn parse_hgrm(text: &str) -> Hgrm {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]);
    let (mut rows, mut total, mut max_ms) = (Vec::new(), None, None);
    for line in lines.filter(|l| !l.trim().is_empty()) {
        if let Some(footer) = line.strip_prefix("#[") {
            let fields: Vec<(&str, &str)> = footer
                .trim_end_matches(']')
                .split(',')
                .map(|kv| kv.split_once('=').map(|(k, v)| (k.trim(), v.trim())).unwrap())
                .collect();
            for (k, v) in fields {
                match k {
                    "Total count" => total = Some(v.parse().unwrap()),
                    "Max" => max_ms = Some(v.parse().unwrap()),
                    _ => {}
                }
            }
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(f.len() == 4 || f.len() == 3, "bad row {line:?}");
        let (v, p, n): (f64, f64, u64) = (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap());
        if f.len() == 4 {
            let inv: f64 = f[3].parse().unwrap();
            assert!((inv - 1.0 / (1.0 - p)).abs() <= 0.01 * inv, "{line:?}");
        }
        rows.push((v, p, n));
    }
    Hgrm {
        rows,
        total: total.expect("a total count"),
        max_ms: max_ms.expect("a max"),
    }
}

/// A CSV file as a header and rows of fields (no quoted fields expected here).
fn parse_csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
    let split = |l: &str| l.split(',').map(String::from).collect::<Vec<_>>();
    let header = split(lines.next().unwrap());
    let rows: Vec<Vec<String>> = lines.map(split).collect();
    assert!(rows.iter().all(|r| r.len() == header.len()));
    (header, rows)
}

fn field<'a>(header: &[String], row: &'a [String], name: &str) -> &'a str {
    let i = header
        .iter()
        .position(|h| h == name)
        .unwrap_or_else(|| panic!("no column {name}"));
    &row[i]
}

#[test]
fn a_run_writes_an_xhtml_report_with_labelled_charts_and_hgrm_and_csv_that_agree_with_the_json() {
    let clients = 3;
    let port = broadcast_server(clients);
    let dir = std::env::temp_dir().join(format!("corecast-loadgen-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prefix = dir.join("run");
    let json_path = dir.join("run.json");
    let report_path = dir.join("run.html");
    let out = Command::new(env!("CARGO_BIN_EXE_corecast-loadgen"))
        .args(["--target", &format!("127.0.0.1:{port}"), "--no-progress"])
        .args(["--clients", "3", "--publishers", "3", "--rate", "200"])
        .args(["--duration", "2", "--warmup", "0.5", "--drain", "3"])
        .args(["--server-pid", &std::process::id().to_string()])
        .args(["--percentiles", "50,99,99.9"])
        .arg("--json")
        .arg(&json_path)
        .arg("--report")
        .arg(&report_path)
        .arg("--hgrm")
        .arg(&prefix)
        .arg("--csv")
        .arg(&prefix)
        .arg("--charts")
        .arg(dir.join("charts"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "loadgen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    assert!(json["delivered"].as_u64().unwrap() > 0, "{json}");
    assert_eq!(json["lost"], 0, "{json}");

    // The report: XHTML, no external assets, one figure per view.
    let html = std::fs::read_to_string(&report_path).unwrap();
    // `<!DOCTYPE html>` is a DTD to an XML parser: allowed, it declares nothing.
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(&html, options).expect("the report parses as XML");
    for n in doc.descendants() {
        for a in ["src", "href"] {
            assert!(n.attribute(a).is_none(), "external asset in <{}>", n.tag_name().name());
        }
    }
    let figures: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("figure") && n.attribute("class") == Some("chart"))
        .collect();
    let ids: Vec<&str> = figures.iter().map(|f| f.attribute("id").unwrap()).collect();
    assert_eq!(ids, ["latency-spectrum", "rate", "p99", "server-cpu"]);
    let expected_axes = [
        (
            "percentile (log scale of 1/(1-p))",
            "latency (ms, log scale)",
            "healthy",
        ),
        (
            "time since the start of the warm-up (s)",
            "deliveries per second (msgs/s)",
            "delivered",
        ),
        ("time since the start of the warm-up (s)", "p99 latency (ms)", "p99"),
        (
            "time since the start of the warm-up (s)",
            "server CPU per delivery (ns)",
            "server CPU / delivery",
        ),
    ];
    for (figure, (x, y, series)) in figures.iter().zip(expected_axes) {
        let svgs: Vec<_> = figure.children().filter(|n| n.has_tag_name((SVG, "svg"))).collect();
        assert_eq!(svgs.len(), 1, "one inline SVG per figure");
        let t = texts(svgs[0]);
        for want in [x, y, series] {
            assert!(
                t.iter().any(|s| s == want),
                "{want:?} missing from {:?}",
                figure.attribute("id")
            );
        }
        assert_eq!(line_series(svgs[0]), 1, "{:?}", figure.attribute("id"));
        // The same chart as a file of its own.
        let file = dir
            .join("charts")
            .join(format!("{}.svg", figure.attribute("id").unwrap()));
        let svg = std::fs::read_to_string(file).unwrap();
        let svg_doc = roxmltree::Document::parse(&svg).unwrap();
        assert_eq!(line_series(svg_doc.root_element()), 1);
    }

    // Metadata in the JSON and the report.
    let meta = &json["meta"];
    for key in ["loadgen_version", "kernel", "cpu_model", "date"] {
        assert!(meta[key].as_str().is_some_and(|s| !s.is_empty()), "meta.{key}: {meta}");
    }
    assert!(meta["cpus"].as_u64().unwrap() >= 1);
    assert!(meta["date"].as_str().unwrap().ends_with('Z'));
    let command: Vec<&str> = meta["command_line"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        command.contains(&"--report") && command.contains(&"50,99,99.9"),
        "{command:?}"
    );
    assert_eq!(meta["servers"][0]["name"], "corecast");
    assert!(meta["servers"][0]["program"].as_str().is_some());
    let meta_rows: Vec<String> = doc
        .descendants()
        .filter(|n| n.has_tag_name("table") && n.attribute("id") == Some("meta"))
        .flat_map(|t| t.descendants().filter(|n| n.has_tag_name("th")))
        .map(|th| th.text().unwrap_or("").to_string())
        .collect();
    for row in [
        "date (UTC)",
        "generator version",
        "source commit",
        "kernel",
        "CPU model",
        "CPUs",
        "command line",
        "corecast version",
        "corecast settings",
    ] {
        assert!(meta_rows.iter().any(|r| r == row), "{row:?} missing from {meta_rows:?}");
    }

    // The chosen percentiles, in the JSON, the CSV summary and the .hgrm distribution.
    let percentiles: Vec<(f64, u64)> = json["percentiles_us"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["percentile"].as_f64().unwrap(), p["us"].as_u64().unwrap()))
        .collect();
    assert_eq!(percentiles.iter().map(|p| p.0).collect::<Vec<_>>(), [50.0, 99.0, 99.9]);
    assert_eq!(percentiles[1].1, json["latency_us"]["p99"].as_u64().unwrap());

    let hgrm = parse_hgrm(&std::fs::read_to_string(dir.join("run-healthy.hgrm")).unwrap());
    let in_window = (json["msgs_per_sec"].as_f64().unwrap() * json["duration_s"].as_f64().unwrap()).round() as u64;
    assert_eq!(hgrm.total, in_window);
    assert_eq!(hgrm.rows.last().unwrap().2, in_window);
    let max_us = json["latency_us"]["max"].as_u64().unwrap();
    assert_eq!((hgrm.max_ms * 1000.0).round() as u64, max_us);
    assert_eq!((hgrm.rows.last().unwrap().0 * 1000.0).round() as u64, max_us);
    for &(p, us) in &percentiles {
        // The percentile lies between the distribution's rows around it.
        let q = p / 100.0;
        let below = hgrm.rows.iter().rev().find(|r| r.1 < q - 1e-9).map_or(0.0, |r| r.0);
        let above = hgrm.rows.iter().find(|r| r.1 >= q - 1e-9).unwrap().0;
        let ms = us as f64 / 1000.0;
        assert!(
            below - 0.0005 <= ms && ms <= above + 0.0005,
            "p{p}: {ms} ms not in [{below}, {above}]"
        );
    }

    let (header, rows) = parse_csv(&dir.join("run-summary.csv"));
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    for key in ["delivered", "lost", "expected", "sent", "reordered"] {
        assert_eq!(field(&header, row, key), json[key].to_string(), "{key}");
    }
    for (name, (_, us)) in ["p50_us", "p99_us", "p99.9_us"].iter().zip(&percentiles) {
        assert_eq!(field(&header, row, name), us.to_string());
    }
    assert_eq!(field(&header, row, "max_us"), max_us.to_string());

    let (header, rows) = parse_csv(&dir.join("run-timeline.csv"));
    let timeline = json["timeline"].as_array().unwrap();
    assert_eq!(rows.len(), timeline.len());
    for (row, tick) in rows.iter().zip(timeline) {
        assert_eq!(field(&header, row, "second"), tick["t"].to_string());
        assert_eq!(field(&header, row, "delivered"), tick["delivered"].to_string());
        assert_eq!(field(&header, row, "p99_us"), tick["p99_us"].to_string());
    }
    let sum: u64 = timeline.iter().map(|t| t["delivered"].as_u64().unwrap()).sum();
    assert_eq!(sum, in_window);
    assert!(timeline.iter().any(|t| t["server_cpu_ms"].is_number()), "{timeline:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_percentiles_are_refused_with_the_limit() {
    let out = Command::new(env!("CARGO_BIN_EXE_corecast-loadgen"))
        .args(["--target", "127.0.0.1:9", "--percentiles", "50,100.5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--percentiles: 100.5 is not in (0, 100]"), "{stderr}");
}
