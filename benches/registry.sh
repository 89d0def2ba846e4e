#!/usr/bin/env bash
# Registry-shaped benchmark over TLS: tether vs HAProxy vs nginx (issue 21).
#
# One nginx origin on loopback speaks TLS only (a CA and a certificate for
# registry.test and 127.0.0.1 are generated per run with openssl) and serves a
# container registry's traffic shape: /token (~1 KiB JSON), /v2/lib/manifests/latest
# (~4 KiB JSON), /v2/lib/blobs/1m and /v2/lib/blobs/16m. In front of it, clients
# speaking plain HTTP, each with a cap of POOL_SIZE upstream sockets and verifying
# the origin's certificate against the generated CA, SNI registry.test:
#   tether       route listener -> upstream with tls = true, ca_file, sni,
#                max_connections = max_idle = 16, idle_timeout 10m
#   haproxy-1t   nbthread 1, http-reuse always,
#                server ... ssl verify required ca-file sni maxconn 16
#   nginx-proxy  proxy_pass https://, upstream keepalive 16, proxy_ssl_verify,
#                proxy_ssl_session_reuse, 2 workers
# and `direct`: the clients over https straight at the origin (64 TLS connections to
# one nginx worker, so not a ceiling: the proxies' 16 pooled sockets can beat it).
#
# Load, per target and round, two runs of the same shape: 64 keep-alive connections,
# one request in flight on each, paths from a repeating pattern of 30 % token, 30 %
# manifest, 35 % 1 MiB and 5 % 16 MiB blobs (one request in 20):
#   wrk      `wrk -t2 -c64 -d${DURATION}s --timeout 60s --latency
#            -s benches/registry/registry.lua`:
#            throughput, latency over all requests
#   regload  benches/registry/regload.py, the same mix from a Python client that times
#            every request by class (p50/p99 and non-2xx per class). wrk cannot do it
#            cheaply: its Lua response() hook has no timing, and defining it makes wrk
#            copy every body into Lua, which halved the throughput it could drive.
# Targets alternate over ${ROUNDS} rounds, after one unrecorded wrk warm-up run each
# (pools filled, TLS sessions cached).
#
# Per run: requests/s, MiB/s, p50/p99, the peak of the target's established sockets
# to the origin (`ss`), tether's upstream-connections-opened counter, the proxy's CPU
# per request, and, from the origin's access log, the TLS connections the target
# opened and how many of them were full handshakes (not resumed sessions). A run
# ends with the client closing its 64 connections, mid-blob for some: each proxy
# then drops or drains those upstream exchanges, which the after-warm-up handshake
# counts show.
#
# After the rounds, a reconnect burst per proxy: 64 clients leave mid-16-MiB-blob
# (the proxy drops its busy upstream sockets), then 16 concurrent token requests make
# it open up to 16 sockets at once; the table gives how many of those TLS handshakes
# were full ones, i.e. how many sessions the proxy had cached for a mass reconnect.
#
# Usage:  benches/registry.sh [--targets "tether haproxy-1t ..."]
# Env:    TETHER_BIN      use this binary instead of `cargo build --release`
#         TETHER_BASE_BIN the binary of the tether-base target (another build of
#                         tether, to A/B two builds in one run; not in the default)
#         BASE_UPSTREAM   TOML lines added to tether-base's [[upstream]] table, to
#                         A/B one build against itself: with ORIGIN_H2=1,
#                         TETHER_BASE_BIN=$TETHER_BIN and
#                         BASE_UPSTREAM='protocol = "http1"', HTTP/2 to the origin
#                         against HTTP/1.1
#         BENCH_UPSTREAM  the same for the tether target
#         TARGETS         default "direct tether haproxy-1t nginx-proxy"
#         DURATION=8 ROUNDS=3 WARMUP=2 (seconds; 0 = no warm-up run)
#         THREADS=2 CONNECTIONS=64 POOL_SIZE=16
#         NGINX_PROXY_WORKERS=2 UPSTREAM_WORKERS=1 SAMPLE_INTERVAL=0.25
#         CLASS_RUNS=1    0: wrk runs only (no per-class latency)
#         ORIGIN_H2=0     1: the origin also speaks HTTP/2 (ALPN h2, as a registry
#                         served by Go's net/http does); tether's `protocol = "auto"`
#                         and HAProxy's `alpn h2,http/1.1` then multiplex requests
#                         over its sockets; nginx's proxy_pass has no HTTP/2 and
#                         stays on HTTP/1.1
#         BURST=1         0: skip the reconnect burst after the rounds
#         TIMEOUT=60s     wrk --timeout (latencies above it leave wrk's histogram)
#         SETTLE=1        seconds after each run before its origin-log lines are
#                         counted (exchanges the proxy finishes after wrk stopped)
#         WORKER_THREADS  runtime threads of tether (proxy.worker_threads)
#         PROXY_CPUS      pin each proxy to these CPUs (taskset list, e.g. 1) and the
#                         origin and load to LOAD_CPUS (default: the other CPUs)
#         PROXY_CPU_LIMIT each proxy in a CPU cgroup with this quota, in millicores
#                         (500: deploy/sidecar's limits.cpu); needs root
#         OUT_DIR         keep raw wrk output, the tsv files and the tables here
#         KEEP_TMP=1      keep the work directory (configs, certificates, logs)
# Output: markdown on stdout (paste into benches/RESULTS.md); progress on stderr.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=compare/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/compare/lib.sh"
# lib.sh's start_haproxy / start_nginx_proxy / start_tether render their templates
# from $TEMPLATES: this bench's own, which add TLS to the origin.
TEMPLATES="$BENCH_DIR/registry"
COMPARE_REPORT="$BENCH_DIR/compare/report.py"

