#!/usr/bin/env bash
# Side-by-side throughput/latency benchmark: tether vs HAProxy vs nginx (issue 11).
#
# One nginx origin on loopback serves /1k (1 KiB) and /1m (1 MiB). In front of it:
#   tether       route listener -> upstream, max_connections = max_idle = 16
#   haproxy-1t   nbthread 1, http-reuse always, server maxconn 16
#   haproxy-2t   the same with nbthread 2
#   nginx-proxy  upstream keepalive 16, proxy_http_version 1.1, 2 workers
# and `direct` (wrk straight at the origin) as the ceiling. Two reference proxies
# (benches/floor.rs) show what the stack costs without tether's work on top:
#   floor-hyper  hyper 1.x server + client, capped pool of 16, nothing else
#   floor-proxy  floor-hyper plus the header work RFC 9110 asks of every proxy
#                (hop-by-hop removed, Via, Host); not in the default TARGETS
#   floor-raw    tokio sockets + httparse, bytes forwarded unchanged
# For each file size,
# `wrk -t2 -c64 -d${DURATION}s --latency` runs against every target in turn,
# alternating targets over ${ROUNDS} rounds so drift hits all of them alike.
# While a target runs, its established sockets to the origin are sampled with
# `ss -tnp` (peak reported); for tether the opened-connections counter from
# /metrics is read before and after every run.
#
#   tether-base  the same with another tether binary (TETHER_BASE_BIN), to compare
#                two builds of tether in one run
# Usage:  benches/compare.sh [--skip-tether] [--targets "direct haproxy-1t ..."]
# Env:    TETHER_BIN      use this binary instead of `cargo build --release`
#         TETHER_BASE_BIN the binary of the tether-base target (required for it)
#         FLOOR_BIN       use this benches/floor.rs binary instead of building it
#         TARGETS         default "direct tether floor-hyper floor-raw haproxy-1t
#                         haproxy-2t nginx-proxy"
#         DURATION=10 ROUNDS=3 WARMUP=2 (seconds; 0 = no warm-up run)
#         THREADS=2 CONNECTIONS=64 POOL_SIZE=16 SIZES="1k 1m"
#         NGINX_PROXY_WORKERS=2 UPSTREAM_WORKERS=1 SAMPLE_INTERVAL=0.25
#         WORKER_THREADS  runtime threads of tether (proxy.worker_threads) and of
#                         floor-hyper/floor-raw; unset: one per core
#         BASE_WORKER_THREADS  the same for tether-base (TOKIO_WORKER_THREADS)
#         PROXY_CPUS      pin each proxy to these CPUs (taskset list, e.g. 1) and the
#                         origin and load to LOAD_CPUS (default: the other CPUs)
#         PROXY_CPU_LIMIT each proxy in a CPU cgroup with this quota, in millicores
#                         (500: deploy/sidecar's limits.cpu); needs root
#         OUT_DIR         keep raw wrk output, results.tsv and the tables here
#         KEEP_TMP=1      keep the work directory (configs, logs)
# Output: markdown on stdout (paste into benches/RESULTS.md); progress on stderr.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=compare/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/compare/lib.sh"

TARGETS=${TARGETS:-"direct tether floor-hyper floor-raw haproxy-1t haproxy-2t nginx-proxy"}
while (($#)); do
    case $1 in
    --skip-tether) TARGETS=$(tr ' ' '\n' <<<"$TARGETS" | grep -vx tether | tr '\n' ' ' || true) ;;
    --targets) TARGETS=$2; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (try --help)" ;;
    esac
    shift
done
split_targets direct tether tether-base floor-hyper floor-proxy floor-raw haproxy-1t haproxy-2t nginx-proxy
has_target() { [[ " ${TARGET_LIST[*]} " == *" $1 "* ]]; }
has_floor() { [[ " ${TARGET_LIST[*]} " == *" floor-"* ]]; }

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-2}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-64}
SIZES=${SIZES:-"1k 1m"}
SAMPLE_INTERVAL=${SAMPLE_INTERVAL:-0.25}
POOL_SIZE=${POOL_SIZE:-16}
CLIENT_IDLE_TIMEOUT=${CLIENT_IDLE_TIMEOUT:-10m}
MAX_CLIENTS=${MAX_CLIENTS:-4096}
export POOL_SIZE CLIENT_IDLE_TIMEOUT MAX_CLIENTS

