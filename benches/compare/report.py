#!/usr/bin/env python3
"""Helpers for benches/compare.sh.

    report.py parse WRK_OUTPUT
        one tab-separated line: rps  MiB/s  p50_ms  p99_ms  requests  errors
        (errors = socket errors + non-2xx/3xx responses)

    report.py table RESULTS_TSV SIZE TITLE
        markdown table of the medians over rounds for one file size, plus the
        tether/haproxy-best and tether/direct ratios (and, when measured, the
        reference proxies against haproxy-best and tether against floor-hyper).

RESULTS_TSV columns: size target round rps mibps p50_ms p99_ms requests errors
peak_upstream_sockets upstream_opens proxy_cpu_us_per_request
"""
import re
import statistics
import sys

TIME_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}
BYTE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"unparsable wrk time {text!r}")
    return float(m.group(1)) * TIME_UNITS[m.group(2)]


def parse(path):
    out = open(path, encoding="utf-8", errors="replace").read()

    def grab(pattern):
        m = re.search(pattern, out, re.M)
        if not m:
            sys.exit(f"report.py: {path}: no match for {pattern!r}:\n{out}")
        return m

    rps = float(grab(r"^Requests/sec:\s+([\d.]+)").group(1))
    t = grab(r"^Transfer/sec:\s+([\d.]+)(B|KB|MB|GB|TB)")
    mibps = float(t.group(1)) * BYTE_UNITS[t.group(2)] / 1024**2
    p50 = ms(grab(r"^\s+50%\s+(\S+)").group(1))
    p99 = ms(grab(r"^\s+99%\s+(\S+)").group(1))
    requests = int(grab(r"^\s+(\d+) requests in").group(1))
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    print(f"{rps:.2f}\t{mibps:.2f}\t{p50:.3f}\t{p99:.3f}\t{requests}\t{errors}")


def fmt(x, digits=2):
    return "n/a" if x is None else f"{x:,.{digits}f}"


def table(path, size, title):
    rows = {}
    order = []
    for line in open(path, encoding="utf-8"):
        f = line.rstrip("\n").split("\t")
        if f[0] != size:
            continue
        target = f[1]
        if target not in rows:
            rows[target] = []
            order.append(target)
        rows[target].append(f)

    med = {}
    print(f"#### {title}\n")
    print(
        "| target | req/s | p50 ms | p99 ms | MiB/s | peak upstream sockets | upstream opens/run "
        "| proxy CPU µs/req | errors | rounds |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for target in order:
        rs = rows[target]
        col = lambda i: statistics.median(float(r[i]) for r in rs)  # noqa: E731
        m = {"rps": col(3), "mibps": col(4), "p50": col(5), "p99": col(6)}
        cpus = [float(r[11]) for r in rs if len(r) > 11 and r[11] not in ("", "-")]
        m["cpu"] = statistics.median(cpus) if cpus else None
        med[target] = m
        errors = sum(int(r[8]) for r in rs)
        peak = max(int(r[9]) for r in rs)
        opens = [r[10] for r in rs]
        opens_txt = "/".join(opens) if any(o not in ("", "-") for o in opens) else "-"
        if target == "direct":
            peak_txt = f"{peak} (wrk)"
        else:
            peak_txt = str(peak)
        print(
            f"| {target} | {fmt(m['rps'], 0)} | {fmt(m['p50'], 3)} | {fmt(m['p99'], 3)} "
            f"| {fmt(m['mibps'], 1)} | {peak_txt} | {opens_txt} | {fmt(m['cpu'], 1)} | {errors} | {len(rs)} |"
        )

    def ratio(a, b, key):
        if a not in med or b not in med or not med[a][key] or not med[b][key]:
            return None
        return med[a][key] / med[b][key]

    hp = [t for t in order if t.startswith("haproxy")]
    best = max(hp, key=lambda t: med[t]["rps"]) if hp else None
    print()
    best_label = f"haproxy-best ({best})" if best else "haproxy-best"
    pairs = [("tether", best, best_label), ("tether", "direct", "direct")]
    # The reference proxies: where the stack alone stands, and what tether adds to it.
    pairs += [(f, best, best_label) for f in ("floor-hyper", "floor-proxy", "floor-raw") if f in med]
    pairs += [("tether", f, f) for f in ("floor-hyper", "floor-proxy") if f in med]
    for this, other, label in pairs:
        if this not in med or other is None or other not in med:
            print(f"- {this} / {label}: n/a (not measured)")
            continue
        print(
            f"- {this} / {label}: req/s {fmt(ratio(this, other, 'rps'))}×, "
            f"p50 {fmt(ratio(this, other, 'p50'))}×, p99 {fmt(ratio(this, other, 'p99'))}×, "
            f"MiB/s {fmt(ratio(this, other, 'mibps'))}×"
            + (f", CPU/req {fmt(ratio(this, other, 'cpu'))}×" if ratio(this, other, "cpu") else "")
        )
    print()


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "parse":
        parse(sys.argv[2])
    elif len(sys.argv) == 5 and sys.argv[1] == "table":
        table(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
