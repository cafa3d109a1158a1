#!/usr/bin/env python3
"""A TCP relay that adds a fixed one-way delay in each direction, for benchmarks.

This kernel has no netem, so scripts/bench puts this relay on the laptop-to-jump-host SSH
path to emulate a long link:

    ssh / mse-vpn ──▶ relay (LISTEN) ──[+DELAY each way]──▶ sshd (CONNECT)

Every chunk read from one side is stamped with `now + delay` and queued; a timer writes the
chunks whose time has come to the other side, in order. Reading never waits for writing, so
the delay does not serialise the stream: throughput is kept up to QUEUE_CAP bytes in flight
per direction (the relay's "bandwidth-delay product"), and the round trip seen by the SSH
layer (its channel windows, its keepalives) is 2 * DELAY longer. Half-close (EOF) is delayed
and forwarded like data.

    python3 delay_relay.py --listen 127.0.0.2:22 --connect 172.31.5.1:22 --delay-ms 20
"""

import argparse
import asyncio
import collections
import resource
import signal
import sys

# Bytes queued per direction before the relay stops reading from the sender. Large enough
# that the relay never limits a multi-Gbit/s stream at tens of milliseconds of delay.
QUEUE_CAP = 256 * 1024 * 1024
EOF = object()


class Direction:
    """One direction of one relayed connection: a timestamped queue towards `dst`."""

    def __init__(self, loop, delay):
        self.loop = loop
        self.delay = delay
        self.queue = collections.deque()  # (due time, bytes or EOF)
        self.queued = 0
        self.timer = None
        self.src = None  # transport we read from
        self.dst = None  # transport we write to
        self.src_paused = False
        self.dst_blocked = False
        self.closed = False

    def push(self, item):
        due = self.loop.time() + self.delay
        self.queue.append((due, item))
        if item is not EOF:
            self.queued += len(item)
            if self.queued > QUEUE_CAP and not self.src_paused and self.src is not None:
                self.src.pause_reading()
                self.src_paused = True
        if self.timer is None and not self.dst_blocked:
            self.timer = self.loop.call_at(due, self.flush)

    def flush(self):
        self.timer = None
        if self.dst is None or self.closed:
            return
        if self.dst.is_closing():
            # The receiver is gone: what was in flight towards it is lost, as on a real link.
            self.queue.clear()
            self.queued = 0
            return
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now and not self.dst_blocked:
            _, item = self.queue.popleft()
            if item is EOF:
                try:
                    self.dst.write_eof()
                except (OSError, RuntimeError, NotImplementedError):
                    self.dst.close()
                continue
            self.queued -= len(item)
            self.dst.write(item)
        if self.src_paused and self.queued <= QUEUE_CAP // 2 and self.src is not None:
            self.src.resume_reading()
            self.src_paused = False
        if self.queue and not self.dst_blocked:
            self.timer = self.loop.call_at(self.queue[0][0], self.flush)

    def blocked(self, yes):
        """The destination's write buffer filled up (yes) or drained (no)."""
        self.dst_blocked = yes
        if not yes and self.timer is None and self.queue:
            self.timer = self.loop.call_at(self.queue[0][0], self.flush)

    def close(self):
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Side(asyncio.Protocol):
    """One socket of a relayed pair. `out` carries what we read to the peer; `back` carries
    what the peer sent to us (we are its destination)."""

    def __init__(self, out, back, on_lost):
        self.out = out
        self.back = back
        self.on_lost = on_lost
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=8 * 1024 * 1024)
        self.out.src = transport
        self.back.dst = transport
        if self.back.queue:
            self.back.flush()

    def data_received(self, data):
        self.out.push(data)

    def eof_received(self):
        self.out.push(EOF)
        return True  # keep our write side open (half-close)

    def pause_writing(self):
        self.back.blocked(True)

    def resume_writing(self):
        self.back.blocked(False)

    def connection_lost(self, exc):
        self.on_lost(self)


def relay_factory(loop, target_host, target_port, delay):
    """A protocol factory for the listening socket: each accepted client gets a connection
    to the target and two delayed directions between them."""

    def new_client():
        up = Direction(loop, delay)  # client -> server
        down = Direction(loop, delay)  # server -> client
        pair = {}

        def lost(side):
            # When one socket is gone, finish delivering what is queued towards the other
            # and then close it (after the delay, like a FIN/RST travelling the link).
            other = pair.get("server" if side is pair.get("client") else "client")

            def finish():
                if other is not None and other.transport is not None:
                    other.transport.close()
                up.close()
                down.close()

            loop.call_later(delay + 0.05, finish)

        client = Side(up, down, lost)
        pair["client"] = client

        async def connect():
            try:
                _, server = await loop.create_connection(
                    lambda: Side(down, up, lost), target_host, target_port
                )
                pair["server"] = server
            except OSError as e:
                print(f"delay_relay: connect to {target_host}:{target_port}: {e}", file=sys.stderr)
                if client.transport is not None:
                    client.transport.close()

        loop.create_task(connect())
        return client

    return new_client


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    ap.add_argument("--connect", required=True, help="HOST:PORT to relay to")
    ap.add_argument("--delay-ms", type=float, required=True, help="one-way delay, each direction")
    args = ap.parse_args()
    lhost, lport = args.listen.rsplit(":", 1)
    chost, cport = args.connect.rsplit(":", 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    factory = relay_factory(loop, chost, int(cport), args.delay_ms / 1000.0)
    server = await loop.create_server(factory, lhost, int(lport), reuse_address=True, backlog=1024)
    print(f"delay_relay: {args.listen} -> {args.connect}, +{args.delay_ms} ms each way", flush=True)
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    await stop
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
