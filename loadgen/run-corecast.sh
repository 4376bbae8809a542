#!/usr/bin/env bash
# Shared by the measurement scripts (sourced). corecast runs with one shard pinned to
# CPU 0 and the generator pinned to CPU 1 (override with RELAY_CPUS, SHARDS and
# LOADGEN_CPUS; an empty LOADGEN_CPUS leaves the generator unpinned). Socket writes per delivered envelope come from
# the relay's own counters (its final stats line at SIGTERM).
# Needs $bin (the release directory), $scratch (a temporary directory), $duration (seconds).

# start_relay CONFIG_JSON [corecast flags...]: sets relay_pid and relay_port.
start_relay() {
    printf '%s\n' "$1" >"$scratch/config.json"
    shift
    taskset -c "${RELAY_CPUS:-0}" "$bin/corecast" --port 0 --shards "${SHARDS:-1}" --config "$scratch/config.json" --log-level info "$@" \
        2>"$scratch/relay.log" &
    relay_pid=$!
    for _ in $(seq 100); do grep -q "listening on" "$scratch/relay.log" && break; sleep 0.1; done
    relay_port=$(grep -o 'listening on [0-9.:]*' "$scratch/relay.log" | sed 's/.*://')
}

# stop_relay: SIGTERM, wait, and keep each shard's final stats line in relay_stats.
stop_relay() {
    kill -TERM "$relay_pid"
    wait "$relay_pid" || true
    relay_stats=$(grep 'stopped: accepted' "$scratch/relay.log")
}

# relay_counter KEY: a counter from the final stats lines, summed over shards.
relay_counter() {
    sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$relay_stats" | awk '{ s += $1 } END { print s + 0 }'
}

# loadgen [flags...]: the generator against the running relay, pinned to CPU 1.
loadgen() {
    local cpus=${LOADGEN_CPUS-1}
    "$bin/corecast-loadgen" --target "127.0.0.1:$relay_port" --server-pid "$relay_pid" ${cpus:+--cpus "$cpus"} \
        --no-progress "$@"
}

# run_corecast LABEL CONFIG_JSON CLIENTS RATE[bBURST_US]: one fan-out run, one line of
# results. A rate such as `30000b0` also sets --burst-us (`b0`: one write per line), so a
# workload `10x30000b0` runs per-line writers.
run_corecast() {
    local label=$1 config=$2 clients=$3 rate=${4%b*} burst=()
    [[ $4 == *b* ]] && burst=(--burst-us "${4#*b}")
    start_relay "$config"
    loadgen --clients "$clients" --publishers "$clients" --rate "$rate" "${burst[@]}" --duration "$duration" --warmup 1 \
        >"$scratch/run.txt"
    stop_relay
    local delivered p99 ns lost gen closed
    delivered=$(sed -n 's/.*delivered *\([0-9.]*\) msgs\/s.*/\1/p' "$scratch/run.txt")
    p99=$(sed -n 's/.* p99 \([0-9]*\) .*/\1/p' "$scratch/run.txt")
    ns=$(sed -n 's/.*= \([0-9]*\) ns per delivery.*/\1/p' "$scratch/run.txt")
    lost=$(sed -n 's/.*lost \([0-9]*\),.*/\1/p' "$scratch/run.txt")
    gen=$(sed -n 's/.*cpu *loadgen \([0-9.]*\) s.*/\1/p' "$scratch/run.txt")
    closed=$(sed -n 's/.*closed by server \([0-9]*\),.*/\1/p' "$scratch/run.txt")
    awk -v label="$label" -v wl="T${clients}x$4" -v d="$delivered" -v p="$p99" -v n="$ns" \
        -v wr="$(relay_counter socket_writes)" -v e="$(relay_counter envelopes_out)" -v l="$lost" -v g="$gen" -v c="${closed:-0}" \
        'BEGIN { printf "%-22s %-12s %10s msgs/s  p99 %6s us  %6s ns/delivery  writes/envelope %.4f  lost %s  closed %s  generator %s s CPU\n", label, wl, d, p, n, (e > 0 ? wr / e : 0), l, c, g }'
}
