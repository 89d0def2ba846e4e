#!/usr/bin/env bash
# Soak: a leaky client against tether for DURATION seconds (issue 6).
#
# Two nginx origins stand in for a registry and its auth server, each behind a tether
# route listener. benches/soak/leaky_client.py starts RATE jobs per second; every job
# opens a new connection, makes one request and never closes it (the Dragonfly
# manager's pattern), so only tether's timers bound the sockets. Every INTERVAL
# seconds the script samples tether's RSS (VmRSS), its open fds, its gauges from
# /metrics and the kernel's view (ss) of the same sockets. Then it stops the client,
# checks the gauges against ss again, waits for the pools to be reaped and checks
# that everything is back to zero.
#
# With heaptrack installed, tether runs under it and the script also reports the
# heap in use (bytes malloc'd and not yet freed) at every sample. RSS alone cannot
# tell a leak from the allocator keeping freed pages (glibc's per-thread arenas make
# RSS creep for a while under churn); the heap in use can.
#
# Verdict: after WARMUP, memory and fds are flat (the last minute's mean is within
# noise of the first minute's; memory means the heap in use when measured, else
# RSS), every socket gauge equals ss at the end, and no job failed. Exit status 0
# when it holds, 1 when not.
#
# Usage:  benches/soak.sh > soak.md
# Env:    TETHER_BIN     use this binary instead of `cargo build --release`
#         DURATION=600   seconds of load          INTERVAL=10  seconds between samples
#         WARMUP=60      seconds before the flatness baseline
#         RATE=50        jobs (new connections) per second, 2/3 registry, 1/3 auth
#         CAP=4          tether's max_connections per upstream
#         CLIENT_IDLE=10 tether's client_idle_timeout, seconds
#         IDLE=15        tether's upstream idle_timeout, seconds
#         LIFETIME=60    max_lifetime, seconds   MAX_REQUESTS=500  per upstream socket
#         HEAP=auto      1: run tether under heaptrack (required), 0: never,
#                        auto: when heaptrack is installed (apt-get install heaptrack)
#         KEEP_TMP=1     keep the work directory (configs, logs, samples, heap profile)
# Output: markdown on stdout; progress on stderr. Needs nginx, curl, ss, python3,
#         envsubst (apt-get install nginx curl iproute2 python3 gettext-base).
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=compare/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/compare/lib.sh"

help_or_no_args "$@"

DURATION=${DURATION:-600}
INTERVAL=${INTERVAL:-10}
WARMUP=${WARMUP:-60}
RATE=${RATE:-50}
CAP=${CAP:-4}
CLIENT_IDLE=${CLIENT_IDLE:-10}
IDLE=${IDLE:-15}
LIFETIME=${LIFETIME:-60}
MAX_REQUESTS=${MAX_REQUESTS:-500}
HEAP=${HEAP:-auto}
if [[ $HEAP == auto ]]; then
    if command -v heaptrack >/dev/null && command -v heaptrack_print >/dev/null; then HEAP=1; else HEAP=0; fi
fi
if ((HEAP)); then
    command -v heaptrack_print >/dev/null || die "HEAP=1 needs heaptrack (apt-get install heaptrack)"
fi
((DURATION >= WARMUP + 120)) || die "DURATION must be at least WARMUP + 120 s to judge flatness"

for t in nginx curl ss python3 envsubst; do
    command -v "$t" >/dev/null 2>&1 ||
        die "missing $t (apt-get install nginx curl iproute2 python3 gettext-base)"
done
resolve_tether
bench_init
ulimit -n "$(ulimit -Hn)"

read -r P_REG P_AUTH P_ROUTE_REG P_ROUTE_AUTH P_PROXY P_ADMIN <<<"$(free_ports 6)"

