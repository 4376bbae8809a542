#!/usr/bin/env bash
# Two shards against one (issue 5, target 10): the same fan-out with corecast on one shard
# (CPU 0) and on two shards (CPUs 0 and 1). This machine has two cores, so the generator
# shares them in both runs (it is not pinned); compare the two lines with each other, not
# with the one-shard runs elsewhere, where the generator has a core of its own.
#
#   cargo build --release --workspace
#   loadgen/shards.sh "100x30 10x30000"
set -euo pipefail
cd "$(dirname "$0")/.."
source loadgen/run-corecast.sh
workloads=${1:-"100x30 10x30000"}
duration=${DURATION:-5}
bin=target/release
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
config='{"logger":{"log_level":"WARNING"},"hyper_parameters":{"rate_limit_msgs_per_minute":null}}'

for wl in $workloads; do
    for shards in 1 2; do
        RELAY_CPUS=0-1 SHARDS=$shards LOADGEN_CPUS= \
            run_corecast "$shards shard(s)" "$config" "${wl%x*}" "${wl#*x}"
    done
done
