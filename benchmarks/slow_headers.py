"""Slow-header clients against a running service: how long the server keeps their connections.

    tlserve serve NAME --port 3000 &          # TLSERVE_HEADER_TIMEOUT_S sets the bound (default 10 s)
    PYTHONPATH=. .venv/bin/python benchmarks/slow_headers.py [--url http://127.0.0.1:3000]
        [--connections 1500] [--every 2] [--give-up 40]

Opens --connections connections, sends each the first lines of a request header and then one more
header line every --every seconds (each line restarts uvicorn's keep-alive timer, so only a bound on
the header phase ends them), and prints how many the server has closed (408 or plain close) as time
passes, then whether a normal request is still served. Raise `ulimit -n` above --connections.
"""
from __future__ import annotations

import argparse
import os
import selectors
import socket
import time
from urllib.parse import urlsplit

import httpx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--connections", type=int, default=1500)
    parser.add_argument("--every", type=float, default=2.0, help="seconds between a client's header lines")
    parser.add_argument("--give-up", type=float, default=40.0, help="stop watching after this many seconds")
    args = parser.parse_args()
    host, port = urlsplit(args.url).hostname, urlsplit(args.url).port or 80
    sel = selectors.DefaultSelector()
    started = time.monotonic()
    for _ in range(args.connections):
        sock = socket.create_connection((host, port))
        sock.sendall(f"GET /metadata HTTP/1.1\r\nHost: {host}\r\n".encode())
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
    opened = time.monotonic() - started
    print(f"{args.connections} connections opened in {opened:.1f} s; load average {os.getloadavg()[0]:.1f}")
    closed, status, last_line, next_report = 0, {}, time.monotonic(), 1.0
    while closed < args.connections and time.monotonic() - started < args.give_up:
        for key, _ in sel.select(timeout=0.2):
            try:
                data = key.fileobj.recv(4096)
            except OSError:
                data = b""
            code = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "closed"
            status[code] = status.get(code, 0) + 1
            sel.unregister(key.fileobj)
            key.fileobj.close()
            closed += 1
        if time.monotonic() - last_line >= args.every:
            last_line = time.monotonic()
            for key in list(sel.get_map().values()):
                try:
                    key.fileobj.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    pass
        elapsed = time.monotonic() - started
        if elapsed >= next_report:
            print(f"{elapsed:5.1f} s: {closed} of {args.connections} closed {status}")
            next_report += 1.0
    left = args.connections - closed
    print(f"done at {time.monotonic() - started:.1f} s: {closed} closed {status}, {left} still open")
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    print(f"a normal request afterwards: {httpx.get(f'{args.url}/metadata', timeout=30).status_code}")


if __name__ == "__main__":
    main()
