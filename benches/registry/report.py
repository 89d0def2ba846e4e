#!/usr/bin/env python3
"""Tables of benches/registry.sh.

    report.py RESULTS_TSV CLASSES_TSV

RESULTS_TSV columns: tool target round rps mibps p50_ms p99_ms requests errors
peak_upstream_sockets upstream_opens proxy_cpu_us_per_request tls_new tls_full
queue_wait_ms (tool: wrk or regload; queue_wait_ms, tether's mean wait for a socket,
"-" for the other targets). CLASSES_TSV columns: target round class completed p50_ms
p99_ms max_ms non_2xx (regload.py's class lines, prefixed with target and round).

Prints markdown: the medians over rounds per target of the wrk runs, of the regload
runs with p50/p99 per request class, and tether's ratios against each peer and the
better one (the higher median wrk req/s of haproxy-1t and nginx-proxy).
"""
import statistics
import sys

CLASSES = ["token", "manifest", "blob-1m", "blob-16m"]
PEERS = ["haproxy-1t", "nginx-proxy"]


def fmt(x, digits=2):
    return "n/a" if x is None else f"{x:,.{digits}f}"


def read(path, tool=None):
    rows, order = {}, []
    for line in open(path, encoding="utf-8"):
        f = line.rstrip("\n").split("\t")
        if tool is not None:
            if f[0] != tool:
                continue
            f = f[1:]
        if f[0] not in rows:
            rows[f[0]] = []
            order.append(f[0])
        rows[f[0]].append(f)
    return rows, order


def median(values):
    values = [float(v) for v in values if v not in ("", "-", "?")]
    return statistics.median(values) if values else None


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    crows, _ = read(sys.argv[2])
    med = table(*read(sys.argv[1], "wrk"), "wrk runs: throughput", "wrk")
    lrows, lorder = read(sys.argv[1], "regload")
    lmed = table(lrows, lorder, "regload runs: the same mix, timed by class", "regload") if lorder else {}

    cmed = {}
    if lorder:
        print("Per request class, regload runs (ms; medians over rounds of each round's percentile):\n")
        print("| target | " + " | ".join(f"{c} p50 | {c} p99" for c in CLASSES) + " | non-2xx (token/manifest/1m/16m) |")
        print("|---|" + "---:|" * (2 * len(CLASSES)) + "---:|")
    for t in lorder:
        rs = crows.get(t, [])
        cmed[t] = {}
        cells, bad = [], []
        for c in CLASSES:
            cr = [r for r in rs if r[2] == c]
            bad.append(str(sum(int(r[7]) for r in cr)))
            p50, p99 = median(r[4] for r in cr), median(r[5] for r in cr)
            cmed[t][c] = (p50, p99)
            cells += [fmt(p50, 1), fmt(p99, 1)]
        print(f"| {t} | " + " | ".join(cells) + f" | {'/'.join(bad)} |")
    if lorder:
        print()

    peers = [p for p in PEERS if p in med]
    if "tether" not in med or not peers:
        print("- tether / peers: n/a (not measured)\n")
        return
    best = max(peers, key=lambda p: med[p]["rps"] or 0)
    for other, label in [(p, p) for p in peers] + [(best, f"better peer ({best})")]:
        line = (
            f"- tether / {label}: req/s {fmt(ratio(med['tether']['rps'], med[other]['rps']))}×, "
            f"MiB/s {fmt(ratio(med['tether']['mibps'], med[other]['mibps']))}×, "
            f"p99 {fmt(ratio(med['tether']['p99'], med[other]['p99']))}×"
        )
        if "tether" in cmed and other in cmed:
            line += (
                f"; regload req/s {fmt(ratio(lmed['tether']['rps'], lmed[other]['rps']))}×, p99 per class: "
                + ", ".join(f"{c} {fmt(ratio(cmed['tether'][c][1], cmed[other][c][1]))}×" for c in CLASSES)
            )
        full = lambda t: med[t]["full"] + (lmed[t]["full"] if t in lmed else 0)  # noqa: E731
        line += f"; full TLS handshakes after warm-up (all runs): {full('tether')} vs {full(other)}"
        print(line)
    if "tether-base" in med:
        line = (
            f"- tether / tether-base: req/s {fmt(ratio(med['tether']['rps'], med['tether-base']['rps']))}×, "
            f"CPU/req {fmt(ratio(med['tether']['cpu'], med['tether-base']['cpu']))}×"
        )
        if "tether-base" in lmed:
            line += f"; regload req/s {fmt(ratio(lmed['tether']['rps'], lmed['tether-base']['rps']))}×"
        print(line)
    if "direct" in med:
        print(
            f"- tether / direct: req/s {fmt(ratio(med['tether']['rps'], med['direct']['rps']))}×, "
            f"MiB/s {fmt(ratio(med['tether']['mibps'], med['direct']['mibps']))}×"
        )
    print()


def ratio(a, b):
    return None if a is None or not b else a / b


def table(rows, order, title, tool):
    """Markdown table of the medians over rounds; returns them per target."""
    med = {}
    print(f"#### {title}\n")
    mib = "MiB/s" if tool == "wrk" else "body MiB/s"
    print(
        f"| target | req/s | {mib} | p50 ms | p99 ms | peak upstream sockets | upstream opens/run "
        "| TLS new/run | TLS full/run | queue wait ms/req | proxy CPU µs/req | errors | rounds |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in order:
        rs = rows[t]
        m = {k: median(r[i] for r in rs) for k, i in
             (("rps", 2), ("mibps", 3), ("p50", 4), ("p99", 5), ("cpu", 10), ("queue", 13))}
        m["full"] = sum(int(r[12]) for r in rs)
        med[t] = m
        peak = max(int(r[8]) for r in rs)
        opens = [r[9] for r in rs]
        opens_txt = "/".join(opens) if any(o not in ("", "-") for o in opens) else "-"
        client = "wrk" if tool == "wrk" else "regload"
        print(
            f"| {t} | {fmt(m['rps'], 0)} | {fmt(m['mibps'], 1)} | {fmt(m['p50'], 1)} "
            f"| {fmt(m['p99'], 1)} | {peak}{f' ({client})' if t == 'direct' else ''} | {opens_txt} "
            f"| {'/'.join(r[11] for r in rs)} | {'/'.join(r[12] for r in rs)} "
            f"| {fmt(m['queue'], 1) if m['queue'] is not None else '-'} | {fmt(m['cpu'], 1)} | {sum(int(r[7]) for r in rs)} | {len(rs)} |"
        )
    print()
    return med


if __name__ == "__main__":
    main()