# start_origin NAME PORT : an nginx origin serving /1k, keep-alive never closed by it.
start_origin() {
    local dir="$WORK/$1"
    mkdir -p "$dir/www"
    head -c 1024 /dev/urandom >"$dir/www/1k"
    chmod -R a+rX "$dir"
    PREFIX=$dir WWW=$dir/www LISTEN_PORT=$2 WORKERS=1 RLIMIT=$(ulimit -n) \
        WORKER_CONNECTIONS=4096 render "$TEMPLATES/nginx-upstream.conf.in" "$dir/nginx.conf"
    start_bg "$dir/stdout.log" nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf"
    wait_port "$2" "$BG_PID" "$dir/error.log"
    check_get "http://127.0.0.1:$2/1k" 1024
}
start_origin registry "$P_REG"
start_origin auth "$P_AUTH"

dir="$WORK/tether"
mkdir -p "$dir"
PROXY_PORT=$P_PROXY ADMIN_PORT=$P_ADMIN REGISTRY_PORT=$P_REG AUTH_PORT=$P_AUTH \
    REGISTRY_ROUTE_PORT=$P_ROUTE_REG AUTH_ROUTE_PORT=$P_ROUTE_AUTH CAP=$CAP \
    CLIENT_IDLE_TIMEOUT=${CLIENT_IDLE}s IDLE_TIMEOUT=${IDLE}s MAX_LIFETIME=${LIFETIME}s \
    MAX_REQUESTS=$MAX_REQUESTS render "$BENCH_DIR/soak/tether.toml.in" "$dir/tether.toml"
# tether reads TETHER_<SECTION>__<KEY> from its environment: keep every TETHER_*
# variable (this script's TETHER_BIN included) out of it, so the file is the config.
clean=()
for v in $(compgen -e); do
    if [[ $v == TETHER_* ]]; then clean+=(-u "$v"); fi
done
profiler=()
if ((HEAP)); then profiler=(heaptrack -o "$WORK/heap"); fi
start_bg "$dir/tether.log" env "${clean[@]}" RUST_LOG=warn "${profiler[@]}" "$TETHER_BIN" run --config "$dir/tether.toml"
TETHER_PID=$BG_PID
for p in "$P_ROUTE_REG" "$P_ROUTE_AUTH" "$P_ADMIN"; do
    wait_port "$p" "$BG_PID" "$dir/tether.log"
done
if ((HEAP)); then
    # heaptrack's script runs tether as its child: sample that process.
    HEAPTRACK_PID=$BG_PID
    TETHER_PID=$(pgrep -P "$HEAPTRACK_PID" -x tether) || die "no tether process under heaptrack"
    # When tether started, in seconds since boot (/proc/PID/stat field 22, in clock
    # ticks): the profile's clock starts there.
    tether_started=$(awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print $20 / hz }' "/proc/$TETHER_PID/stat")
fi
check_get "http://127.0.0.1:$P_ROUTE_REG/1k" 1024
check_get "http://127.0.0.1:$P_ROUTE_AUTH/1k" 1024

# --- sampling ----------------------------------------------------------------

# metric_sum TEXT NAME LABEL... : the sum of NAME's samples carrying every LABEL.
metric_sum() {
    local text=$1 name=$2
    shift 2
    awk -v name="$name" -v labels="$*" '
        BEGIN { n = split(labels, want, " ") }
        index($0, name "{") == 1 || $1 == name {
            ok = 1
            for (i = 1; i <= n; i++) if (index($0, want[i]) == 0) ok = 0
            if (ok) s += $NF
        }
        END { printf "%d", s }' <<<"$text"
}

# socks FILTER : TCP sockets tether holds a descriptor for, matching the ss FILTER, in
# any state but LISTEN: what its gauges count (a socket tether is closing is still
# its socket until the descriptor is gone; SYN-SENT is the gauges' "connecting").
socks() {
    # shellcheck disable=SC2086  # FILTER is deliberately split into ss words
    ss -Htnp state connected $1 2>/dev/null | { grep -c "pid=$TETHER_PID," || true; }
}