require_tools wrk haproxy nginx curl ss python3 envsubst getconf
CLK_TCK=$(getconf CLK_TCK)
has_target tether && resolve_tether
if has_target tether-base; then
    [[ -x ${TETHER_BASE_BIN:-} ]] || die "the tether-base target needs TETHER_BASE_BIN, an executable"
fi
if has_floor; then resolve_floor; fi

ulimit -n "$(ulimit -Hn)"
bench_init
log "work directory $WORK"

# --- start everything -----------------------------------------------------
read -r P_UP P_TETHER P_TETHER_FWD P_TETHER_ADMIN P_H1 P_H2 P_NGX P_FH P_FR P_TB P_TB_FWD P_TB_ADMIN P_FP <<<"$(free_ports 13)"
declare -A PORT PID
start_upstream "$P_UP"
PORT[direct]=$P_UP
if has_target tether; then
    start_tether tether "$P_TETHER" "$P_TETHER_FWD" "$P_TETHER_ADMIN"
    PORT[tether]=$P_TETHER PID[tether]=$PROXY_PID
fi
if has_target tether-base; then
    start_tether tether-base "$P_TB" "$P_TB_FWD" "$P_TB_ADMIN" "$TETHER_BASE_BIN"
    PORT[tether-base]=$P_TB PID[tether-base]=$PROXY_PID
fi
if has_target floor-hyper; then
    start_floor floor-hyper "$P_FH" hyper
    PORT[floor-hyper]=$P_FH PID[floor-hyper]=$PROXY_PID
fi
if has_target floor-proxy; then
    start_floor floor-proxy "$P_FP" proxy
    PORT[floor-proxy]=$P_FP PID[floor-proxy]=$PROXY_PID
fi
if has_target floor-raw; then
    start_floor floor-raw "$P_FR" raw
    PORT[floor-raw]=$P_FR PID[floor-raw]=$PROXY_PID
fi
if has_target haproxy-1t; then
    start_haproxy haproxy-1t "$P_H1" 1
    PORT[haproxy-1t]=$P_H1 PID[haproxy-1t]=$PROXY_PID
fi
if has_target haproxy-2t; then
    start_haproxy haproxy-2t "$P_H2" 2
    PORT[haproxy-2t]=$P_H2 PID[haproxy-2t]=$PROXY_PID
fi
if has_target nginx-proxy; then
    start_nginx_proxy nginx-proxy "$P_NGX" "${NGINX_PROXY_WORKERS:-2}"
    PORT[nginx-proxy]=$P_NGX PID[nginx-proxy]=$PROXY_PID
fi
for t in "${TARGET_LIST[@]}"; do
    check_get "http://127.0.0.1:${PORT[$t]}/1k" 1024
    check_get "http://127.0.0.1:${PORT[$t]}/1m" 1048576
done
log "origin :$P_UP; targets: $(for t in "${TARGET_LIST[@]}"; do printf '%s=:%s ' "$t" "${PORT[$t]}"; done)"

# --- one wrk run ----------------------------------------------------------

