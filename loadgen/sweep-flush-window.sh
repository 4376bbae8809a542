#!/usr/bin/env bash
# Measures corecast at several flush windows, one workload per line of output.
#
#   cargo build --release --workspace
#   loadgen/sweep-flush-window.sh "0 1000 2000" "100x30 10x30000"
set -euo pipefail
cd "$(dirname "$0")/.."
source loadgen/run-corecast.sh
windows=${1:-"0 500 1000 2000"}
workloads=${2:-"100x30 10x30000 100x100"}
duration=${DURATION:-5}
bin=target/release
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

for w in $windows; do
    for wl in $workloads; do
        config=$(printf '{"logger":{"log_level":"WARNING"},"hyper_parameters":{"rate_limit_msgs_per_minute":null,"flush_window_us":%s}}' "$w")
        run_corecast "flush_window_us=$w" "$config" "${wl%x*}" "${wl#*x}"
    done
done
