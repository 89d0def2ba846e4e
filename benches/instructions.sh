#!/usr/bin/env bash
# User-space instructions per request, counted by callgrind: tether against another
# tether build or against floor-hyper, at 1 KiB (issue 21).
#
# Timings on a shared 2-core host move by ±15 % between rounds, so a change worth
# 1–3 % of the CPU per request cannot be told from noise by compare.sh. Instruction
# counts can: callgrind counts every instruction the proxy executes in user space,
# and two runs of one build agree to about 0.2 %. (Kernel time is not counted: it
# follows the syscalls, which are the same for tether and floor-hyper.)
#
# For each target in turn: start it under valgrind --tool=callgrind behind the
# nginx origin of compare.sh, warm it up, zero the counters, run wrk for DURATION
# seconds, dump the counters, and divide by the requests wrk completed.
#
# Usage:  benches/instructions.sh
# Env:    TETHER_BIN       tether build (default: cargo build --profile profiling)
#         TETHER_BASE_BIN  a second build, target "tether-base"
#         FLOOR_BIN        benches/floor.rs build, targets "floor-hyper" and "floor-proxy"
#                          (floor-hyper plus the header work RFC 9110 asks of a proxy)
#         TARGETS          default "tether floor-hyper" (any of tether tether-base
#                          floor-hyper floor-proxy)
#         CONNS=64         wrk connections (64 over a cap of 16 queues every request;
#                          4 queues none). Under callgrind the proxy runs ~50× slower,
#                          so with 64 each connection waits ~60 ms between requests and
#                          the watcher's 10 ms parking timer fires once per request,
#                          which it does not at full speed (~1,000 instructions); with
#                          4 a connection's pace is about full speed's.
#         DURATION=6       measured seconds per target (under callgrind, ~50× slower)
#         SIZE=1k          1k or 1m
#         TOP=0            also print the N functions with the most instructions
#                          of their own (per request)
#         KEEP_TMP=1       keep the callgrind files
# Needs:  valgrind (Debian: valgrind), plus compare.sh's wrk, nginx, curl.
# Output: markdown on stdout; progress on stderr.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=compare/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/compare/lib.sh"

help_or_no_args "$@"

TARGETS=${TARGETS:-"tether floor-hyper"}
split_targets tether tether-base floor-hyper floor-proxy
has_target() { [[ " ${TARGET_LIST[*]} " == *" $1 "* ]]; }
CONNS=${CONNS:-64}
DURATION=${DURATION:-6}
SIZE=${SIZE:-1k}
TOP=${TOP:-0}
POOL_SIZE=${POOL_SIZE:-16}
CLIENT_IDLE_TIMEOUT=60s
MAX_CLIENTS=10000
WORKER_THREADS=${WORKER_THREADS:-2}
export POOL_SIZE CLIENT_IDLE_TIMEOUT MAX_CLIENTS WORKER_THREADS

require_tools wrk nginx curl valgrind callgrind_control callgrind_annotate envsubst
if has_target tether && [[ -z ${TETHER_BIN:-} ]]; then
    log "building tether (cargo build --profile profiling)"
    (cd "$REPO_DIR" && cargo build --profile profiling --bin tether) >&2
    TETHER_BIN="${CARGO_TARGET_DIR:-$REPO_DIR/target}/profiling/tether"
fi
has_target tether-base && [[ -z ${TETHER_BASE_BIN:-} ]] && die "tether-base needs TETHER_BASE_BIN"
{ has_target floor-hyper || has_target floor-proxy; } && [[ -z ${FLOOR_BIN:-} ]] && die "floor-hyper and floor-proxy need FLOOR_BIN"

bench_init
read -r P_UP P_PROXY P_FWD P_ADMIN <<<"$(free_ports 4)"
start_upstream "$P_UP"

# under_callgrind NAME BINARY: a wrapper that runs BINARY under callgrind.
under_callgrind() {
    local wrap="$WORK/$1.callgrind"
    mkdir -p "$WORK/$1"
    cat >"$wrap" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$WORK/$1/callgrind.%p "$2" "\$@"
EOF
    chmod +x "$wrap"
    echo "$wrap"
}

