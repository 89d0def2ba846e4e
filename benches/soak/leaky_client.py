#!/usr/bin/env python3
"""A leaky client for benches/soak.sh: the Dragonfly manager's pattern, forever.

Every job opens a NEW connection, sends one `GET PATH HTTP/1.1`, reads the whole
response, and then keeps the connection open: the client never closes it. Only the
server side (tether's client_idle_timeout) makes it go away. Jobs start at a fixed
RATE per second, round-robin over the weighted --target list, whatever happens to
earlier jobs.

    python3 leaky_client.py --rate 50 --target 127.0.0.1:32402:2 --target 127.0.0.1:32612:1

SIGUSR1 prints one line

    status jobs=J ok=O failed=F open=N closed_by_server=C

(N: connections still open; C: connections the server closed after their response).
SIGTERM/SIGINT prints the final status, closes everything and exits 0. Failures are
summarised on stderr.
"""
import argparse
import asyncio
import collections
import itertools
import resource
import signal
import sys


class Counts:
    def __init__(self):
        self.jobs = self.ok = self.failed = self.open = self.closed_by_server = 0
        self.errors = collections.Counter()
        self.writers = set()

    def line(self):
        return (
            f"status jobs={self.jobs} ok={self.ok} failed={self.failed} "
            f"open={self.open} closed_by_server={self.closed_by_server}"
        )


async def read_response(reader, timeout):
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length is None:
        raise RuntimeError("response without Content-Length")
    await asyncio.wait_for(reader.readexactly(length), timeout)
    if status != 200:
        raise RuntimeError(f"status {status}")


async def job(host, port, path, timeout, counts):
    counts.jobs += 1
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        counts.writers.add(writer)
        counts.open += 1
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: tether-soak\r\n\r\n".encode())
        await writer.drain()
        await read_response(reader, timeout)
        counts.ok += 1
        # Leak it: wait for the server to close, never close it ourselves.
        await reader.read(1)
        counts.closed_by_server += 1
    except Exception as e:  # noqa: BLE001 - every failure is counted and reported
        counts.failed += 1
        counts.errors[f"{type(e).__name__}: {e}"[:120]] += 1
    finally:
        if writer is not None:
            counts.open -= 1
            counts.writers.discard(writer)
            writer.close()


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", action="append", required=True, help="HOST:PORT[:WEIGHT], repeatable")
    ap.add_argument("--rate", type=float, default=50.0, help="jobs started per second")
    ap.add_argument("--path", default="/1k")
    ap.add_argument("--timeout", type=float, default=30.0, help="per connect / per response, seconds")
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    targets = []
    for t in args.target:
        parts = t.split(":")
        weight = int(parts[2]) if len(parts) > 2 else 1
        targets += [(parts[0], int(parts[1]))] * weight

    counts = Counts()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: print(counts.line(), flush=True))
    tasks = set()
    start = loop.time()
    for n, (host, port) in enumerate(itertools.cycle(targets)):
        due = start + n / args.rate
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, due - loop.time()))
            break
        except asyncio.TimeoutError:
            pass
        task = asyncio.create_task(job(host, port, args.path, args.timeout, counts))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    print(counts.line(), flush=True)
    for err, n in counts.errors.most_common(10):
        print(f"failed x{n}: {err}", file=sys.stderr, flush=True)
    for w in list(counts.writers):
        w.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main())
