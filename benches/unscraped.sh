#!/usr/bin/env bash
# tether's RSS under load when nobody scrapes /metrics (benches/SOAK.md).
#
# The Prometheus exporter buffers every histogram observation until a scrape or an
# upkeep drains it. This runs wrk against a tether route for SECS seconds without
# ever touching /metrics and prints tether's VmRSS every 10 s: flat when the upkeep
# task drains the buffers, a straight line up (about 20 bytes per request) when not.
#
# Usage:  benches/unscraped.sh
# Env:    TETHER_BIN  use this binary instead of `cargo build --release`
#         SECS=60     seconds of load        CONNS=8   wrk connections (one thread)
#         KEEP_TMP=1  keep the work directory
# Needs:  wrk nginx curl (apt-get install wrk nginx curl)
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=compare/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/compare/lib.sh"

SECS=${SECS:-60}
CONNS=${CONNS:-8}
for t in wrk nginx curl envsubst; do
    command -v "$t" >/dev/null 2>&1 || die "missing $t (apt-get install wrk nginx curl gettext-base)"
done
resolve_tether
bench_init
read -r P_UP P_ROUTE P_PROXY P_ADMIN <<<"$(free_ports 4)"
start_upstream "$P_UP"
POOL_SIZE=8 CLIENT_IDLE_TIMEOUT=30s MAX_CLIENTS=4096
export POOL_SIZE CLIENT_IDLE_TIMEOUT MAX_CLIENTS
start_tether tether "$P_ROUTE" "$P_PROXY" "$P_ADMIN"

rss() { awk '/^VmRSS:/ { print $2 }' "/proc/$PROXY_PID/status"; }
echo "| t (s) | tether RSS (MiB) |"
echo "|---|---|"
echo "| 0 | $(awk -v k="$(rss)" 'BEGIN { printf "%.1f", k / 1024 }') |"
start_bg "$WORK/wrk.out" wrk -t1 -c"$CONNS" -d"${SECS}s" "http://127.0.0.1:$P_ROUTE/1k"
for ((t = 10; t <= SECS; t += 10)); do
    sleep 10
    echo "| $t | $(awk -v k="$(rss)" 'BEGIN { printf "%.1f", k / 1024 }') |"
done
wait "$BG_PID" || true
echo
echo "wrk: $(grep -E 'requests in' "$WORK/wrk.out" | xargs)"
