#!/usr/bin/env bash
# Two (or more) corecast builds on the same workloads in alternating rounds, the order
# reversing every round, so that the machine's drift does not always favour one build.
# Each directory holds a release `corecast` and `corecast-loadgen`; compare the
# per-round ratios, not figures from different rounds.
#
#   cargo build --release --workspace && mkdir -p /tmp/a && cp target/release/corecast{,-loadgen} /tmp/a
#   (change something, rebuild, copy to /tmp/b)
#   loadgen/compare-builds.sh "/tmp/a /tmp/b" "100x30 10x30000" 3
#   loadgen/compare-builds.sh "/tmp/a /tmp/b" "100x30b0 10x30000b0" 3   # per-line writes
set -euo pipefail
cd "$(dirname "$0")/.."
source loadgen/run-corecast.sh
builds=${1:?"usage: compare-builds.sh \"DIR_A DIR_B\" [\"100x30 10x30000\"] [rounds]"}
workloads=${2:-"100x30 10x30000"}
rounds=${3:-3}
duration=${DURATION:-5}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

config='{"logger":{"log_level":"WARNING"},"hyper_parameters":{"rate_limit_msgs_per_minute":null}}'
for round in $(seq "$rounds"); do
    if ((round % 2)); then order=$builds; else order=$(tr ' ' '\n' <<<"$builds" | tac | tr '\n' ' '); fi
    for wl in $workloads; do
        for bin in $order; do
            run_corecast "r$round $(basename "$bin")" "$config" "${wl%x*}" "${wl#*x}"
        done
    done
done
