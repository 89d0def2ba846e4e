# shellcheck shell=bash
# Shared helpers for benches/compare.sh, benches/idle.sh and benches/registry.sh. Sourced, not run.
#
# Every process started through start_bg() is recorded in PIDS and is stopped
# (TERM, then KILL after a grace period, descendants included) by the EXIT trap
# installed by bench_init(); the work directory is removed unless KEEP_TMP=1.

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
TEMPLATES="$BENCH_DIR/compare"
PIDS=()
WORK=

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Where each proxy under test runs:
# - PROXY_CPUS (a taskset CPU list, e.g. "1"): on those CPUs alone, and this script
#   with everything it starts besides the proxies (origin, load generator, samplers)
#   on LOAD_CPUS (default: every other CPU). Pinned, a proxy's throughput is what
#   its own CPUs give, not what it wins from the origin and wrk on shared ones.
# - PROXY_CPU_LIMIT (millicores, e.g. 500): in a CPU cgroup of its own with that
#   quota, as a Kubernetes sidecar with `limits.cpu: 500m` runs. The proxy is then
#   what runs out of CPU first, so its throughput follows its CPU per request.
# Unset, nothing is pinned or limited, and all share all CPUs.
PROXY_PIN=()
CGROUPS=()
pin_cpus() {
    [[ -n ${PROXY_CPUS:-} ]] || return 0
    command -v taskset >/dev/null || die "PROXY_CPUS needs taskset (util-linux)"
    if [[ -z ${LOAD_CPUS:-} ]]; then
        LOAD_CPUS=$(python3 -c 'import os, sys
proxy = set()
for part in sys.argv[1].split(","):
    a, _, b = part.partition("-")
    proxy.update(range(int(a), int(b or a) + 1))
rest = sorted(os.sched_getaffinity(0) - proxy)
print(",".join(map(str, rest)))' "$PROXY_CPUS") || die "bad PROXY_CPUS: $PROXY_CPUS"
        [[ -n $LOAD_CPUS ]] || die "PROXY_CPUS=$PROXY_CPUS leaves no CPU for the load; set LOAD_CPUS"
    fi
    taskset -pc "$LOAD_CPUS" $$ >/dev/null || die "cannot pin the load to CPUs $LOAD_CPUS"
    PROXY_PIN=(taskset -c "$PROXY_CPUS")
    log "pinned: proxies on CPUs $PROXY_CPUS, origin and load on CPUs $LOAD_CPUS"
}

# proxy_wrap NAME : sets WRAP to the prefix that starts proxy NAME pinned and within
# its CPU limit (both exec, so the PID started is the proxy's), or to nothing.
proxy_wrap() {
    WRAP=("${PROXY_PIN[@]}")
    [[ -n ${PROXY_CPU_LIMIT:-} ]] || return 0
    [[ $PROXY_CPU_LIMIT =~ ^[1-9][0-9]*$ ]] || die "PROXY_CPU_LIMIT is in millicores, e.g. 500"
    local cg quota=$((PROXY_CPU_LIMIT * 100)) # per 100 ms period
    if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then # cgroup v2
        cg="/sys/fs/cgroup/tether-bench-${WORK##*.}-$1-${#CGROUPS[@]}"
        if ! { mkdir "$cg" && echo "$quota 100000" >"$cg/cpu.max"; }; then
            die "cannot make a CPU cgroup at $cg (is the cpu controller enabled?)"
        fi
    else
        cg="/sys/fs/cgroup/cpu/tether-bench-${WORK##*.}-$1-${#CGROUPS[@]}"
        if ! { mkdir "$cg" && echo 100000 >"$cg/cpu.cfs_period_us" &&
            echo "$quota" >"$cg/cpu.cfs_quota_us"; }; then
            die "cannot make a CPU cgroup at $cg"
        fi
    fi
    CGROUPS+=("$cg")
    # shellcheck disable=SC2016 # expanded by that sh
    WRAP+=(sh -c 'echo $$ >"$1/cgroup.procs" && shift && exec "$@"' sh "$cg")
}

# pin_line : the markdown lines saying how the proxies were pinned or limited.
pin_line() {
    if ((${#PROXY_PIN[@]})); then
        echo "- pinned (taskset): the proxy under test on CPUs $PROXY_CPUS, origin and load generator on CPUs $LOAD_CPUS"
    fi
    if [[ -n ${PROXY_CPU_LIMIT:-} ]]; then
        echo "- CPU limit: each proxy in a CPU cgroup of its own with a quota of ${PROXY_CPU_LIMIT}m (CFS, 100 ms period), as a sidecar with \`limits.cpu: ${PROXY_CPU_LIMIT}m\`; tether's and floor's default runtime threads follow the quota (Rust's \`available_parallelism\` reads it: one below 2000m)"
    fi
}

bench_init() {
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/tether-bench.XXXXXX")
    # nginx workers drop to `nobody` when started as root: let them read the tree.
    chmod 755 "$WORK"
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM HUP
    pin_cpus
}

bench_cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    local pid
    for pid in "${PIDS[@]}"; do
        stop_tree "$pid"
    done
    local cg
    for cg in "${CGROUPS[@]}"; do
        rmdir "$cg" 2>/dev/null || { sleep 0.5; rmdir "$cg" 2>/dev/null; } || log "left cgroup $cg"
    done
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ ${KEEP_TMP:-0} == 1 ]]; then
            log "kept work directory $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}

# require_tools TOOL... : exits with the apt-get hint when any is missing.
require_tools() {
    local missing=() t
    for t in "$@"; do
        command -v "$t" >/dev/null 2>&1 || missing+=("$t")
    done
    if ((${#missing[@]})); then
        echo "missing: ${missing[*]}" >&2
        echo "install them with:  apt-get install -y wrk haproxy nginx" >&2
        exit 1
    fi
}

# free_ports N : N distinct free loopback TCP ports chosen by the kernel.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# render TEMPLATE OUT : envsubst restricted to the ${NAMES} the template uses, so
# nginx/HAProxy syntax that happens to contain `$` is left alone. Fails when a name
# is unset.
render() {
    local tpl=$1 out=$2 names n
    names=$(grep -oE '\$\{[A-Z_][A-Z0-9_]*\}' "$tpl" | sort -u | tr '\n' ' ')
    for n in $names; do
        n=${n#\$\{}; n=${n%\}}
        [[ -n ${!n+x} ]] || die "render $tpl: \$$n is not set"
        export "${n?}"
    done
    envsubst "$names" <"$tpl" >"$out"
}

# start_bg LOGFILE CMD... : start CMD in the background, record its PID in PIDS
# and in BG_PID (not printed: a command substitution would run it in a subshell).
start_bg() {
    local logf=$1
    shift
    "$@" >"$logf" 2>&1 </dev/null &
    BG_PID=$!
    PIDS+=("$BG_PID")
}

forget_pid() {
    local keep=() p
    for p in "${PIDS[@]}"; do
        [[ $p == "$1" ]] || keep+=("$p")
    done
    PIDS=("${keep[@]}")
}

# proc_tree PID : PID and all its descendants, one per line.
proc_tree() {
    local p c
    alive "$1" || return 0
    echo "$1"
    for c in $(pgrep -P "$1" 2>/dev/null || true); do
        proc_tree "$c"
    done
}

# alive PID : the process exists and is not a zombie (kill -0 succeeds on zombies).
alive() {
    local stat
    { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# stop_tree PID : TERM the process (nginx/HAProxy masters stop their workers),
# wait up to 5 s for it and every descendant, then KILL what is left.
stop_tree() {
    local pid=$1 tree i p left
    tree=$(proc_tree "$pid")
    if [[ -n $tree ]]; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            left=0
            for p in $tree; do
                if alive "$p"; then left=1; fi
            done
            ((left)) || break
            sleep 0.1
        done
        for p in $tree; do
            if alive "$p"; then kill -KILL "$p" 2>/dev/null || true; fi
        done
    fi
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
}

# wait_port PORT PID LOGFILE : wait until 127.0.0.1:PORT accepts, failing early
# if PID dies (its log is shown).
wait_port() {
    local port=$1 pid=$2 logf=$3 i
    for ((i = 0; i < 300; i++)); do
        if ! alive "$pid"; then
            log "process $pid exited before listening on $port; log:"
            tail -n 30 "$logf" >&2 || true
            exit 1
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    log "timed out waiting for port $port; log:"
    tail -n 30 "$logf" >&2 || true
    exit 1
}

# check_get URL BYTES : one request must return 200 with exactly BYTES of body.
check_get() {
    local got
    got=$(curl -sS --max-time 10 -o /dev/null -w '%{http_code} %{size_download}' "$1") ||
        die "GET $1 failed"
    [[ $got == "200 $2" ]] || die "GET $1: expected '200 $2', got '$got'"
}

# mem_kb PID... : "RSS_KB PSS_KB" summed over the processes (VmRSS from
# /proc/PID/status, Pss from /proc/PID/smaps_rollup).
mem_kb() {
    local rss=0 pss=0 p v
    for p in "$@"; do
        v=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || true)
        rss=$((rss + ${v:-0}))
        v=$(awk '/^Pss:/ {print $2}' "/proc/$p/smaps_rollup" 2>/dev/null || true)
        pss=$((pss + ${v:-0}))
    done
    echo "$rss $pss"
}

# cpu_ticks PID... : CPU time (user + system, in clock ticks) the PIDs have used.
cpu_ticks() {
    local t=0 p v
    for p in "$@"; do
        # Fields after the ")" that ends the command name: utime is the 12th, stime the 13th.
        v=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{ print $12 + $13 }' || true)
        t=$((t + ${v:-0}))
    done
    echo "$t"
}

# count_socks FILTER PID... : established TCP sockets matching the ss FILTER
# (e.g. "dst 127.0.0.1:8080") owned by one of the PIDs, counted by distinct
# (local address, peer address) pair, i.e. one per socket.
count_socks() {
    local filter=$1
    shift
    local re
    re="pid=($(IFS='|'; echo "$*")),"
    # shellcheck disable=SC2086  # FILTER is deliberately split into ss words
    ss -Htnp state established $filter 2>/dev/null |
        { grep -E "$re" || true; } |
        awk '{ k = ""; for (i = 1; i <= NF; i++) if ($i ~ /^[0-9.]+:[0-9]+$/) k = k " " $i; print k }' |
        sort -u | wc -l
}

# peak_sampler OUTFILE PORT PID... : every SAMPLE_INTERVAL (default 0.25 s), count
# the PIDs' established sockets to 127.0.0.1:PORT; keep the peak in OUTFILE. Runs
# until killed (start it in the background).
peak_sampler() {
    local out=$1 port=$2 peak=0 n
    shift 2
    echo 0 >"$out"
    while :; do
        n=$(count_socks "dst 127.0.0.1:$port" "$@")
        if ((n > peak)); then
            peak=$n
            echo "$peak" >"$out"
        fi
        sleep "${SAMPLE_INTERVAL:-0.25}"
    done
}

# --- the servers ----------------------------------------------------------

# Origin: nginx serving /1k and /1m. Sets UPSTREAM_PORT, UPSTREAM_PID.
start_upstream() {
    local port=$1 dir="$WORK/upstream"
    mkdir -p "$dir/www"
    head -c 1024 /dev/urandom >"$dir/www/1k"
    head -c 1048576 /dev/urandom >"$dir/www/1m"
    chmod -R a+rX "$dir"
    PREFIX=$dir WWW=$dir/www LISTEN_PORT=$port WORKERS=${UPSTREAM_WORKERS:-1} \
        RLIMIT=$(ulimit -n) WORKER_CONNECTIONS=${UPSTREAM_WORKER_CONNECTIONS:-4096} \
        render "$TEMPLATES/nginx-upstream.conf.in" "$dir/nginx.conf"
    start_bg "$dir/stdout.log" nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf"
    UPSTREAM_PID=$BG_PID
    export UPSTREAM_PORT=$port  # read by the proxy templates
    wait_port "$port" "$UPSTREAM_PID" "$dir/error.log"
    check_get "http://127.0.0.1:$port/1k" 1024
    check_get "http://127.0.0.1:$port/1m" 1048576
}

# The proxies. Each takes NAME LISTEN_PORT and sets PROXY_PID. They read
# UPSTREAM_PORT, POOL_SIZE, CLIENT_IDLE_TIMEOUT, MAX_CLIENTS from the caller.

start_haproxy() { # NAME PORT NBTHREAD
    local port=$2 dir="$WORK/$1"
    mkdir -p "$dir"
    LISTEN_PORT=$port NBTHREAD=$3 MAXCONN=$MAX_CLIENTS \
        render "$TEMPLATES/haproxy.cfg.in" "$dir/haproxy.cfg"
    haproxy -c -q -f "$dir/haproxy.cfg" >"$dir/check.log" 2>&1 ||
        { cat "$dir/check.log" >&2; die "haproxy config check failed"; }
    proxy_wrap "$1"
    start_bg "$dir/haproxy.log" "${WRAP[@]}" haproxy -db -f "$dir/haproxy.cfg"
    PROXY_PID=$BG_PID
    wait_port "$port" "$PROXY_PID" "$dir/haproxy.log"
}

start_nginx_proxy() { # NAME PORT WORKERS
    local port=$2 dir="$WORK/$1"
    mkdir -p "$dir"
    PREFIX=$dir LISTEN_PORT=$port WORKERS=$3 RLIMIT=$(ulimit -n) \
        WORKER_CONNECTIONS=$MAX_CLIENTS \
        render "$TEMPLATES/nginx-proxy.conf.in" "$dir/nginx.conf"
    proxy_wrap "$1"
    start_bg "$dir/stdout.log" "${WRAP[@]}" nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf"
    PROXY_PID=$BG_PID
    wait_port "$port" "$PROXY_PID" "$dir/error.log"
}

start_tether() { # NAME ROUTE_PORT PROXY_PORT ADMIN_PORT [BINARY, default $TETHER_BIN]
    local port=$2 dir="$WORK/$1"
    mkdir -p "$dir"
    LISTEN_PORT=$port PROXY_PORT=$3 ADMIN_PORT=$4 MAX_CLIENT_CONNECTIONS=$MAX_CLIENTS \
        render "$TEMPLATES/tether.toml.in" "$dir/tether.toml"
    # WORKER_THREADS: tether's runtime threads, through its config key
    # (proxy.worker_threads). BASE_WORKER_THREADS: the same for tether-base, through
    # tokio's TOKIO_WORKER_THREADS (an older build may not know the key).
    local -a threads=()
    if [[ -z ${5:-} && -n ${WORKER_THREADS:-} ]]; then
        sed -i "s/^\[proxy\]\$/[proxy]\nworker_threads = $WORKER_THREADS/" "$dir/tether.toml"
    elif [[ -n ${5:-} && -n ${BASE_WORKER_THREADS:-} ]]; then
        threads=(TOKIO_WORKER_THREADS="$BASE_WORKER_THREADS")
    fi
    # BENCH_UPSTREAM / BASE_UPSTREAM: TOML lines added to the [[upstream]] table of
    # tether / tether-base (such as 'protocol = "http1"'), to set one build against
    # itself configured otherwise.
    local extra=${BENCH_UPSTREAM:-}
    [[ -n ${5:-} ]] && extra=${BASE_UPSTREAM:-}
    if [[ -n $extra ]]; then
        awk -v extra="$extra" '{ print } /^\[\[upstream\]\]$/ { print extra }' \
            "$dir/tether.toml" >"$dir/tether.toml.new" && mv "$dir/tether.toml.new" "$dir/tether.toml"
    fi
    # tether merges every TETHER_* environment variable into its config (figment,
    # unknown keys are errors), so the bench's own TETHER_BIN/TETHER_LOG and any
    # stray overrides are kept out of its environment: the file is the whole config.
    local -a clean=(-u TETHER_BIN -u TETHER_BASE_BIN -u TETHER_LOG)
    local v
    for v in $(compgen -e); do
        if [[ $v == TETHER_* ]]; then clean+=(-u "$v"); fi
    done
    # Quiet logging so per-request log lines do not cost throughput.
    proxy_wrap "$1"
    start_bg "$dir/tether.log" "${WRAP[@]}" env "${clean[@]}" -u TOKIO_WORKER_THREADS "${threads[@]}" \
        RUST_LOG="${TETHER_LOG:-warn}" "${5:-$TETHER_BIN}" run --config "$dir/tether.toml"
    PROXY_PID=$BG_PID
    wait_port "$port" "$PROXY_PID" "$dir/tether.log"
    wait_port "$4" "$PROXY_PID" "$dir/tether.log"
}

start_floor() { # NAME PORT MODE  (benches/floor.rs: MODE hyper or raw)
    local port=$2 dir="$WORK/$1"
    mkdir -p "$dir"
    # The same runtime threads as tether (WORKER_THREADS), through tokio's variable.
    local -a threads=(-u TOKIO_WORKER_THREADS)
    if [[ -n ${WORKER_THREADS:-} && ${WORKER_THREADS:-} != 0 ]]; then
        threads=(TOKIO_WORKER_THREADS="$WORKER_THREADS")
    fi
    proxy_wrap "$1"
    start_bg "$dir/floor.log" "${WRAP[@]}" env "${threads[@]}" \
        "$FLOOR_BIN" "$3" "127.0.0.1:$port" "127.0.0.1:$UPSTREAM_PORT" "$POOL_SIZE"
    PROXY_PID=$BG_PID
    wait_port "$port" "$PROXY_PID" "$dir/floor.log"
}

# tether_counters ADMIN_PORT : one scrape of tether's /metrics for the upstream
# "bench", as "OPENS QUEUE_SUM QUEUE_COUNT": tether_upstream_connections_opened_total
# and tether_upstream_queue_wait_seconds (every request that took a socket through
# the pool, queued or not); "?" for what it lacks.
tether_counters() {
    curl -sS --max-time 5 "http://127.0.0.1:$1/metrics" 2>/dev/null |
        awk '!/upstream="bench"/ { next }
             /^tether_upstream_connections_opened_total\{/ { o = $NF }
             /^tether_upstream_queue_wait_seconds_sum\{/ { s = $NF }
             /^tether_upstream_queue_wait_seconds_count\{/ { c = $NF }
             END { print (o == "" ? "?" : o), (s == "" ? "?" : s), (c == "" ? "?" : c) }'
}

# tether_opens ADMIN_PORT : tether_upstream_connections_opened_total{upstream="bench"}
tether_opens() {
    local opens _
    read -r opens _ <<<"$(tether_counters "$1")"
    echo "$opens"
}

# queue_wait_ms BEFORE AFTER : the mean queue wait in ms between two
# tether_counters readings, or "-".
queue_wait_ms() {
    awk -v a="$1" -v b="$2" 'BEGIN {
        split(a, x, " "); split(b, y, " ")
        if (x[3] == "?" || y[3] == "?" || y[3] - x[3] <= 0) { print "-"; exit }
        printf "%.1f", (y[2] - x[2]) * 1000 / (y[3] - x[3]) }'
}

# resolve_tether : sets TETHER_BIN, building with cargo when it is not given.
resolve_tether() {
    if [[ -n ${TETHER_BIN:-} ]]; then
        [[ -x $TETHER_BIN ]] || die "TETHER_BIN=$TETHER_BIN is not executable"
    else
        log "building tether (cargo build --release)"
        (cd "$REPO_DIR" && cargo build --release) >&2
        TETHER_BIN="$REPO_DIR/target/release/tether"
    fi
}

# resolve_floor : sets FLOOR_BIN (the reference proxies), building it when not given.
resolve_floor() {
    if [[ -n ${FLOOR_BIN:-} ]]; then
        [[ -x $FLOOR_BIN ]] || die "FLOOR_BIN=$FLOOR_BIN is not executable"
    else
        log "building the reference proxies (cargo build --release --example floor)"
        (cd "$REPO_DIR" && cargo build --release --example floor) >&2
        FLOOR_BIN="$REPO_DIR/target/release/examples/floor"
    fi
}

# help_or_no_args "$@" : for a script that takes no arguments: --help prints the
# comment block at its top (up to `set -euo`), anything else is an error.
help_or_no_args() {
    case ${1:-} in
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) die "unknown argument $1 (try --help)" ;;
    esac
}

# split_targets ALLOWED... : TARGET_LIST from $TARGETS; dies on an empty list or a
# target not in ALLOWED.
split_targets() {
    read -r -a TARGET_LIST <<<"$TARGETS"
    ((${#TARGET_LIST[@]})) || die "no targets"
    local t
    for t in "${TARGET_LIST[@]}"; do
        [[ " $* " == *" $t "* ]] || die "unknown target $t"
    done
}

# version CMD... : the first line CMD prints about itself (stdout or stderr).
version() { "$@" 2>&1 | head -n 1 || true; }

# host_steal : "STEAL TOTAL", the host's CPU ticks so far from /proc/stat's cpu line:
# those the hypervisor gave to other guests (steal), and all of them.
host_steal() {
    awk '$1 == "cpu" { t = 0; for (i = 2; i <= 9; i++) t += $i; print $9, t; exit }' /proc/stat
}

# steal_since "STEAL TOTAL" : the percent of the host's CPU time stolen since then.
# On a shared VM this is the noise no ratio within a run can remove: a round run
# with a quarter of the CPUs stolen is not comparable with one run without.
steal_since() {
    local s0 t0 s1 t1
    read -r s0 t0 <<<"$1"
    read -r s1 t1 <<<"$(host_steal)"
    awk -v s=$((s1 - s0)) -v t=$((t1 - t0)) 'BEGIN { printf "%.1f", (t > 0 ? 100 * s / t : 0) }'
}
STEAL_AT_START=$(host_steal)

# host_line : a report's "- host:" line (CPUs, their model, the kernel), and the
# share of CPU time the hypervisor took while the script ran.
host_line() {
    # getconf, not nproc: nproc counts only the CPUs this (maybe pinned) script may use.
    echo "- host: $(getconf _NPROCESSORS_ONLN) CPUs ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)), $(uname -sr)"
    echo "- steal time while the script ran: $(steal_since "$STEAL_AT_START") % of the host's CPU time (/proc/stat; per run in the progress log)"
    pin_line
}

# counter_delta BEFORE AFTER : AFTER - BEFORE as an integer, "?" when either is not a
# number (a scrape that failed).
counter_delta() {
    if [[ $1 =~ ^[0-9.e+]+$ && $2 =~ ^[0-9.e+]+$ ]]; then
        awk -v a="$2" -v b="$1" 'BEGIN { printf "%d", a - b }'
    else
        echo "?"
    fi
}
