#!/usr/bin/env python3
"""Per-class latency load of benches/registry.sh: the registry mix, timed by class.

    regload.py URL DURATION_S CONNECTIONS PROCESSES [CA_FILE]

wrk cannot time requests by class cheaply: its Lua response() hook gets no timing,
and defining it makes wrk copy every body into a Lua string, which on this bench cut
the throughput through the proxies by half or more (see benches/RESULTS.md). So
registry.sh measures throughput with wrk (registry.lua without response()) and the
per-class latency with this client, in separate runs of the same shape:

- CONNECTIONS keep-alive HTTP/1.1 connections (https:// for the direct target, the
  certificate checked against CA_FILE), spread over PROCESSES processes with one
  blocking thread per connection; one request in flight per connection.
- each connection cycles the 20-slot pattern of registry.lua (30 % token, 30 %
  manifest, 35 % 1 MiB, 5 % 16 MiB), starting at its own slot.
- a request is timed from just before its write to the last byte of its body
  (Content-Length framing; bodies are read into a reused buffer and dropped).
- at DURATION_S every connection is closed, mid-response if need be, as wrk does.

Prints tab-separated lines:
    total   REQ_PER_S  MIB_PER_S  P50_MS  P99_MS  COMPLETED  ERRORS
    class   NAME  COMPLETED  P50_MS  P99_MS  MAX_MS  NON_2XX
ERRORS counts non-2xx responses, connect/read failures and broken framing; a
connection that fails is reopened.
"""
import math
import multiprocessing
import socket
import ssl
import sys
import threading
import time
from urllib.parse import urlsplit

CLASSES = ["token", "manifest", "blob-1m", "blob-16m"]
PATHS = ["/token", "/v2/lib/manifests/latest", "/v2/lib/blobs/1m", "/v2/lib/blobs/16m"]
PATTERN = [{"T": 0, "M": 1, "B": 2, "X": 3}[c] for c in "TMBTMBTMBXTMBTMBTMBB"]
BUF = 256 * 1024


class Broken(Exception):
    pass


def connect(host, port, ctx, timeout):
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ctx is not None:
        sock = ctx.wrap_socket(sock, server_hostname="registry.test")
    return sock


def exchange(sock, request, buf, view):
    """Sends one request, reads its response; returns the status."""
    sock.sendall(request)
    got = 0
    while True:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise Broken("closed before the response head")
        got += n
        end = buf.find(b"\r\n\r\n", 0, got)
        if end >= 0:
            break
        if got == len(buf):
            raise Broken("response head too large")
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    length = None
    for line in head[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "transfer-encoding":
            raise Broken("chunked response (not handled)")
    if length is None:
        raise Broken("response without Content-Length")
    left = length - (got - end - 4)
    while left > 0:
        n = sock.recv_into(view, min(left, BUF))
        if n == 0:
            raise Broken("closed mid-body")
        left -= n
    if left < 0:
        raise Broken("more bytes than Content-Length")
    return status


def connection(index, host, port, hostport, ca_file, deadline, out):
    ctx = ssl.create_default_context(cafile=ca_file) if ca_file else None
    lat = [[] for _ in CLASSES]
    bad = [0] * len(CLASSES)
    errors = 0
    buf = bytearray(BUF)
    view = memoryview(buf)
    requests = [
        f"GET {p} HTTP/1.1\r\nHost: {hostport}\r\nUser-Agent: regload\r\n\r\n".encode()
        for p in PATHS
    ]
    slot = index * 7
    sock = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            if sock is None:
                sock = connect(host, port, ctx, left)
            sock.settimeout(left)
            cls = PATTERN[slot % len(PATTERN)]
            slot += 1
            t0 = time.perf_counter_ns()
            status = exchange(sock, requests[cls], buf, view)
            lat[cls].append((time.perf_counter_ns() - t0) / 1e6)
            if not 200 <= status <= 299:
                bad[cls] += 1
                errors += 1
        except (OSError, Broken, ValueError, IndexError):
            # A timeout at the deadline is the end of the run, not an error.
            if time.monotonic() < deadline:
                errors += 1
            if sock is not None:
                sock.close()
            sock = None
    if sock is not None:
        sock.close()
    out.append((lat, bad, errors))


def process(args):
    url, duration, first, count, ca_file, queue = args
    u = urlsplit(url)
    host, port = u.hostname, u.port or (443 if u.scheme == "https" else 80)
    deadline = time.monotonic() + duration
    out = []
    threads = [
        threading.Thread(
            target=connection,
            args=(first + i, host, port, u.netloc, ca_file if u.scheme == "https" else None,
                  deadline, out),
        )
        for i in range(count)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.put(out)


def percentile(sorted_values, p):
    if not sorted_values:
        return 0.0
    return sorted_values[max(0, math.ceil(p * len(sorted_values)) - 1)]


def main():
    if len(sys.argv) not in (5, 6):
        sys.exit(__doc__)
    url, duration = sys.argv[1], float(sys.argv[2])
    conns, procs = int(sys.argv[3]), int(sys.argv[4])
    ca_file = sys.argv[5] if len(sys.argv) == 6 else None
    queue = multiprocessing.Queue()
    per = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
    start = time.monotonic()
    workers = [
        multiprocessing.Process(target=process,
                                args=((url, duration, sum(per[:i]), per[i], ca_file, queue),))
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    results = [r for _ in workers for r in queue.get()]
    for w in workers:
        w.join()
    elapsed = max(time.monotonic() - start, duration)
    sizes = [1024, 4096, 1 << 20, 16 << 20]
    lat = [sorted(v for r in results for v in r[0][c]) for c in range(len(CLASSES))]
    bad = [sum(r[1][c] for r in results) for c in range(len(CLASSES))]
    errors = sum(r[2] for r in results)
    everything = sorted(v for values in lat for v in values)
    n = len(everything)
    mib = sum(len(lat[c]) * sizes[c] for c in range(len(CLASSES))) / 2**20
    print(f"total\t{n / duration:.2f}\t{mib / duration:.2f}\t{percentile(everything, 0.5):.3f}"
          f"\t{percentile(everything, 0.99):.3f}\t{n}\t{errors}")
    for c, name in enumerate(CLASSES):
        print(f"class\t{name}\t{len(lat[c])}\t{percentile(lat[c], 0.5):.3f}"
              f"\t{percentile(lat[c], 0.99):.3f}\t{percentile(lat[c], 1.0):.3f}\t{bad[c]}")
    if elapsed > duration + 30:
        print(f"regload: the run took {elapsed:.0f}s for {duration:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