# run_wrk SIZE TARGET ROUND DURATION : ROUND "warmup" is run but not recorded.
run_wrk() {
    local size=$1 target=$2 round=$3 dur=$4
    local tag="$size.$target.$round" url="http://127.0.0.1:${PORT[$target]}/$size"
    local out="$WORK/wrk.$tag.txt" peakf="$WORK/peak.$tag" opens="-" before="" after
    local wpid spid rc=0 pids ticks0="" ticks1 steal0
    steal0=$(host_steal)
    if [[ $target == tether ]]; then before=$(tether_opens "$P_TETHER_ADMIN"); fi
    if [[ $target != direct ]]; then
        # shellcheck disable=SC2046
        ticks0=$(cpu_ticks $(proc_tree "${PID[$target]}"))
    fi
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"${dur}s" --latency "$url" >"$out" 2>&1 &
    wpid=$!
    PIDS+=("$wpid")
    if [[ $target == direct ]]; then
        pids=$wpid
    else
        pids=$(proc_tree "${PID[$target]}" | tr '\n' ' ')
    fi
    # shellcheck disable=SC2086
    peak_sampler "$peakf" "$P_UP" $pids &
    spid=$!
    PIDS+=("$spid")
    wait "$wpid" || rc=$?
    forget_pid "$wpid"
    stop_tree "$spid"
    ((rc == 0)) || { cat "$out" >&2; die "wrk failed against $target ($url)"; }
    if [[ -n $ticks0 ]]; then
        # shellcheck disable=SC2046
        ticks1=$(cpu_ticks $(proc_tree "${PID[$target]}"))
    fi
    if [[ $target == tether ]]; then
        after=$(tether_opens "$P_TETHER_ADMIN")
        opens=$(counter_delta "$before" "$after")
    fi
    [[ $round == warmup ]] && return 0
    local parsed peak cpu="-"
    parsed=$(python3 "$TEMPLATES/report.py" parse "$out")
    peak=$(cat "$peakf")
    local rps p50 p99 mib requests
    IFS=$'\t' read -r rps mib p50 p99 requests _ <<<"$parsed"
    if [[ -n $ticks0 ]] && ((requests > 0)); then
        # The proxy's own CPU (user + system) per request: what it costs the shared cores.
        cpu=$(awk -v t=$((ticks1 - ticks0)) -v hz="$CLK_TCK" -v n="$requests" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$size" "$target" "$round" "$parsed" "$peak" "$opens" "$cpu" >>"$WORK/results.tsv"
    log "$(printf '%-3s round %s %-12s %10s req/s  p50 %8s ms  p99 %8s ms  %9s MiB/s  peak upstream %3s  opens %s  cpu %s us/req  steal %s%%' \
        "$size" "$round" "$target" "$rps" "$p50" "$p99" "$mib" "$peak" "$opens" "$cpu" "$(steal_since "$steal0")")"
}

# --- the runs ---------------------------------------------------------------
: >"$WORK/results.tsv"
for size in $SIZES; do
    if ((WARMUP > 0)); then
        for t in "${TARGET_LIST[@]}"; do
            log "$size warm-up $t (${WARMUP}s)"
            run_wrk "$size" "$t" warmup "$WARMUP"
        done
    fi
    for ((r = 1; r <= ROUNDS; r++)); do
        for t in "${TARGET_LIST[@]}"; do
            run_wrk "$size" "$t" "$r" "$DURATION"
        done
    done
done

# --- the report -------------------------------------------------------------
{
    echo "### compare.sh — $(date -u +'%Y-%m-%d %H:%M UTC')"
    echo
    host_line
    warm=""
    ((WARMUP > 0)) && warm="; ${WARMUP}s unrecorded warm-up per target"
    echo "- load: \`wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s --latency\`, $ROUNDS rounds alternating targets, median shown$warm"
    echo "- origin: nginx, $(version nginx -v | sed 's/^nginx version: //'), ${UPSTREAM_WORKERS:-1} worker(s), everything on 127.0.0.1"
    echo "- pool: $POOL_SIZE upstream connections per proxy (tether max_connections/max_idle, HAProxy server maxconn, nginx keepalive)"
    has_target haproxy-1t || has_target haproxy-2t && echo "- haproxy: $(version haproxy -v | sed 's/ - https.*//')"
    has_target nginx-proxy && echo "- nginx-proxy: ${NGINX_PROXY_WORKERS:-2} worker(s)"
    has_target tether && echo "- tether: $(version "$TETHER_BIN" --version)"
    echo "- runtime threads: tether ${WORKER_THREADS:-one per core}, tether-base ${BASE_WORKER_THREADS:-one per core}, floor-hyper/floor-proxy/floor-raw ${WORKER_THREADS:-one per core}"
    has_floor && echo "- floor-hyper / floor-proxy / floor-raw: the reference proxies of benches/floor.rs (the stack's cost; floor-proxy adds the header work RFC 9110 asks of every proxy)"
    echo "- peak upstream sockets: established sockets to the origin owned by the target's processes, sampled every ${SAMPLE_INTERVAL}s (for direct: wrk's own)"
    echo "- upstream opens/run: delta of tether_upstream_connections_opened_total per round (tether only)"
    echo "- proxy CPU µs/req: CPU time (user + system) the proxy's processes used during the run, per request served"
    echo
    for size in $SIZES; do
        case $size in 1k) title="1 KiB (/1k)" ;; 1m) title="1 MiB (/1m)" ;; *) title=$size ;; esac
        python3 "$TEMPLATES/report.py" table "$WORK/results.tsv" "$size" "$title"
    done
} >"$WORK/report.md"
cat "$WORK/report.md"

if [[ -n ${OUT_DIR:-} ]]; then
    mkdir -p "$OUT_DIR"
    cp "$WORK"/wrk.*.txt "$WORK/results.tsv" "$WORK/report.md" "$OUT_DIR"/
    log "raw results in $OUT_DIR"
fi
