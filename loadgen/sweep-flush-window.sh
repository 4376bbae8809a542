#!/usr/bin/env bash
# Measures corecast at several flush windows: one shard pinned to CPU 0, the generator
# pinned to CPU 1, one workload per line of output. Socket writes per delivered envelope
# come from the relay's own counters (its final stats line at SIGTERM).
#
#   cargo build --release --workspace
#   loadgen/sweep-flush-window.sh "0 1000 2000" "100x30 10x30000"
set -euo pipefail
cd "$(dirname "$0")/.."
windows=${1:-"0 500 1000 2000"}
workloads=${2:-"100x30 10x30000 100x100"}
duration=${DURATION:-5}
bin=target/release
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

for w in $windows; do
    for wl in $workloads; do
        clients=${wl%x*}
        rate=${wl#*x}
        printf '{"logger":{"log_level":"WARNING"},"hyper_parameters":{"rate_limit_msgs_per_minute":null,"flush_window_us":%s}}\n' "$w" >"$scratch/config.json"
        taskset -c 0 "$bin/corecast" --port 0 --shards 1 --config "$scratch/config.json" --log-level info 2>"$scratch/relay.log" &
        pid=$!
        for _ in $(seq 100); do grep -q "listening on" "$scratch/relay.log" && break; sleep 0.1; done
        port=$(grep -o 'listening on [0-9.:]*' "$scratch/relay.log" | sed 's/.*://')
        "$bin/corecast-loadgen" --target "127.0.0.1:$port" --clients "$clients" --publishers "$clients" \
            --rate "$rate" --duration "$duration" --warmup 1 --server-pid "$pid" --cpus 1 --no-progress \
            >"$scratch/run.txt"
        kill -TERM "$pid"
        wait "$pid" || true
        stats=$(grep 'stopped: accepted' "$scratch/relay.log" | tail -1)
        writes=$(sed -n 's/.* socket_writes=\([0-9]*\).*/\1/p' <<<"$stats")
        envelopes=$(sed -n 's/.* envelopes_out=\([0-9]*\).*/\1/p' <<<"$stats")
        delivered=$(sed -n 's/.*delivered *\([0-9.]*\) msgs\/s.*/\1/p' "$scratch/run.txt")
        p99=$(sed -n 's/.* p99 \([0-9]*\) .*/\1/p' "$scratch/run.txt")
        ns=$(sed -n 's/.*= \([0-9]*\) ns per delivery.*/\1/p' "$scratch/run.txt")
        lost=$(sed -n 's/.*lost \([0-9]*\),.*/\1/p' "$scratch/run.txt")
        awk -v w="$w" -v wl="T$wl" -v d="$delivered" -v p="$p99" -v n="$ns" -v wr="$writes" -v e="$envelopes" -v l="$lost" \
            'BEGIN { printf "flush_window_us=%-6s %-10s %10s msgs/s  p99 %6s us  %6s ns/delivery  writes/envelope %.4f  lost %s\n", w, wl, d, p, n, wr / e, l }'
    done
done
