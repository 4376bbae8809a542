#!/usr/bin/env bash
# What the policies cost (issue 5, target 8): corecast with the rate limiter (at a limit no
# client reaches), backpressure accounting and the idle sweep (every second) on, against
# all of them off, in alternating rounds on the same workload.
#
#   cargo build --release --workspace
#   loadgen/policy-cost.sh 100x30 3
set -euo pipefail
cd "$(dirname "$0")/.."
source loadgen/run-corecast.sh
workload=${1:-100x30}
rounds=${2:-3}
duration=${DURATION:-10}
bin=target/release
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

on='{"logger":{"log_level":"WARNING"},"hyper_parameters":{"rate_limit_msgs_per_minute":1000000,
  "client_timeout_secs":300,"timeout_check_interval_secs":1}}'
off='{"logger":{"log_level":"WARNING"},"hyper_parameters":{"rate_limit_msgs_per_minute":null,"client_timeout_secs":null,
  "backpressure_policy":{"enable_throttle":false,"enable_flow_control":false,"enable_disconnect":false}}}'
# The order alternates between rounds, so that a drift in the machine's speed does not
# always favour the same side.
for round in $(seq "$rounds"); do
    if ((round % 2)); then order="on off"; else order="off on"; fi
    for side in $order; do
        if [[ $side == on ]]; then config=$on; else config=$off; fi
        run_corecast "round $round policies $side" "$config" "${workload%x*}" "${workload#*x}"
    done
done
