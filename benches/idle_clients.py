#!/usr/bin/env python3
"""Open N idle HTTP/1.1 keep-alive connections and hold them (benches/idle.sh).

Each connection sends one `GET PATH HTTP/1.1`, reads the complete response
(Content-Length or chunked), and then stays open and silent. When every
connection has been attempted the script prints one line

    ready opened=N failed=F elapsed=S

and holds the connections until SIGTERM/SIGINT. SIGUSR1 prints

    status open=O closed_by_peer=C

(C counts connections the server side has closed since they went idle). On
SIGTERM it prints the final status, closes everything and exits 0.

    python3 benches/idle_clients.py --port 8080 -n 10000
"""
import argparse
import asyncio
import collections
import resource
import signal
import sys
import time


def say(*parts):
    print(*parts, flush=True)


async def read_response(reader, timeout):
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip().lower()
    if "content-length" in headers:
        await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), timeout)
    elif "chunked" in headers.get("transfer-encoding", ""):
        while True:
            size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout)
            size = int(size_line.split(b";")[0].strip(), 16)
            await asyncio.wait_for(reader.readexactly(size + 2), timeout)
            if size == 0:
                break
    else:
        raise RuntimeError("response without a length: cannot keep the connection")
    if status != 200:
        raise RuntimeError(f"status {status}")
    if "close" in headers.get("connection", ""):
        raise RuntimeError("server sent Connection: close")


async def open_one(args, request, sem, conns, failures):
    async with sem:
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(args.host, args.port), args.timeout
            )
            writer.write(request)
            await writer.drain()
            await read_response(reader, args.timeout)
            conns.append((reader, writer))
        except Exception as e:  # noqa: BLE001 - every failure is counted and reported
            failures[f"{type(e).__name__}: {e}"[:120]] += 1
            if writer is not None:
                writer.close()


def status(conns):
    closed = sum(1 for r, _ in conns if r.at_eof())
    return f"status open={len(conns) - closed} closed_by_peer={closed}"


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--connections", type=int, default=10000)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/1k")
    ap.add_argument("--concurrency", type=int, default=200, help="connections being set up at once")
    ap.add_argument("--timeout", type=float, default=30.0, help="per connect / per response, seconds")
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.connections + 64:
        print(f"warning: RLIMIT_NOFILE {hard} is below {args.connections} connections", file=sys.stderr)

    request = (
        f"GET {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
        "User-Agent: tether-idle-bench\r\nAccept: */*\r\n\r\n"
    ).encode()
    conns = []
    failures = collections.Counter()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: say(status(conns)))
    sem = asyncio.Semaphore(args.concurrency)
    t0 = time.monotonic()
    await asyncio.gather(*(open_one(args, request, sem, conns, failures) for _ in range(args.connections)))
    for err, n in failures.most_common(10):
        print(f"failed x{n}: {err}", file=sys.stderr, flush=True)
    say(f"ready opened={len(conns)} failed={sum(failures.values())} elapsed={time.monotonic() - t0:.1f}")

    await stop.wait()
    say(status(conns))
    for _, w in conns:
        w.close()
    await asyncio.sleep(0)


if __name__ == "__main__":
    asyncio.run(main())
