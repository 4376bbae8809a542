#!/usr/bin/env bash
# Footprint and scale (issue 5, targets 6 and 7), one shard pinned to CPU 0:
#  1. relay RSS per idle connection with 10,000 idle connections;
#  2. 19,900 connections, one publisher at 10 lines/s: every line reaches all the others;
#  3. at the open-file limit (max_connections set above it, more clients than descriptors):
#     the relay's CPU while everything is idle and the accept loop backs off.
#
#   cargo build --release --workspace
#   loadgen/scale.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source loadgen/run-corecast.sh
bin=target/release
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
quiet='{"logger":{"log_level":"WARNING"},"hyper_parameters":{"rate_limit_msgs_per_minute":null,"client_timeout_secs":null}}'

echo "== 10,000 idle connections"
start_relay "$quiet"
loadgen --scenario idle --clients 10000 --duration 3 --warmup 0 | grep -E "server rss|per connection|cpu"
stop_relay

echo "== 19,900 connections, one publisher at 10 lines/s"
start_relay "$quiet"
loadgen --clients 19900 --publishers 1 --rate 10 --duration 10 --warmup 1 | grep -E "delivered|latency|cpu|rss"
stop_relay

echo "== at the open-file limit: 19,900 + 300 idle connections, max_connections 30000"
start_relay '{"logger":{"log_level":"WARNING"},"hyper_parameters":{"rate_limit_msgs_per_minute":null,
  "client_timeout_secs":null,"max_connections":30000}}'
loadgen --scenario idle --clients 19900 --duration 25 --warmup 0 >"$scratch/idle-a.txt" &
first=$!
sleep 8
"$bin/corecast-loadgen" --target "127.0.0.1:$relay_port" --cpus 1 --no-progress --scenario idle --clients 300 \
    --duration 15 --warmup 0 >"$scratch/idle-b.txt" &
second=$!
sleep 3
ticks() { awk '{print $14 + $15}' "/proc/$relay_pid/stat"; }
before=$(ticks)
sleep 10
after=$(ticks)
echo "relay CPU while idle at the limit: $(awk -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f %%", 100 * t / hz / 10 }')"
echo "open descriptors: $(ls /proc/$relay_pid/fd | wc -l) (limit $(awk '/open files/ {print $4}' /proc/$relay_pid/limits))"
wait "$first" "$second" || true
stop_relay
grep -c "accept" "$scratch/relay.log" | sed 's/^/accept-error log lines: /'
grep -m3 "accept" "$scratch/relay.log" || true
