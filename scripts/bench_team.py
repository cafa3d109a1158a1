#!/usr/bin/env python3
"""Helpers for scripts/bench-team: one poller per laptop namespace, and the table.

    bench_team.py poll --ns NS... --go FIFO --limit SECONDS [--host H] [--port P]
        Opens each network namespace NS, then reads a start time (seconds since the epoch)
        from FIFO: the caller's write returns once the poller is ready, so its own startup
        (slow on a loaded machine) is not measured. From then on, for each NS, fetches
        http://H:P/index.html through whatever routes NS has (mse-vpn's TUN) every 100 ms
        until the page arrives, and prints a JSON object {NS: seconds after the start time,
        or null if not within SECONDS}. One process, one thread: each probe's socket is
        made inside its namespace (setns into it, socket(), setns back); asyncio then drives
        them all.

    bench_team.py table --results JSON [--targets]
        The table of scripts/bench-team from its results file.

Everything stays on this machine: the probes go to the VPC address through each laptop
namespace's own routes (mse-vpn's TUN there, or no route at all before `up`).
"""

import argparse
import asyncio
import ctypes
import json
import os
import socket
import sys
import time

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
PAGE = b"hello from the VPC"


def setns(fd):
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Namespaces:
    """Opens each namespace once; makes sockets inside any of them."""

    def __init__(self, names):
        self.home = os.open("/proc/self/ns/net", os.O_RDONLY)
        self.fds = {n: os.open(f"/var/run/netns/{n}", os.O_RDONLY) for n in names}

    def socket_in(self, name):
        setns(self.fds[name])
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            setns(self.home)
        s.setblocking(False)
        return s


async def fetch(loop, s, host, port, timeout):
    """GET /index.html on socket s; True if the page came back within timeout."""

    async def go():
        await loop.sock_connect(s, (host, port))
        await loop.sock_sendall(s, b"GET /index.html HTTP/1.0\r\nHost: vpc\r\n\r\n")
        got = b""
        while PAGE not in got:
            chunk = await loop.sock_recv(s, 4096)
            if not chunk:
                break
            got += chunk
        return PAGE in got

    try:
        return await asyncio.wait_for(go(), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    finally:
        s.close()


async def poll_one(loop, nss, name, host, port, since, deadline):
    while time.time() < deadline:
        s = nss.socket_in(name)
        # A probe whose SYN mse-vpn holds (no link up yet) waits for the link: give it
        # until the deadline, as an app would wait for its connect.
        if await fetch(loop, s, host, port, max(0.1, deadline - time.time())):
            return time.time() - since
        await asyncio.sleep(0.1)
    return None


async def poll(args):
    nss = Namespaces(args.ns)
    with open(args.go) as go:
        since = float(go.readline())
    loop = asyncio.get_running_loop()
    deadline = time.time() + args.limit
    tasks = [poll_one(loop, nss, n, args.host, args.port, since, deadline) for n in args.ns]
    results = await asyncio.gather(*tasks)
    return dict(zip(args.ns, results))


def fmt_s(v):
    return "-" if v is None else f"{v:.1f} s"


def summary(times):
    """(all, half, reached) over a list of seconds-or-None."""
    reached = sorted(t for t in times if t is not None)
    if not times:
        return None, None, 0
    all_ = reached[-1] if len(reached) == len(times) else None
    half = reached[(len(times) + 1) // 2 - 1] if len(reached) >= (len(times) + 1) // 2 else None
    return all_, half, len(reached)


def table(args):
    with open(args.results) as f:
        r = json.load(f)
    n = r["laptops"]
    s_all, s_half, s_n = summary(list(r["start"].values()))
    live = list(r["restart"].values())
    r_all, r_half, r_n = summary(live)
    col = f"{n} laptops"
    rows = [
        ("all started at once: every laptop reaches the VPC after",
         f"{fmt_s(s_all)} (half after {fmt_s(s_half)})" + ("" if s_n == n else f"; {n - s_n} never within {r['limit']} s")),
        ("`up` that exited with an error", str(r["failed_up"])),
        (f"sshd killed with its sessions, back {r['down_s']:g} s later: every laptop reaches the VPC after",
         (f"{fmt_s(r_all)} (half after {fmt_s(r_half)})" + ("" if r_n == len(live) else f"; {len(live) - r_n} never within {r['limit']} s"))
         if live else "-"),
        ("connections sshd dropped (MaxStartups)", f"{r['drops_start']} at start, {r['drops_restart']} at the restart"),
    ]
    width = max(len(a) for a, _ in rows)
    print(f"| {'case':<{width}} | {col} |")
    print(f"|{'-' * (width + 2)}|{'-' * (len(col) + 2)}|")
    for a, b in rows:
        print(f"| {a:<{width}} | {b} |")
    if args.targets:
        checks = [
            ("0 failed `up`", r["failed_up"] == 0),
            ("start: all reach the VPC within 10 s", s_all is not None and s_all <= 10),
            ("restart: all within 5 s of sshd's return", r_all is not None and r_all <= 5),
            ("restart: half within 2 s", r_half is not None and r_half <= 2),
        ]
        print()
        for what, ok in checks:
            print(f"  target {what}: {'met' if ok else 'MISSED'}")
    # Targets missed are figures; a laptop that failed or never reached the VPC is a failure.
    return 1 if r["failed_up"] or s_n != n or r_n != len(live) else 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("poll")
    p.add_argument("--ns", nargs="+", required=True)
    p.add_argument("--go", required=True)
    p.add_argument("--limit", type=float, required=True)
    p.add_argument("--host", default="10.0.0.10")
    p.add_argument("--port", type=int, default=80)
    t = sub.add_parser("table")
    t.add_argument("--results", required=True)
    t.add_argument("--targets", action="store_true")
    args = ap.parse_args()
    if args.cmd == "poll":
        json.dump(asyncio.run(poll(args)), sys.stdout)
        print()
        return 0
    return table(args)


if __name__ == "__main__":
    sys.exit(main())
