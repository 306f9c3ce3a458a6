"""Hardware baseline for data-plane benchmarks: plain blocking sockets on loopback.

`raw_socket_throughput` is what Python can move over 127.0.0.1 TCP (or, with
``unix=True``, a Unix socket: what same-host flyfs peers use, see
flyfs/net/tcp.py) with no framing at all (a sender thread doing sendall, the
receiver doing recv_into into one reusable buffer); transport benchmarks
report themselves against it.
"""
from __future__ import annotations

import socket
import threading
import time

__all__ = ["raw_socket_throughput"]


def raw_socket_throughput(total_bytes: int, block: int = 1 << 20, *, unix: bool = False) -> float:
    """Bytes per second received over a loopback TCP connection (a Unix socket with
    `unix`), blocks of `block` bytes."""
    if total_bytes <= 0 or block <= 0:
        raise ValueError("total_bytes and block must be positive")
    listener = socket.socket(socket.AF_UNIX if unix else socket.AF_INET, socket.SOCK_STREAM)
    errors: list[BaseException] = []
    try:
        addr = f"\0flyfs-raw-{id(listener)}-{time.monotonic_ns()}" if unix else ("127.0.0.1", 0)
        listener.bind(addr)
        listener.listen(1)
        addr = listener.getsockname() if not unix else addr

        def connect() -> socket.socket:
            if unix:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(addr)
                return s
            s = socket.create_connection(addr)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s

        def send() -> None:
            data = memoryview(bytes(block))
            try:
                with connect() as s:
                    left = total_bytes
                    while left > 0:
                        n = min(block, left)
                        s.sendall(data[:n])
                        left -= n
            except BaseException as exc:  # reported by the receiving side
                errors.append(exc)

        sender = threading.Thread(target=send, name="raw-socket-sender", daemon=True)
        start = time.perf_counter()
        sender.start()
        conn, _ = listener.accept()
        with conn:
            buf = memoryview(bytearray(block))
            got = 0
            while got < total_bytes:
                n = conn.recv_into(buf)
                if not n:
                    break
                got += n
            elapsed = time.perf_counter() - start
        sender.join()
    finally:
        listener.close()
    if errors:
        raise RuntimeError(f"raw socket sender failed: {errors[0]!r}")
    if got != total_bytes:
        raise RuntimeError(f"raw socket baseline received {got} of {total_bytes} bytes")
    return got / elapsed
