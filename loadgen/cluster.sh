#!/usr/bin/env bash
# A corecast cluster against a single node (issue 16): the same fan-out (default T100x30:
# 100 clients, each publishing 30 lines/s) on one corecast node, then spread round-robin
# over NODES corecast nodes (default 2), each on its own nats-server of a routed NATS
# cluster on loopback. Rounds alternate (single, cluster, single, ...). Prints one line per
# run and a summary table: p99 of all deliveries, p99 of cross-node deliveries, and the
# corecast CPU per delivery (every node's CPU time over the whole run, warm-up and drain
# included, divided by every delivery), with the NATS servers' CPU beside it.
#
# Each node runs one shard; nothing is pinned (this machine has 2 cores for everything:
# nodes, NATS servers and the generator), so compare the lines with each other only.
#
#   cargo build --release --workspace
#   loadgen/cluster.sh            # NODES=2 ROUNDS=2 DURATION=5 WORKLOAD=100x30
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release
nodes=${NODES:-2}
rounds=${ROUNDS:-2}
duration=${DURATION:-5}
workload=${WORKLOAD:-100x30}
clients=${workload%x*}
rate=${workload#*x}
command -v nats-server >/dev/null || { echo "needs nats-server (apt-get install nats-server)" >&2; exit 1; }
scratch=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$scratch"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# uplink_ticks PID: CPU ticks of the node's uplink thread (corecast-cluster), 0 without one.
uplink_ticks() { cat /proc/"$1"/task/*/stat 2>/dev/null | awk '$2 ~ /corecast-cluste/ { s += $14 + $15 } END { print s + 0 }'; }
hz=$(getconf CLK_TCK)

# start_node NAME CONFIG_JSON: sets node_pid and node_port.
start_node() {
    printf '%s\n' "$2" >"$scratch/$1.json"
    "$bin/corecast" --port 0 --shards 1 --config "$scratch/$1.json" --log-level info 2>"$scratch/$1.log" &
    node_pid=$!
    pids+=("$node_pid")
    for _ in $(seq 100); do grep -qs "listening on" "$scratch/$1.log" && break; sleep 0.1; done
    node_port=$(grep -o 'listening on [0-9.:]*' "$scratch/$1.log" | head -1 | sed 's/.*://')
}

# start_nats N: a routed NATS cluster of N servers; sets nats_urls and nats_pids.
start_nats() {
    local n=$1 i j
    local -a cport rport
    nats_urls=()
    nats_pids=()
    for ((i = 0; i < n; i++)); do cport[i]=$(free_port); rport[i]=$(free_port); done
    for ((i = 0; i < n; i++)); do
        local routes=""
        for ((j = 0; j < n; j++)); do
            ((j == i)) || routes+="${routes:+,}nats://127.0.0.1:${rport[j]}"
        done
        nats-server -a 127.0.0.1 -p "${cport[i]}" --cluster_name bench --cluster "nats://127.0.0.1:${rport[i]}" \
            ${routes:+--routes "$routes"} 2>"$scratch/nats$i.log" &
        nats_pids+=($!)
        pids+=($!)
        nats_urls+=("nats://127.0.0.1:${cport[i]}")
    done
    sleep 1
}

base='"logger":{"log_level":"WARNING"},"hyper_parameters":{"rate_limit_msgs_per_minute":null'
results="$scratch/results.txt"
: >"$results"

run() {
    local kind=$1 round=$2
    local -a targets=() node_pids=() extra=()
    if [[ $kind == single ]]; then
        start_node single "{$base}}"
        targets=(--target "127.0.0.1:$node_port")
        node_pids=("$node_pid")
    else
        start_nats "$nodes"
        local i
        for ((i = 0; i < nodes; i++)); do
            # Node i names its own server first and the others as fail-overs.
            local urls="" k
            for ((k = 0; k < nodes; k++)); do
                urls+="${urls:+,}\"${nats_urls[(i + k) % nodes]}\""
            done
            start_node "node$i" "{$base,\"cluster\":{\"nats\":[$urls],\"subject\":\"bench\"}}}"
            targets+=(--target "127.0.0.1:$node_port")
            node_pids+=("$node_pid")
        done
        sleep 0.5
    fi
    local before=0 nats_before=0 up_before=0 p
    for p in "${node_pids[@]}"; do before=$((before + $(cpu_ticks "$p"))); up_before=$((up_before + $(uplink_ticks "$p"))); done
    if [[ $kind != single ]]; then for p in "${nats_pids[@]}"; do nats_before=$((nats_before + $(cpu_ticks "$p"))); done; fi
    "$bin/corecast-loadgen" "${targets[@]}" --clients "$clients" --publishers "$clients" --rate "$rate" \
        --duration "$duration" --warmup 1 --no-progress --json "$scratch/run.json" >"$scratch/run.txt"
    local after=0 nats_after=0 up_after=0
    for p in "${node_pids[@]}"; do after=$((after + $(cpu_ticks "$p"))); up_after=$((up_after + $(uplink_ticks "$p"))); done
    if [[ $kind != single ]]; then for p in "${nats_pids[@]}"; do nats_after=$((nats_after + $(cpu_ticks "$p"))); done; fi
    # SIGTERM the nodes for their final stats lines (socket writes per envelope), then NATS.
    for p in "${node_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    for p in ${nats_pids[@]+"${nats_pids[@]}"}; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    nats_pids=()
    local writes envelopes
    writes=$(cat "$scratch"/*.log | sed -n 's/.* socket_writes=\([0-9]*\).*/\1/p' | awk '{ s += $1 } END { print s + 0 }')
    envelopes=$(cat "$scratch"/*.log | sed -n 's/.* envelopes_out=\([0-9]*\).*/\1/p' | awk '{ s += $1 } END { print s + 0 }')
    rm -f "$scratch"/*.log
    python3 - "$scratch/run.json" "$kind" "$round" "$((after - before))" "$((nats_after - nats_before))" "$hz" "$writes" "$envelopes" "$((up_after - up_before))" <<'EOF' | tee -a "$results"
import json, sys
r = json.load(open(sys.argv[1]))
kind, rnd, ticks, nats_ticks, hz = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
writes, envelopes, up_ticks = int(sys.argv[7]), int(sys.argv[8]), int(sys.argv[9])
up_per = up_ticks / hz * 1e9 / max(r["delivered"], 1)
cpu = ticks / hz
per = cpu * 1e9 / max(r["delivered"], 1)
nats_per = nats_ticks / hz * 1e9 / max(r["delivered"], 1)
cross = r.get("cross_node")
print(f"{kind:7} round {rnd}  delivered {r['delivered']:>8} of {r['expected']:>8}  lost {r['lost']}  dup {r['duplicated']}  reord {r['reordered']}"
      f"  p99 {r['latency_us']['p99']:>6} us  cross-node p99 {cross['latency_us']['p99'] if cross else '-':>6} us"
      f"  corecast {per:7.0f} ns/delivery (uplink {up_per:5.0f})  nats {nats_per:6.0f} ns/delivery  writes/envelope {writes / max(envelopes, 1):.4f}")
EOF
}

for ((round = 1; round <= rounds; round++)); do
    run single "$round"
    run cluster "$round"
done

echo
echo "T${clients}x${rate}, ${nodes}-node cluster vs one node, ${rounds} round(s) of ${duration} s (medians):"
python3 - "$results" <<'EOF'
import re, statistics, sys
rows = {"single": [], "cluster": []}
for line in open(sys.argv[1]):
    kind = line.split()[0]
    def num(key):
        m = re.search(key + r" +([0-9.]+)", line)
        return float(m.group(1)) if m else None
    rows[kind].append((num("  p99"), num("cross-node p99"), num("corecast"), num("nats"), num(r"\(uplink")))
med = lambda xs: statistics.median([x for x in xs if x is not None]) if any(x is not None for x in xs) else float("nan")
s = [med([r[i] for r in rows["single"]]) for i in range(5)]
c = [med([r[i] for r in rows["cluster"]]) for i in range(5)]
print("| | single node | cluster | ratio |")
print("|---|---:|---:|---:|")
print(f"| p99 latency, all deliveries (µs) | {s[0]:.0f} | {c[0]:.0f} | {c[0]/s[0]:.2f} |")
print(f"| p99 latency, cross-node deliveries (µs) | - | {c[1]:.0f} | {c[1]/s[0]:.2f} (vs single p99) |")
print(f"| corecast CPU per delivery (ns), all threads | {s[2]:.0f} | {c[2]:.0f} | {c[2]/s[2]:.2f} |")
print(f"| of which the uplink thread (ns) | - | {c[4]:.0f} | |")
print(f"| shard threads only (ns) | {s[2]:.0f} | {c[2]-c[4]:.0f} | {(c[2]-c[4])/s[2]:.2f} |")
print(f"| NATS servers' CPU per delivery (ns) | - | {c[3]:.0f} | |")
EOF
