#!/usr/bin/env python3
"""A loopback TCP relay that delays every chunk by a fixed time in each direction.

The kernel here has no netem, so scripts/bench.sh puts this relay in front of fsd and sshd to give
the metadata workloads a round-trip time like a LAN's.  Each chunk read from one side is written to
the other side DELAY_MS after it arrived; chunks stay in order and later chunks are not held back
by earlier ones (a pipe with latency, not a slow link).

  relay.py --listen-port 0 --upstream-port PORT --delay-ms 5 --port-file F

Prints `relay listening on 127.0.0.1:PORT` (and writes PORT to --port-file) once it accepts.
On SIGUSR1 it writes `SEQ UP_CHUNKS UP_BYTES DOWN_CHUNKS DOWN_BYTES` to --stats-file (SEQ counts
the dumps): the chunks sent client->server during a serial metadata workload are about its round
trips, which is how the benchmark counts round trips per workload.
Bounds: loopback only (it refuses any other upstream), at most --max-conns connections, an upstream
connect timeout, a bounded queue per direction (backpressure instead of buffering without end), and
it exits by itself when its parent process goes away or after --max-seconds.
"""
import argparse
import asyncio
import os
import signal
import socket
import sys
import time

CHUNK = 256 * 1024  # bytes read at once; a TLS record is at most ~16 KiB, so this rarely splits anything
QUEUE_CHUNKS = 256  # chunks in flight per direction: up to 64 MiB, enough to never starve a 1 MiB request
CONNECT_TIMEOUT_S = 10
# chunks and bytes relayed, client->server ("up") and back ("down"); one event loop, no lock needed
STATS = {"up_chunks": 0, "up_bytes": 0, "down_chunks": 0, "down_bytes": 0}


def nodelay(writer):
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def pump(reader, writer, delay, way):
    """Copy reader -> writer, each chunk delivered `delay` seconds after it was read."""
    q = asyncio.Queue(QUEUE_CHUNKS)

    async def read_side():
        try:
            while True:
                data = await reader.read(CHUNK)
                if data:
                    STATS[way + "_chunks"] += 1
                    STATS[way + "_bytes"] += len(data)
                await q.put((time.monotonic() + delay, data))
                if not data:
                    return
        except (ConnectionError, OSError):
            await q.put((time.monotonic() + delay, b""))

    rt = asyncio.ensure_future(read_side())
    try:
        while True:
            due, data = await q.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        rt.cancel()


async def handle(creader, cwriter, args, sem):
    if sem.locked():
        cwriter.close()
        return
    async with sem:
        try:
            ureader, uwriter = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", args.upstream_port), CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError) as e:
            print("relay: upstream connect failed: %s" % e, file=sys.stderr)
            cwriter.close()
            return
        nodelay(cwriter)
        nodelay(uwriter)
        delay = args.delay_ms / 1000.0
        try:
            await asyncio.gather(pump(creader, uwriter, delay, "up"), pump(ureader, cwriter, delay, "down"))
        finally:
            for w in (uwriter, cwriter):
                w.close()


async def watchdog(parent, deadline):
    while True:
        await asyncio.sleep(0.5)
        if os.getppid() != parent or time.monotonic() > deadline:
            return


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen-port", type=int, default=0)
    ap.add_argument("--upstream-port", type=int, required=True)
    ap.add_argument("--delay-ms", type=float, default=5.0)
    ap.add_argument("--max-conns", type=int, default=64)
    ap.add_argument("--max-seconds", type=float, default=4 * 3600)
    ap.add_argument("--port-file")
    ap.add_argument("--stats-file")
    args = ap.parse_args()
    if args.stats_file:
        seq = [0]

        def dump():
            seq[0] += 1
            with open(args.stats_file + ".tmp", "w") as f:
                f.write("%d %d %d %d %d\n" % (seq[0], STATS["up_chunks"], STATS["up_bytes"],
                                               STATS["down_chunks"], STATS["down_bytes"]))
            os.rename(args.stats_file + ".tmp", args.stats_file)
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump)
    parent = os.getppid()
    sem = asyncio.Semaphore(args.max_conns)
    server = await asyncio.start_server(lambda r, w: handle(r, w, args, sem), "127.0.0.1", args.listen_port)
    port = server.sockets[0].getsockname()[1]
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write("%d\n" % port)
        os.rename(args.port_file + ".tmp", args.port_file)
    print("relay listening on 127.0.0.1:%d -> 127.0.0.1:%d, %.1f ms each way" % (
        port, args.upstream_port, args.delay_ms), flush=True)
    async with server:
        await watchdog(parent, time.monotonic() + args.max_seconds)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