TARGETS=${TARGETS:-"direct tether haproxy-1t nginx-proxy"}
while (($#)); do
    case $1 in
    --targets) TARGETS=$2; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (try --help)" ;;
    esac
    shift
done
split_targets direct tether tether-base haproxy-1t nginx-proxy
has_target() { [[ " ${TARGET_LIST[*]} " == *" $1 "* ]]; }

DURATION=${DURATION:-8}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-2}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-64}
SAMPLE_INTERVAL=${SAMPLE_INTERVAL:-0.25}
SETTLE=${SETTLE:-1}
TIMEOUT=${TIMEOUT:-60s}
CLASS_RUNS=${CLASS_RUNS:-1}
BURST=${BURST:-1}
POOL_SIZE=${POOL_SIZE:-16}
CLIENT_IDLE_TIMEOUT=${CLIENT_IDLE_TIMEOUT:-10m}
MAX_CLIENTS=${MAX_CLIENTS:-4096}
SERVER_NAME=registry.test
ORIGIN_H2=${ORIGIN_H2:-0}
case $ORIGIN_H2 in
0) ORIGIN_LISTEN_H2="" HAPROXY_ALPN="" ;;
1) ORIGIN_LISTEN_H2=" http2" HAPROXY_ALPN=" alpn h2,http/1.1" ;;
*) die "ORIGIN_H2 is 0 or 1, not $ORIGIN_H2" ;;
esac
export POOL_SIZE CLIENT_IDLE_TIMEOUT MAX_CLIENTS SAMPLE_INTERVAL SERVER_NAME ORIGIN_LISTEN_H2 HAPROXY_ALPN

require_tools wrk haproxy nginx curl ss python3 envsubst getconf openssl
CLK_TCK=$(getconf CLK_TCK)
has_target tether && resolve_tether
if has_target tether-base; then
    [[ -x ${TETHER_BASE_BIN:-} ]] || die "the tether-base target needs TETHER_BASE_BIN, an executable"
fi

ulimit -n "$(ulimit -Hn)"
bench_init
log "work directory $WORK"

# --- the origin ---------------------------------------------------------------

# make_tls DIR : a CA (ca.pem) and a server certificate it signs for registry.test
# and 127.0.0.1 (server.pem, server.key), P-256 keys, valid for two days.
make_tls() {
    local dir=$1
    mkdir -p "$dir"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$dir/ca.key" -out "$dir/ca.pem" -days 2 -subj "/CN=tether bench CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" >"$dir/openssl.log" 2>&1 ||
        { cat "$dir/openssl.log" >&2; die "openssl: CA"; }
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$dir/server.key" -out "$dir/server.csr" -subj "/CN=$SERVER_NAME" \
        >>"$dir/openssl.log" 2>&1 || { cat "$dir/openssl.log" >&2; die "openssl: server key"; }
    printf '%s\n' "subjectAltName=DNS:$SERVER_NAME,IP:127.0.0.1" "basicConstraints=CA:FALSE" \
        "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >"$dir/server.ext"
    openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
        -CAcreateserial -days 2 -extfile "$dir/server.ext" -out "$dir/server.pem" \
        >>"$dir/openssl.log" 2>&1 || { cat "$dir/openssl.log" >&2; die "openssl: server certificate"; }
}