CLIENT_OUT="$WORK/client.out"
CLIENT_PID=
SAMPLES="$WORK/samples.tsv"
SAMPLE_TIMES="$WORK/sample_times.tsv"
: >"$SAMPLES"
: >"$SAMPLE_TIMES"

# sample LABEL : appends one tab-separated row to $SAMPLES:
# label rss_kb fds ds_gauge ds_ss reg_gauge reg_ss auth_gauge auth_ss opened closed jobs_ok jobs_failed
sample() {
    local m rss fds status ok failed ds_ss reg_ss auth_ss
    ok=- failed=-
    if [[ -n $CLIENT_PID ]] && alive "$CLIENT_PID"; then
        kill -USR1 "$CLIENT_PID"
        sleep 0.2
    fi
    status=$(grep '^status ' "$CLIENT_OUT" 2>/dev/null | tail -n 1 || true)
    if [[ -n $status ]]; then
        ok=$(sed -n 's/.* ok=\([0-9]*\).*/\1/p' <<<"$status")
        failed=$(sed -n 's/.* failed=\([0-9]*\).*/\1/p' <<<"$status")
    fi
    # The scrape and the three ss calls back to back: with 50 connections opened and
    # closed per second, every millisecond between them is noise.
    # Seconds since boot, the clock the heap profile is matched on.
    printf '%s\t%s\n' "$1" "$(cut -d' ' -f1 /proc/uptime)" >>"$SAMPLE_TIMES"
    m=$(curl -sS --max-time 5 "http://127.0.0.1:$P_ADMIN/metrics") || die "scraping /metrics failed"
    ds_ss=$(socks "( sport = :$P_ROUTE_REG or sport = :$P_ROUTE_AUTH )")
    reg_ss=$(socks "dst 127.0.0.1:$P_REG")
    auth_ss=$(socks "dst 127.0.0.1:$P_AUTH")
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$TETHER_PID/status")
    fds=$(find "/proc/$TETHER_PID/fd" -mindepth 1 -maxdepth 1 | wc -l)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$rss" "$fds" \
        "$(metric_sum "$m" tether_downstream_connections)" "$ds_ss" \
        "$(metric_sum "$m" tether_upstream_connections 'upstream="registry"')" "$reg_ss" \
        "$(metric_sum "$m" tether_upstream_connections 'upstream="auth"')" "$auth_ss" \
        "$(metric_sum "$m" tether_upstream_connections_opened_total)" \
        "$(metric_sum "$m" tether_upstream_connections_closed_total)" \
        "$ok" "$failed" >>"$SAMPLES"
    tail -n 1 "$SAMPLES" | awk -F'\t' '{ printf "[sample] %s: rss %.1f MiB, fds %s, clients %s/%s, registry %s/%s, auth %s/%s, jobs %s ok %s failed\n",
        $1, $2 / 1024, $3, $4, $5, $6, $7, $8, $9, $12, $13 }' >&2
}

sleep 1
sample idle
log "tether pid $TETHER_PID; $RATE jobs/s for ${DURATION}s, a sample every ${INTERVAL}s"
start_bg "$CLIENT_OUT" python3 "$BENCH_DIR/soak/leaky_client.py" --rate "$RATE" \
    --target "127.0.0.1:$P_ROUTE_REG:2" --target "127.0.0.1:$P_ROUTE_AUTH:1"
CLIENT_PID=$BG_PID
t0=$(date +%s)
for ((t = INTERVAL; t <= DURATION; t += INTERVAL)); do
    now=$(($(date +%s) - t0))
    ((t > now)) && sleep $((t - now))
    alive "$TETHER_PID" || die "tether exited; log: $(tail -n 20 "$dir/tether.log")"
    alive "$CLIENT_PID" || die "the client exited: $(cat "$CLIENT_OUT")"
    sample "$t"
done

log "stopping the client"
stop_tree "$CLIENT_PID"
CLIENT_PID=
sleep 2
sample "client stopped +2s"
log "waiting for idle_timeout (${IDLE}s) to reap the pools"
sleep $((IDLE + 3))
sample "client stopped +$((IDLE + 5))s"
grep '^failed ' "$CLIENT_OUT" >&2 || true

