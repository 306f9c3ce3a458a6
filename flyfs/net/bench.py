"""Data-plane throughput against the raw-socket baseline.

    python -m flyfs.net.bench [--total-mib 2048] [--blocks 1,4] [--inflight 1,4,8]
                              [--loop uvloop,asyncio] [--server process|inline]

Read-style traffic: a server answers each request with `block` payload bytes,
which the client receives into its own `into` buffer (as a storage daemon
answering chunk reads). The baseline is `flyfs.bench.netbase.raw_socket_throughput`
measured in the same run.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import struct
import sys
import time

from .frame import Response
from .pool import ConnectionPool
from .tcp import serve

__all__ = ["transport_throughput", "compare_with_raw", "main"]

_READ = 1
_SIZE = struct.Struct("<Q")


def _pattern(n: int) -> bytes:
    return (bytes(range(251)) * (n // 251 + 1))[:n]


def _make_handler():
    blocks: dict[int, bytes] = {}

    async def handler(req):
        (n,) = _SIZE.unpack(req.header)
        data = blocks.get(n)
        if data is None:
            data = blocks[n] = _pattern(n)
        return Response(b"", [data])
    return handler


def _new_loop(kind: str):
    if kind == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


async def _serve_until_stdin_closes(loop_kind: str) -> None:
    """Child-process side: print the port, serve until the parent closes our stdin."""
    server = await serve(_make_handler(), "127.0.0.1", 0)
    print(server.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
    await server.close()


async def _start_server_process(loop_kind: str):
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flyfs.net.bench", "--serve", "--loop", loop_kind,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env)
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    if not line.strip().isdigit():
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"benchmark server process did not start (exit {proc.returncode})")
    return proc, int(line)


async def transport_throughput(total_bytes: int, block: int, inflight: int, *,
                               server: str = "process", server_loop: str = "uvloop",
                               timeout: float = 60.0) -> float:
    """Bytes per second of read-style calls, `inflight` requests in flight at once.

    server="process": the server runs in a child process on `server_loop`
    (the realistic setup: daemon and client are different processes);
    "inline": on the caller's own event loop. Every reply is checked for
    length and, once per worker, for content.
    """
    if total_bytes <= 0 or block <= 0 or inflight <= 0:
        raise ValueError("total_bytes, block and inflight must be positive")
    proc = srv = None
    if server == "process":
        proc, port = await _start_server_process(server_loop)
    elif server == "inline":
        srv = await serve(_make_handler(), "127.0.0.1", 0)
        port = srv.port
    else:
        raise ValueError(f"server must be 'process' or 'inline', not {server!r}")
    address = f"tcp://127.0.0.1:{port}"
    pool = ConnectionPool()
    try:
        header = _SIZE.pack(block)
        warm = bytearray(block)
        await pool.call(address, _READ, header, into=warm, timeout=timeout)
        calls = max(1, -(-total_bytes // block))
        counter = iter(range(calls))
        expected = _pattern(block)

        async def worker():
            buf = bytearray(block)
            done = 0
            for _ in counter:
                reply = await pool.call(address, _READ, header, into=buf, timeout=timeout)
                if reply.payload_len != block:
                    raise RuntimeError(f"short reply: {reply.payload_len} of {block} bytes")
                done += 1
            if done and buf != expected:
                raise RuntimeError("payload content mismatch")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        elapsed = time.perf_counter() - start
        return calls * block / elapsed
    finally:
        await pool.close()
        if srv is not None:
            await srv.close()
        if proc is not None:
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


def compare_with_raw(total_bytes: int, block: int, inflight: int, loop: str = "uvloop",
                     repeat: int = 3, server: str = "process") -> tuple[float, float, float]:
    """(transport B/s, raw-socket B/s, ratio), medians over `repeat` back-to-back pairs.

    Each transport run is paired with a raw run just before it, so load from
    other processes on a shared machine skews both sides of a ratio alike.
    """
    from flyfs.bench.netbase import raw_socket_throughput

    pairs = []
    for _ in range(repeat):
        raw = raw_socket_throughput(total_bytes, block)
        with asyncio.Runner(loop_factory=lambda: _new_loop(loop)) as runner:
            bps = runner.run(transport_throughput(total_bytes, block, inflight, server=server))
        pairs.append((bps, raw))
    return (statistics.median(b for b, _ in pairs), statistics.median(r for _, r in pairs),
            statistics.median(b / r for b, r in pairs))


def _sizes(text: str) -> list[int]:
    return [int(float(x) * (1 << 20)) for x in text.split(",") if x]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flyfs.net.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--total-mib", type=int, default=2048, help="bytes moved per measurement (MiB)")
    ap.add_argument("--blocks", default="1,4", help="block sizes in MiB, comma separated")
    ap.add_argument("--inflight", default="1,4,8", help="requests in flight, comma separated")
    ap.add_argument("--loop", default="uvloop,asyncio", help="client event loops to try")
    ap.add_argument("--server", default="process", choices=["process", "inline"])
    ap.add_argument("--repeat", type=int, default=3,
                    help="transport/raw pairs per figure; medians are shown")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:      # the server side of --server process
        kind = args.loop.split(",")[0]
        with asyncio.Runner(loop_factory=lambda: _new_loop(kind)) as runner:
            runner.run(_serve_until_stdin_closes(kind))
        return
    total = args.total_mib << 20
    print(f"loopback TCP, {args.total_mib} MiB per run, server={args.server}, "
          f"median of {args.repeat} transport/raw pairs")
    print(f"{'loop':8} {'block':>7} {'inflight':>8} {'GB/s':>7} {'raw GB/s':>9} {'ratio':>6}")
    for block in _sizes(args.blocks):
        for kind in args.loop.split(","):
            for inflight in (int(x) for x in args.inflight.split(",")):
                bps, raw, ratio = compare_with_raw(total, block, inflight, kind, args.repeat,
                                                   args.server)
                print(f"{kind:8} {block / (1 << 20):>5g}Mi {inflight:>8} {bps / 1e9:>7.2f} "
                      f"{raw / 1e9:>9.2f} {ratio:>6.0%}", flush=True)


if __name__ == "__main__":
    main()