# make_content WWW : the registry's responses as static files.
make_content() {
    local www=$1
    mkdir -p "$www/v2/lib/manifests" "$www/v2/lib/blobs"
    python3 - "$www" <<'PY'
import base64, json, os, sys
www = sys.argv[1]
def pad(obj, size, key):
    # Grow one field until the JSON text is `size` bytes.
    obj[key] = ""
    obj[key] = "x" * (size - len(json.dumps(obj)))
    text = json.dumps(obj)
    assert len(text) == size, len(text)
    return text
token = {"token": base64.urlsafe_b64encode(os.urandom(600)).decode(), "expires_in": 300,
         "issued_at": "2026-12-01T00:00:00Z"}
open(f"{www}/token", "w").write(pad(token, 1024, "access_token"))
layers = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
           "digest": "sha256:" + os.urandom(32).hex(), "size": 1048576} for _ in range(12)]
manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": "sha256:" + os.urandom(32).hex(), "size": 1469},
            "layers": layers}
open(f"{www}/v2/lib/manifests/latest", "w").write(pad(manifest, 4096, "annotations"))
PY
    head -c 1048576 /dev/urandom >"$www/v2/lib/blobs/1m"
    head -c 16777216 /dev/urandom >"$www/v2/lib/blobs/16m"
}

# The paths and their sizes, checked through every target before the runs.
declare -A SIZE_OF=([/token]=1024 [/v2/lib/manifests/latest]=4096
    [/v2/lib/blobs/1m]=1048576 [/v2/lib/blobs/16m]=16777216)

# check_paths BASE_URL [CURL_ARG...] : every path answers 200 with its size.
check_paths() {
    local base=$1 path got
    shift
    for path in "${!SIZE_OF[@]}"; do
        got=$(curl -sS --max-time 10 "$@" -o /dev/null -w '%{http_code} %{size_download}' \
            "$base$path") || die "GET $base$path failed"
        [[ $got == "200 ${SIZE_OF[$path]}" ]] ||
            die "GET $base$path: expected '200 ${SIZE_OF[$path]}', got '$got'"
    done
}

# start_origin PORT : the TLS origin. Sets UPSTREAM_PORT, ORIGIN_LOG, CA_FILE.
start_origin() {
    local port=$1 dir="$WORK/origin"
    mkdir -p "$dir"
    make_tls "$dir/tls"
    make_content "$dir/www"
    chmod -R a+rX "$dir"
    export CA_FILE="$dir/tls/ca.pem"  # read by the proxy templates
    PREFIX=$dir WWW=$dir/www LISTEN_PORT=$port WORKERS=${UPSTREAM_WORKERS:-1} \
        RLIMIT=$(ulimit -n) WORKER_CONNECTIONS=${UPSTREAM_WORKER_CONNECTIONS:-4096} \
        render "$TEMPLATES/origin.conf.in" "$dir/nginx.conf"
    start_bg "$dir/stdout.log" nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf"
    export UPSTREAM_PORT=$port
    ORIGIN_LOG="$dir/access.log"
    wait_port "$port" "$BG_PID" "$dir/error.log"
    check_paths "https://$SERVER_NAME:$port" --cacert "$CA_FILE" \
        --resolve "$SERVER_NAME:$port:127.0.0.1"
}

# --- start everything -----------------------------------------------------
read -r P_UP P_TETHER P_TETHER_FWD P_TETHER_ADMIN P_TB P_TB_FWD P_TB_ADMIN P_H1 P_NGX <<<"$(free_ports 9)"
# ADMIN: the admin port of each tether target, whose opened-connections counter is read.
declare -A URL PID ADMIN
start_origin "$P_UP"
URL[direct]="https://127.0.0.1:$P_UP"
if has_target tether; then
    start_tether tether "$P_TETHER" "$P_TETHER_FWD" "$P_TETHER_ADMIN"
    URL[tether]="http://127.0.0.1:$P_TETHER" PID[tether]=$PROXY_PID ADMIN[tether]=$P_TETHER_ADMIN