echo "## Instructions per request (callgrind), $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
host_line
echo "- $SIZE responses, wrk -t1 -c$CONNS for ${DURATION}s per target, cap $POOL_SIZE, $WORKER_THREADS runtime threads"
echo
echo "| target | requests | instructions per request |"
echo "|---|---:|---:|"
declare -A PER_REQUEST=()
for target in "${TARGET_LIST[@]}"; do
    log "$target: starting under callgrind"
    case $target in
    tether) start_tether tether "$P_PROXY" "$P_FWD" "$P_ADMIN" "$(under_callgrind tether "$TETHER_BIN")" ;;
    tether-base) start_tether tether-base "$P_PROXY" "$P_FWD" "$P_ADMIN" "$(under_callgrind tether-base "$TETHER_BASE_BIN")" ;;
    floor-hyper) FLOOR_BIN=$(under_callgrind floor-hyper "$FLOOR_BIN") start_floor floor-hyper "$P_PROXY" hyper ;;
    floor-proxy) FLOOR_BIN=$(under_callgrind floor-proxy "$FLOOR_BIN") start_floor floor-proxy "$P_PROXY" proxy ;;
    esac
    url="http://127.0.0.1:$P_PROXY/$SIZE"
    check_get "$url" "$([[ $SIZE == 1m ]] && echo 1048576 || echo 1024)"
    wrk -t1 -c"$CONNS" -d3s "$url" >/dev/null
    callgrind_control -z "$PROXY_PID" >/dev/null
    wrk -t1 -c"$CONNS" -d"${DURATION}s" "$url" >"$WORK/$target/wrk.txt"
    callgrind_control -d "$PROXY_PID" >/dev/null
    stop_tree "$PROXY_PID"
    requests=$(awk '/requests in/ { print $1 }' "$WORK/$target/wrk.txt")
    # The dump asked for above is part 1; part 2 is written at exit.
    dump=$(find "$WORK/$target" -name 'callgrind.*.1' | head -1)
    [[ -n $dump && ${requests:-0} -gt 0 ]] || die "$target: no callgrind dump or no requests"
    total=$(callgrind_annotate --auto=no "$dump" 2>/dev/null |
        awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
    PER_REQUEST[$target]=$((total / requests))
    echo "| $target | $requests | ${PER_REQUEST[$target]} |"
    if ((TOP > 0)); then
        callgrind_annotate --auto=no --inclusive=no --threshold=100 "$dump" 2>/dev/null |
            awk -v n="$requests" -v top="$TOP" '
                /^ *[0-9,]+ \(/ && !/PROGRAM TOTALS/ && !/\(100\.0%\)/ && !/clone|start_thread|thread_start|call_once|__rust_begin/ {
                    ir = $1; gsub(",", "", ir); sub(/^[^ ]+ +\([^)]*\) +/, ""); sub(/^[^:]*:/, "")
                    if (++k <= top) printf "%s\t%.0f\t%s\n", "'"$target"'", ir / n, $0 }' >>"$WORK/top.tsv"
    fi
done
echo
# ratio A B FORMAT: A's instructions per request over B's, when both ran.
ratio() {
    [[ -n ${PER_REQUEST[$1]:-} && -n ${PER_REQUEST[$2]:-} ]] || return 0
    awk -v a="${PER_REQUEST[$1]}" -v b="${PER_REQUEST[$2]}" -v f="$3" 'BEGIN { printf f, a / b }'
}
ratio tether floor-hyper '- tether / floor-hyper: %.2f×\n'
ratio tether floor-proxy '- tether / floor-proxy: %.2f× (governance alone)\n'
ratio tether tether-base '- tether / tether-base: %.3f×\n'
if ((TOP > 0)) && [[ -s $WORK/top.tsv ]]; then
    echo
    echo "| target | instructions per request (own) | function |"
    echo "|---|---:|---|"
    awk -F '\t' '{ printf "| %s | %s | `%s` |\n", $1, $2, substr($3, 1, 100) }' "$WORK/top.tsv"
fi
