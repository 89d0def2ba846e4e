#!/usr/bin/env bash
# Memory per idle keep-alive client connection: tether vs HAProxy vs nginx (issue 11).
#
# For each proxy in turn (same origin and configs as benches/compare.sh, but with
# 10-minute client idle timeouts and 20000-connection limits):
#   1. start it, warm it up with a short wrk run, let it settle;
#   2. measure its memory (VmRSS and Pss summed over all its processes);
#   3. open N client connections with benches/idle_clients.py, each after one
#      complete `GET /1k`, and hold them idle;
#   4. measure again, count the established client sockets the proxy holds (ss),
#      and report (after - before) / held as KiB per idle connection;
#   5. stop the clients and the proxy before the next one starts.
#
# Usage:  benches/idle.sh [--skip-tether] [--targets "tether haproxy nginx-proxy"]
# Env:    TETHER_BIN   use this binary instead of `cargo build --release`
#         TARGETS      default "tether haproxy nginx-proxy"
#         N=10000      idle connections
#         WARMUP=2     seconds of wrk -t1 -c16 before the baseline (0 = none)
#         SETTLE=2     seconds between the warm-up and the baseline
#         HOLD=15      seconds the connections stay idle before the second
#                      measurement (longer than tether's 10 s header_read_timeout,
#                      so a proxy that closes idle keep-alive clients early shows it)
#         IDLE_NGINX_WORKERS=1                KEEP_TMP=1 keep configs and logs
# Output: markdown on stdout; progress on stderr.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=compare/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/compare/lib.sh"

TARGETS=${TARGETS:-"tether haproxy nginx-proxy"}
while (($#)); do
    case $1 in
    --skip-tether) TARGETS=$(tr ' ' '\n' <<<"$TARGETS" | grep -vx tether | tr '\n' ' ' || true) ;;
    --targets) TARGETS=$2; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (try --help)" ;;
    esac
    shift
done
split_targets tether haproxy nginx-proxy

N=${N:-10000}
SETTLE=${SETTLE:-2}
HOLD=${HOLD:-15}
WARMUP=${WARMUP:-2}
POOL_SIZE=${POOL_SIZE:-16}
CLIENT_IDLE_TIMEOUT=10m
MAX_CLIENTS=20000
export POOL_SIZE CLIENT_IDLE_TIMEOUT MAX_CLIENTS

require_tools wrk haproxy nginx curl ss python3 envsubst
[[ " ${TARGET_LIST[*]} " == *" tether "* ]] && resolve_tether

ulimit -n "$(ulimit -Hn)"
if (($(ulimit -n) < N + 100)); then
    die "open-file limit $(ulimit -n) is too low for N=$N (raise the hard limit)"
fi
bench_init
log "work directory $WORK; N=$N; open-file limit $(ulimit -n)"

read -r P_UP P_TETHER P_TETHER_FWD P_TETHER_ADMIN P_HAPROXY P_NGX <<<"$(free_ports 6)"
start_upstream "$P_UP"

ROWS=()
for t in "${TARGET_LIST[@]}"; do
    case $t in
    tether) port=$P_TETHER; start_tether tether "$P_TETHER" "$P_TETHER_FWD" "$P_TETHER_ADMIN"; label="tether" ;;
    haproxy) port=$P_HAPROXY; start_haproxy haproxy "$P_HAPROXY" 1; label="haproxy (nbthread 1)" ;;
    nginx-proxy) port=$P_NGX; start_nginx_proxy nginx-proxy "$P_NGX" "${IDLE_NGINX_WORKERS:-1}"
        label="nginx-proxy (${IDLE_NGINX_WORKERS:-1} worker)" ;;
    esac
    check_get "http://127.0.0.1:$port/1k" 1024
    if ((WARMUP > 0)); then
        wrk -t1 -c16 -d"${WARMUP}s" "http://127.0.0.1:$port/1k" >"$WORK/warmup.$t.txt" 2>&1
    fi
    sleep "$SETTLE"

    pids=$(proc_tree "$PROXY_PID" | tr '\n' ' ')
    # shellcheck disable=SC2086
    read -r rss0 pss0 <<<"$(mem_kb $pids)"
    log "$t: pids $pids; before: RSS ${rss0} KiB, PSS ${pss0} KiB; opening $N connections"

    out="$WORK/clients.$t.out"
    start_bg "$out" python3 "$BENCH_DIR/idle_clients.py" --port "$port" -n "$N"
    cpid=$BG_PID
    for ((i = 0; i < 3000; i++)); do
        grep -qs '^ready ' "$out" && break
        alive "$cpid" || { cat "$out" >&2; die "idle_clients.py exited early"; }
        sleep 0.1
    done
    grep -q '^ready ' "$out" || { cat "$out" >&2; die "idle_clients.py not ready after 300 s"; }
    ready=$(grep '^ready ' "$out")
    log "$t: $ready; holding them idle for ${HOLD}s"
    sleep "$HOLD"

    pids=$(proc_tree "$PROXY_PID" | tr '\n' ' ')
    # shellcheck disable=SC2086
    read -r rss1 pss1 <<<"$(mem_kb $pids)"
    # shellcheck disable=SC2086
    held=$(count_socks "src 127.0.0.1:$port" $pids)
    kill -USR1 "$cpid"
    sleep 0.5
    status=$(grep '^status ' "$out" | tail -n 1 || true)
    log "$t: after: RSS ${rss1} KiB, PSS ${pss1} KiB; proxy holds $held client sockets; clients: $status"

    stop_tree "$cpid"
    stop_tree "$PROXY_PID"

    failed=$(sed -n 's/.*failed=\([0-9]*\).*/\1/p' <<<"$ready")
    closed=$(sed -n 's/.*closed_by_peer=\([0-9]*\).*/\1/p' <<<"$status")
    ROWS+=("$(awk -v l="$label" -v h="$held" -v f="$failed" -v c="${closed:-?}" -v r0="$rss0" -v r1="$rss1" -v p0="$pss0" -v p1="$pss1" 'BEGIN {
        per = h > 0 ? sprintf("%.2f", (r1 - r0) / h) : "n/a"
        pper = h > 0 ? sprintf("%.2f", (p1 - p0) / h) : "n/a"
        printf "| %s | %d | %d | %s | %.1f | %.1f | %s | %s |", l, h, f, c, r0 / 1024, r1 / 1024, per, pper
    }')")
done

echo "### idle.sh — $(date -u +'%Y-%m-%d %H:%M UTC')"
echo
echo "- $N idle keep-alive client connections, each after one complete \`GET /1k\` (benches/idle_clients.py), held idle ${HOLD}s before measuring"
echo "- memory summed over the proxy's processes: VmRSS (/proc/PID/status) and Pss (/proc/PID/smaps_rollup), after a ${WARMUP}s \`wrk -t1 -c16\` warm-up"
echo "- held = established client sockets owned by the proxy (ss); KiB/conn = (after - before) / held; user-space memory only (kernel socket buffers are not in RSS)"
echo "- client idle timeout 10m and 20000-connection limits on every proxy; host $(nproc) CPUs, $(uname -sr)"
echo
echo "| proxy | held | client failures | closed by proxy | RSS before MiB | RSS after MiB | ΔRSS KiB/conn | ΔPSS KiB/conn |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${ROWS[@]}"