fi
if has_target tether-base; then
    start_tether tether-base "$P_TB" "$P_TB_FWD" "$P_TB_ADMIN" "$TETHER_BASE_BIN"
    URL[tether-base]="http://127.0.0.1:$P_TB" PID[tether-base]=$PROXY_PID ADMIN[tether-base]=$P_TB_ADMIN
fi
if has_target haproxy-1t; then
    start_haproxy haproxy-1t "$P_H1" 1
    URL[haproxy-1t]="http://127.0.0.1:$P_H1" PID[haproxy-1t]=$PROXY_PID
fi
if has_target nginx-proxy; then
    start_nginx_proxy nginx-proxy "$P_NGX" "${NGINX_PROXY_WORKERS:-2}"
    URL[nginx-proxy]="http://127.0.0.1:$P_NGX" PID[nginx-proxy]=$PROXY_PID
fi
for t in "${TARGET_LIST[@]}"; do
    if [[ $t == direct ]]; then
        check_paths "${URL[$t]}" --cacert "$CA_FILE"
    else
        check_paths "${URL[$t]}"
    fi
done
log "origin :$P_UP (TLS); targets: $(for t in "${TARGET_LIST[@]}"; do printf '%s=%s ' "$t" "${URL[$t]}"; done)"

# --- one wrk run ----------------------------------------------------------

# origin_lines : lines in the origin's access log so far.
origin_lines() { wc -l <"$ORIGIN_LOG"; }

# tls_opens FROM TO : "NEW FULL" over access-log lines FROM+1..TO: the connections
# whose first request is logged there (TLS connections opened), and those of them
# whose session was not resumed (full handshakes).
tls_opens() {
    sed -n "$(($1 + 1)),$2p" "$ORIGIN_LOG" |
        awk '$2 == 1 { n++; if ($3 != "r") f++ } END { printf "%d %d\n", n, f }'
}

# wait_children PID N : wait (up to 10 s) until PID has N child processes.
wait_children() {
    local i
    for ((i = 0; i < 100; i++)); do
        (($(pgrep -c -P "$1" || true) >= $2)) && return 0
        sleep 0.1
    done
    log "warning: process $1 has fewer than $2 children after 10 s"
}

