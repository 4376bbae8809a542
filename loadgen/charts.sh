#!/usr/bin/env bash
# Re-takes the comparison behind docs/performance.md's charts and writes its report into
# docs/charts/: compare.html (self-contained, offline), one SVG per chart, the JSON (with
# the versions, machine, date, command line and server settings), the CSV summary and
# per-second timeline, the .hgrm distributions and the medians table (compare.md).
# Needs nats-server and redis-server installed (apt-get install nats-server redis-server);
# a peer that is missing is left out. Usage, from anywhere in the repository:
#   loadgen/charts.sh                       # T100x30,T10x30000, 3 rounds of 5 s
#   WORKLOADS=T100x30 ROUNDS=5 DURATION=10 OUT=/tmp/charts loadgen/charts.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/charts}
WORKLOADS=${WORKLOADS:-T100x30,T10x30000}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
cargo build --release -p corecast -p corecast-loadgen
BIN=${CARGO_TARGET_DIR:-target}/release
mkdir -p "$OUT"
# The table goes to a scratch file first: the generator records whether the work tree
# has changes when it starts, and files rewritten in docs/charts would count as changes.
table=$(mktemp)
"$BIN/corecast-loadgen" compare --corecast-bin "$BIN/corecast" --workloads "$WORKLOADS" \
    --rounds "$ROUNDS" --duration "$DURATION" --json "$OUT/compare.json" \
    --report "$OUT/compare.html" --charts "$OUT" --csv "$OUT/compare" --hgrm "$OUT/compare" \
    | tee "$table"
cat "$table" > "$OUT/compare.md"
rm -f "$table"
