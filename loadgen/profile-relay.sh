#!/usr/bin/env bash
# Profiles a running relay under open-loop load (groundwork for issue 26; see
# docs/performance.md). Starts corecast as run-corecast.sh does (one shard on CPU 0, the
# generator on CPU 1, per-line writes), waits 4 s, then on the relay: context switches and
# CPU ticks per thread before/after a 4 s `perf record -e cpu-clock -F 4000 -g`, a 3 s
# `perf stat` of io_uring / timer / scheduler tracepoints, a 3 s `strace -c -f`.
#   loadgen/profile-relay.sh BIN_DIR CLIENTS RATE OUT_DIR [FLUSH_WINDOW_US]
# Read the profile with: perf report -i OUT_DIR/perf.data --no-children --sort dso,sym
set -euo pipefail
bin=$1 clients=$2 rate=$3 out=$4 fw=${5:-1500}
scratch=$(mktemp -d)
mkdir -p "$out"
source "$(dirname "$0")/run-corecast.sh"
start_relay "{\"logger\":{\"log_level\":\"WARNING\"},\"hyper_parameters\":{\"rate_limit_msgs_per_minute\":null,\"flush_window_us\":$fw}}"
loadgen --clients "$clients" --publishers "$clients" --rate "$rate" --burst-us 0 --duration 22 --warmup 1 >"$out/loadgen.txt" 2>&1 &
lg=$!
sleep 4
snap() {
    for t in /proc/"$relay_pid"/task/*; do
        echo "  $(cat "$t/comm") $(grep ctxt "$t/status" | tr '\n' ' ') $(awk '{print "utime_ticks", $14, "stime_ticks", $15}' "$t/stat")"
    done
}
{ echo "load $(cat /proc/loadavg)"; echo "before perf: $(date +%s.%N)"; snap; } >"$out/counters.txt"
perf record -e cpu-clock -F 4000 -g -p "$relay_pid" -o "$out/perf.data" -- sleep 4 2>"$out/perf-record.err"
{ echo "after perf: $(date +%s.%N)"; snap; } >>"$out/counters.txt"
perf stat -e 'syscalls:sys_enter_io_uring_enter,io_uring:io_uring_submit_req,io_uring:io_uring_complete,timer:hrtimer_expire_entry,timer:hrtimer_start,sched:sched_switch,sched:sched_wakeup,syscalls:sys_enter_epoll_wait' \
    -p "$relay_pid" -o "$out/perf-stat.txt" -- sleep 3 2>/dev/null
timeout -s INT 3 strace -c -f -p "$relay_pid" -o "$out/strace.txt" 2>/dev/null || true
wait "$lg" || true
stop_relay
echo "$relay_stats" >"$out/relay-stats.txt"
rm -rf "$scratch"