# run_load TOOL TARGET ROUND DURATION : one run of TOOL (wrk: throughput; regload:
# per-class latency) against TARGET. ROUND "warmup" is run but not recorded.
run_load() {
    local tool=$1 target=$2 round=$3 dur=$4
    local tag="$tool.$target.$round" url=${URL[$target]}
    local out="$WORK/$tag.txt" peakf="$WORK/peak.$tag" opens="-" queue="-" before="" after
    local lpid spid rc=0 pids ticks0="" ticks1 lines0 lines1 steal0
    steal0=$(host_steal)
    lines0=$(origin_lines)
    if [[ -n ${ADMIN[$target]:-} ]]; then before=$(tether_counters "${ADMIN[$target]}"); fi
    if [[ $target != direct ]]; then
        # shellcheck disable=SC2046
        ticks0=$(cpu_ticks $(proc_tree "${PID[$target]}"))
    fi
    if [[ $tool == wrk ]]; then
        # --timeout: wrk drops latencies above it from its histogram (default 2s, which
        # a queued 16 MiB blob can exceed).
        wrk -t"$THREADS" -c"$CONNECTIONS" -d"${dur}s" --timeout "$TIMEOUT" --latency \
            -s "$TEMPLATES/registry.lua" "$url" >"$out" 2>&1 &
    else
        python3 "$TEMPLATES/regload.py" "$url" "$dur" "$CONNECTIONS" "$THREADS" "$CA_FILE" \
            >"$out" 2>&1 &
    fi
    lpid=$!
    PIDS+=("$lpid")
    if [[ $target == direct ]]; then
        # The client's own sockets: regload.py's are in its worker processes, wait
        # for them to exist (THREADS of them).
        if [[ $tool == regload ]]; then wait_children "$lpid" "$THREADS"; fi
        pids=$(proc_tree "$lpid" | tr '\n' ' ')
    else
        pids=$(proc_tree "${PID[$target]}" | tr '\n' ' ')
    fi
    # shellcheck disable=SC2086
    peak_sampler "$peakf" "$P_UP" $pids &
    spid=$!
    PIDS+=("$spid")
    wait "$lpid" || rc=$?
    forget_pid "$lpid"
    ((rc == 0)) || { stop_tree "$spid"; cat "$out" >&2; die "$tool failed against $target ($url)"; }
    if [[ -n $ticks0 ]]; then
        # shellcheck disable=SC2046
        ticks1=$(cpu_ticks $(proc_tree "${PID[$target]}"))
    fi
    # Exchanges the proxy still finishes (or abandons) after the client left, and the
    # sockets it opens for them, belong to this run.
    sleep "$SETTLE"
    stop_tree "$spid"
    lines1=$(origin_lines)
    if [[ -n ${ADMIN[$target]:-} ]]; then
        after=$(tether_counters "${ADMIN[$target]}")
        opens=$(counter_delta "${before%% *}" "${after%% *}")
        queue=$(queue_wait_ms "$before" "$after")
    fi
    local new full
    read -r new full <<<"$(tls_opens "$lines0" "$lines1")"
    if [[ $round == warmup ]]; then
        log "warm-up $target: $new TLS connections opened at the origin, $full full handshakes"
        return 0
    fi
    local parsed peak cpu="-" rps p50 p99 mib requests
    if [[ $tool == wrk ]]; then
        parsed=$(python3 "$COMPARE_REPORT" parse "$out")
    else
        parsed=$(awk '$1 == "total" { sub(/^total\t/, ""); print }' "$out")
        [[ -n $parsed ]] || { cat "$out" >&2; die "no figures from regload.py ($target)"; }
        awk -v t="$target" -v r="$round" 'BEGIN { OFS = "\t" } $1 == "class" { $1 = t "\t" r; print }' \
            FS='\t' "$out" >>"$WORK/classes.tsv"
    fi
    peak=$(cat "$peakf")
    IFS=$'\t' read -r rps mib p50 p99 requests _ <<<"$parsed"
    if [[ -n $ticks0 ]] && ((requests > 0)); then
        cpu=$(awk -v t=$((ticks1 - ticks0)) -v hz="$CLK_TCK" -v n="$requests" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$tool" "$target" "$round" "$parsed" "$peak" \
        "$opens" "$cpu" "$new" "$full" "$queue" >>"$WORK/results.tsv"
    log "$(printf 'round %s %-7s %-12s %8s req/s  p50 %8s ms  p99 %8s ms  %8s MiB/s  peak upstream %3s  opens %s  queue %s ms  TLS new/full %s/%s  cpu %s us/req  steal %s%%' \
        "$round" "$tool" "$target" "$rps" "$p50" "$p99" "$mib" "$peak" "$opens" "$queue" "$new" "$full" "$cpu" "$(steal_since "$steal0")")"
}

# --- the runs ---------------------------------------------------------------
: >"$WORK/results.tsv"
: >"$WORK/classes.tsv"
if ((WARMUP > 0)); then
    for t in "${TARGET_LIST[@]}"; do
        log "warm-up $t (${WARMUP}s)"
        run_load wrk "$t" warmup "$WARMUP"
    done
fi
for ((r = 1; r <= ROUNDS; r++)); do
    for t in "${TARGET_LIST[@]}"; do
        run_load wrk "$t" "$r" "$DURATION"
        if ((CLASS_RUNS)); then run_load regload "$t" "$r" "$DURATION"; fi
    done
done

# --- reconnect burst ----------------------------------------------------------
# run_burst TARGET : every proxy's pool is full of sockets whose TLS sessions it could
# resume. Make it drop them all at once (64 clients leave mid-16-MiB-blob), then send
# 16 concurrent token requests: it opens up to POOL_SIZE sockets together. Counts
# the TLS connections opened for that burst and the full handshakes among them: what
# a proxy's session cache holds for a mass reconnect.
run_burst() {
    local target=$1 url=${URL[$1]} lines0 new full
    wrk -t1 -c"$CONNECTIONS" -d2s --timeout "$TIMEOUT" "$url/v2/lib/blobs/16m" \
        >"$WORK/burst-drop.$target.txt" 2>&1 || die "wrk failed against $target ($url)"
    sleep "$SETTLE"
    lines0=$(origin_lines)
    wrk -t1 -c"$POOL_SIZE" -d1s --timeout "$TIMEOUT" "$url/token" \
        >"$WORK/burst.$target.txt" 2>&1 || die "wrk failed against $target ($url)"
    sleep "$SETTLE"
    read -r new full <<<"$(tls_opens "$lines0" "$(origin_lines)")"
    printf '%s\t%s\t%s\n' "$target" "$new" "$full" >>"$WORK/burst.tsv"
    log "burst $target: $new TLS connections opened at the origin, $full full handshakes"
}
: >"$WORK/burst.tsv"
if ((BURST)); then
    for t in "${TARGET_LIST[@]}"; do
        [[ $t == direct ]] || run_burst "$t"
    done
fi

# --- the report -------------------------------------------------------------
{
    echo "### registry.sh — $(date -u +'%Y-%m-%d %H:%M UTC')"
    echo
    host_line
    warm=""
    ((WARMUP > 0)) && warm="; ${WARMUP}s unrecorded warm-up per target"
    echo "- load: per target and round, \`wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s --timeout $TIMEOUT --latency -s benches/registry/registry.lua\` (throughput)$( ((CLASS_RUNS)) && echo " then \`regload.py\` with $CONNECTIONS connections for ${DURATION}s (per-class latency)"); 30 % /token 1 KiB, 30 % manifest 4 KiB, 35 % 1 MiB blob, 5 % 16 MiB blob; $ROUNDS rounds alternating targets, median shown$warm"
    echo "- origin: nginx over TLS (HTTP/1.1, P-256 certificate from a per-run CA), $(version nginx -v | sed 's/^nginx version: //'), ${UPSTREAM_WORKERS:-1} worker(s), $(version openssl version), everything on 127.0.0.1"
    echo "- pool: $POOL_SIZE upstream connections per proxy (tether max_connections/max_idle, HAProxy server maxconn, nginx keepalive); every proxy verifies the certificate (CA file, SNI $SERVER_NAME)"
    has_target haproxy-1t && echo "- haproxy: $(version haproxy -v | sed 's/ - https.*//')"
    has_target nginx-proxy && echo "- nginx-proxy: ${NGINX_PROXY_WORKERS:-2} worker(s)"
    has_target tether && echo "- tether: $(version "$TETHER_BIN" --version), runtime threads ${WORKER_THREADS:-one per core}"
    echo "- TLS new / full: TLS connections the target opened at the origin per round (from the origin's access log, \`\$connection_requests\` = 1), and how many were full handshakes (\`\$ssl_session_reused\` not \`r\`); warm-up runs not counted"
    echo "- peak upstream sockets: established sockets to the origin owned by the target's processes, sampled every ${SAMPLE_INTERVAL}s (for direct: wrk's own)"
    echo "- queue wait ms/req: tether only, the mean time a request waited for an upstream socket in the run (\`tether_upstream_queue_wait_seconds\` sum over count); the other targets do not say"
    echo "- per-class latency: regload.py times each request from its write to the last byte of its body; non-2xx counted per class"
    echo
    python3 "$TEMPLATES/report.py" "$WORK/results.tsv" "$WORK/classes.tsv"
    if [[ -s $WORK/burst.tsv ]]; then
        echo "#### Reconnect burst: TLS connections opened for 16 concurrent requests after the pool was dropped"
        echo
        echo "| target | TLS new | full handshakes |"
        echo "|---|---:|---:|"
        awk -F'\t' '{ printf "| %s | %s | %s |\n", $1, $2, $3 }' "$WORK/burst.tsv"
        echo
    fi
} >"$WORK/report.md"
cat "$WORK/report.md"

if [[ -n ${OUT_DIR:-} ]]; then
    mkdir -p "$OUT_DIR"
    cp "$WORK"/*.txt "$WORK"/*.tsv "$WORK/report.md" "$OUT_DIR"/
    log "raw results in $OUT_DIR"
fi