# Heap in use at every sample, from heaptrack's profile: stop tether (SIGTERM, so
# the profile is complete), turn it into massif snapshots, and take the last
# snapshot at or before each sample's time.
HEAP_AT="$WORK/heap_at.tsv"
: >"$HEAP_AT"
if ((HEAP)); then
    log "stopping tether and reading its heap profile"
    kill -TERM "$TETHER_PID"
    for ((i = 0; i < 600; i++)); do
        alive "$HEAPTRACK_PID" || break
        sleep 0.1
    done
    if alive "$HEAPTRACK_PID"; then die "heaptrack did not finish"; fi
    heaptrack_print "$WORK/heap.zst" -M "$WORK/massif.out" --massif-threshold 100 >"$WORK/heap.txt" 2>&1 ||
        die "heaptrack_print failed: $(tail -n 5 "$WORK/heap.txt")"
    awk -F'\t' -v start="$tether_started" '{ print $1 "\t" $2 - start }' "$SAMPLE_TIMES" >"$WORK/profile_times.tsv"
    awk -F'[=\t]' '
        FNR == NR { label[++n] = $1; at[n] = $2; next }
        /^time=/ { t = $2 }
        /^mem_heap_B=/ { while (i < n && at[i + 1] < t) { i++; heap[i] = last }; last = $2 }
        END { while (i < n) { i++; heap[i] = last }; for (k = 1; k <= n; k++) print label[k] "\t" heap[k] }
    ' "$WORK/profile_times.tsv" "$WORK/massif.out" >"$HEAP_AT"
    grep -E '^(peak heap memory consumption|total memory leaked)' "$WORK/heap.txt" >&2 || true
fi

# --- report ------------------------------------------------------------------

cat <<EOF
## tether soak: leaky client, ${DURATION} s

