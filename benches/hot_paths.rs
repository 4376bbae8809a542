//! Criterion benches of the relay's pure hot paths: envelope encoding, line framing and
//! batch building. `cargo bench` runs them; throughput is reported per byte or element.

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use corecast::fanout::BatchBuilder;
use corecast::protocol::{encode_envelope, Framer};

const ADDR: &str = "127.0.0.1:54321";

fn envelope_encoding(c: &mut Criterion) {
    let long = "x".repeat(4096);
    let escapes = "\"quoted\" \\ \t\u{1b}[0m\n".repeat(64);
    let non_ascii = "é😀中文ü".repeat(100);
    let cases = [
        ("short", "hello from agent 7"),
        ("long_4k", long.as_str()),
        ("escape_heavy", escapes.as_str()),
        ("non_ascii", non_ascii.as_str()),
    ];
    let mut group = c.benchmark_group("envelope_encoding");
    for (name, line) in cases {
        group.throughput(Throughput::Bytes(line.len() as u64));
        let mut out = Vec::with_capacity(64 << 10);
        group.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                encode_envelope(&mut out, black_box(line), ADDR);
                black_box(out.len())
            })
        });
    }
    group.finish();
}

fn line_framing(c: &mut Criterion) {
    let mut stream = Vec::new();
    for i in 0..1000 {
        stream.extend_from_slice(format!("{{\"seq\":{i},\"payload\":\"{}\"}}\r\n", "p".repeat(80)).as_bytes());
    }
    let mut group = c.benchmark_group("line_framing");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    for read_size in [64usize, 1500, 65536] {
        group.bench_function(format!("reads_of_{read_size}"), |b| {
            b.iter_batched(
                || Framer::new(1 << 20),
                |mut framer| {
                    let mut lines = 0usize;
                    for chunk in stream.chunks(read_size) {
                        framer.feed(chunk, |l| lines += l.len()).unwrap();
                    }
                    black_box(lines)
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn batch_building(c: &mut Criterion) {
    let line = "x".repeat(100);
    let mut group = c.benchmark_group("batch_building");
    group.throughput(Throughput::Elements(64));
    group.bench_function("64_lines_of_100_bytes", |b| {
        let mut builder = BatchBuilder::default();
        b.iter(|| {
            for origin in 0..64u64 {
                builder.push(origin / 8, black_box(&line), ADDR);
            }
            black_box(builder.take().data.len())
        })
    });
    group.finish();
}

criterion_group!(benches, envelope_encoding, line_framing, batch_building);
criterion_main!(benches);
