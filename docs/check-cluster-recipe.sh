#!/usr/bin/env bash
# Runs the one-machine cluster recipe of docs/cluster.md exactly as written (the bash block
# between <!-- recipe:start --> and <!-- recipe:end -->) and checks that a line crossed
# from relay 1 to relay 2. Everything it starts runs in one process group of its own,
# which is stopped at the end whatever happened.
#
# Usage: docs/check-cluster-recipe.sh [CORECAST_BINARY]   (default: target/release/corecast)
# Needs nats-server on PATH and free ports 4222, 4223, 6222, 6223, 8881, 8882.
set -euo pipefail
cd "$(dirname "$0")/.."

export CORECAST=${1:-${CORECAST:-target/release/corecast}}
[ -x "$CORECAST" ] || command -v "$CORECAST" >/dev/null || {
    echo "check-cluster-recipe: no corecast binary at $CORECAST" >&2
    exit 1
}
command -v nats-server >/dev/null || { echo "check-cluster-recipe: nats-server is not installed" >&2; exit 1; }

work=$(mktemp -d)
recipe=$work/recipe.sh
awk '/^<!-- recipe:start -->$/ {on=1; next} /^<!-- recipe:end -->$/ {on=0} on' docs/cluster.md |
    sed -e '/^```/d' >"$recipe"
grep -q 'nats-server' "$recipe" || { echo "check-cluster-recipe: no recipe found in docs/cluster.md" >&2; exit 1; }

# The recipe, with errexit, in a new session (its process group id is its pid); bounded.
setsid bash -e "$recipe" >"$work/out" 2>"$work/err" &
group=$!
status=0
timeout_at=$((SECONDS + 120))
while kill -0 "$group" 2>/dev/null; do
    if [ "$SECONDS" -ge "$timeout_at" ]; then
        echo "check-cluster-recipe: the recipe did not finish within 120 s" >&2
        kill -- "-$group" 2>/dev/null || true
        break
    fi
    sleep 0.5
done
wait "$group" || status=$?
[ "$SECONDS" -lt "$timeout_at" ] || status=1
kill -- "-$group" 2>/dev/null || true  # anything the recipe left running

if [ "$status" -ne 0 ] || ! grep -Eq '^relay 2 got: \{"content":"hello [0-9]+ from relay 1","remote_addr":"127\.0\.0\.1:[0-9]+"\}$' "$work/out"; then
    echo "check-cluster-recipe: FAILED (exit $status)" >&2
    echo "--- stdout" >&2 && cat "$work/out" >&2
    echo "--- stderr (last 40 lines)" >&2 && tail -40 "$work/err" >&2
    rm -rf "$work"
    exit 1
fi
grep '^relay 2 got: ' "$work/out"
rm -rf "$work"
echo "check-cluster-recipe: ok, the line crossed the relays"