$(date -u +'%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, $("$TETHER_BIN" --version).
Load: $RATE jobs/s, each a new client connection that is never closed by the client
(2/3 to the registry route, 1/3 to the auth route, \`GET /1k\` from nginx).
tether: max_connections $CAP per upstream, client_idle_timeout ${CLIENT_IDLE}s,
idle_timeout ${IDLE}s, max_lifetime ${LIFETIME}s, max_requests_per_connection $MAX_REQUESTS.

"gauge" is tether's \`/metrics\`; "ss" is the kernel's count of the TCP sockets tether
holds a descriptor for (\`ss -tnp state connected\`; client side: on the route ports;
upstream: to each origin).

| t (s) | RSS (MiB) | heap in use (MiB) | fds | client conns gauge / ss | registry gauge / ss | auth gauge / ss | upstream opened / closed | jobs ok / failed |
|---|---|---|---|---|---|---|---|---|
EOF
# The heap column (empty without heaptrack) joined onto the samples as column 14.
awk -F'\t' -v OFS='\t' 'FNR == NR { heap[$1] = $2; next } { print $0, ($1 in heap ? heap[$1] : "") }' \
    "$HEAP_AT" "$SAMPLES" >"$WORK/rows.tsv"
awk -F'\t' '{ printf "| %s | %.1f | %s | %s | %s / %s | %s / %s | %s / %s | %s / %s | %s / %s |\n",
    $1, $2 / 1024, $14 == "" ? "-" : sprintf("%.2f", $14 / 1048576), $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13 }' "$WORK/rows.tsv"

# Flatness: the mean of the first minute after WARMUP against the last minute's.
verdict=$(awk -F'\t' -v warmup="$WARMUP" -v interval="$INTERVAL" -v rate="$RATE" -v heap_measured="$HEAP" '
    function flat(name, unit, scale, first, last, slope, abs_tol, rel_tol,   growth, tol, ok) {
        growth = last - first
        tol = abs_tol > rel_tol * first ? abs_tol : rel_tol * first
        ok = growth <= tol
        printf "- %s: %.1f %s in the first minute after warm-up, %.1f %s in the last (%+.1f; tolerance %.1f); trend %+.2f %s/min: %s\n",
            name, first / scale, unit, last / scale, unit, growth / scale, tol / scale, slope / scale, unit, ok ? "flat" : "GROWING"
        return ok
    }
    $1 ~ /^[0-9]+$/ && $1 >= warmup {
        n++; t[n] = $1; rss[n] = $2; fds[n] = $3; heap[n] = $14 / 1024
        live++; if ($4 == $5 && $6 == $7 && $8 == $9) agree++
        d = $4 - $5; if (d < 0) d = -d; if (d > ds_diff) ds_diff = d
        d = ($6 + $8) - ($7 + $9); if (d < 0) d = -d; if (d > up_diff) up_diff = d
        if ($13 != "-") failed = $13
    }
    $1 == "idle" { idle_fds = $3 }
    $1 ~ /^client stopped/ { end_row[++e] = $0; ds[e] = $4 " / " $5; up[e] = ($6 + $8) " / " ($7 + $9)
        end_ok = end_ok + ($4 == $5 && $6 == $7 && $8 == $9 ? 0 : 1); last_up = $6 + $8 + $7 + $9; last_ds = $4 + $5; last_fds = $3 }
    END {
        per = int(60 / interval); if (per < 1) per = 1
        for (i = 1; i <= per; i++) {
            r0 += rss[i]; f0 += fds[i]; h0 += heap[i]
            r1 += rss[n - per + i]; f1 += fds[n - per + i]; h1 += heap[n - per + i]
        }
        r0 /= per; r1 /= per; f0 /= per; f1 /= per; h0 /= per; h1 /= per
        # least-squares slope per minute
        for (i = 1; i <= n; i++) { mt += t[i]; mr += rss[i]; mf += fds[i]; mh += heap[i] }
        mt /= n; mr /= n; mf /= n; mh /= n
        for (i = 1; i <= n; i++) {
            sxx += (t[i] - mt) ^ 2; sr += (t[i] - mt) * (rss[i] - mr)
            sf += (t[i] - mt) * (fds[i] - mf); sh += (t[i] - mt) * (heap[i] - mh)
        }
        rss_ok = flat("RSS", "MiB", 1024, r0, r1, 60 * sr / sxx, 2048, 0.05)
        mem_ok = rss_ok
        if (heap_measured) {
            mem_ok = flat("heap in use", "MiB", 1024, h0, h1, 60 * sh / sxx, 512, 0.02)
            if (!rss_ok && mem_ok) print "  (RSS rose while the heap in use stayed flat: the allocator keeping freed pages, not a leak)"
        }
        ok = flat("open fds", "", 1, f0, f1, 60 * sf / sxx, 16, 0.10) && mem_ok
        printf "- under load, gauges == ss in %d of %d samples; the largest gap was %d client and %d upstream sockets (a scrape and ss are not one atomic read, and about %d client sockets open and close per second)\n", agree, live, ds_diff, up_diff, rate
        printf "- after the client stopped: client conns %s, upstream %s (gauge / ss) at +2s; client conns %s, upstream %s after the reap\n", ds[1], up[1], ds[2], up[2]
        gauges_ok = end_ok == 0 && last_up == 0 && last_ds == 0
        printf "- gauges == ss at the end, and all back to zero: %s; open fds %d after the reap, %d before the load\n", gauges_ok ? "yes" : "NO", last_fds, idle_fds
        printf "- jobs failed: %s\n", failed == "" ? "?" : failed
        ok = ok && gauges_ok && failed == 0
        printf "\n**Verdict: %s**\n", ok ? "PASS — memory and fds flat after warm-up, gauges equal ss, everything reaped" : "FAIL"
        exit ok ? 0 : 1
    }' "$WORK/rows.tsv") && pass=1 || pass=0
printf '\n%s\n' "$verdict"
((pass))
