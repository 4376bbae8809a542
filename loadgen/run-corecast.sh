#!/usr/bin/env bash
# Shared by the measurement scripts: one run of corecast (one shard pinned to CPU 0) under
# the generator (pinned to CPU 1). Socket writes per delivered envelope come from the
# relay's own counters (its final stats line at SIGTERM).
#
#   run_corecast LABEL CONFIG_JSON CLIENTS RATE   → one line of results on stdout
# Needs $bin (the release directory), $scratch (a temporary directory), $duration (seconds).
run_corecast() {
    local label=$1 config=$2 clients=$3 rate=$4
    printf '%s\n' "$config" >"$scratch/config.json"
    taskset -c 0 "$bin/corecast" --port 0 --shards 1 --config "$scratch/config.json" --log-level info 2>"$scratch/relay.log" &
    local pid=$!
    for _ in $(seq 100); do grep -q "listening on" "$scratch/relay.log" && break; sleep 0.1; done
    local port
    port=$(grep -o 'listening on [0-9.:]*' "$scratch/relay.log" | sed 's/.*://')
    "$bin/corecast-loadgen" --target "127.0.0.1:$port" --clients "$clients" --publishers "$clients" \
        --rate "$rate" --duration "$duration" --warmup 1 --server-pid "$pid" --cpus 1 --no-progress \
        >"$scratch/run.txt"
    kill -TERM "$pid"
    wait "$pid" || true
    local stats writes envelopes delivered p99 ns lost
    stats=$(grep 'stopped: accepted' "$scratch/relay.log" | tail -1)
    writes=$(sed -n 's/.* socket_writes=\([0-9]*\).*/\1/p' <<<"$stats")
    envelopes=$(sed -n 's/.* envelopes_out=\([0-9]*\).*/\1/p' <<<"$stats")
    delivered=$(sed -n 's/.*delivered *\([0-9.]*\) msgs\/s.*/\1/p' "$scratch/run.txt")
    p99=$(sed -n 's/.* p99 \([0-9]*\) .*/\1/p' "$scratch/run.txt")
    ns=$(sed -n 's/.*= \([0-9]*\) ns per delivery.*/\1/p' "$scratch/run.txt")
    lost=$(sed -n 's/.*lost \([0-9]*\),.*/\1/p' "$scratch/run.txt")
    awk -v label="$label" -v wl="T${clients}x${rate}" -v d="$delivered" -v p="$p99" -v n="$ns" -v wr="$writes" -v e="$envelopes" -v l="$lost" \
        'BEGIN { printf "%-22s %-10s %10s msgs/s  p99 %6s us  %6s ns/delivery  writes/envelope %.4f  lost %s\n", label, wl, d, p, n, wr / e, l }'
}
