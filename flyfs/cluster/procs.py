"""Child daemon processes for `flyfs up` and the test cluster fixtures.

A `Daemon` is one `python -m flyfs.cli ROLE ...` process with its own log file.
Children ask the kernel to SIGTERM them when their parent dies
(PR_SET_PDEATHSIG), so a `kill -9` of `flyfs up` or of a test runner never
leaves orphaned daemons holding ports, RocksDB directories or a mount.

The death signal is set by a tiny wrapper after exec, not by Popen's
preexec_fn: preexec_fn forces a plain fork() of a parent that may run live
gRPC threads (with GRPC_ENABLE_FORK_SUPPORT its fork handlers can abort the
child before exec), while without it Popen uses vfork/posix_spawn, which
runs no fork handlers. The setting survives exec; if the parent already died
before it was set, the wrapper exits.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1

_WRAPPER = ("import ctypes, os, signal, sys; "
            "ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM); "
            "os.getppid() != int(os.environ.pop('FLYFS_PARENT_PID', os.getppid())) and sys.exit(1); "
            "os.execv(sys.executable, [sys.executable, '-m', 'flyfs.cli', *sys.argv[1:]])")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float, proc: "Daemon | None" = None) -> None:
    """Wait until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive:
            last = next((ln for ln in reversed(proc.log_tail(5).splitlines()) if ln.strip()), "")
            why = f": {last.strip()}" if last else ""
            raise RuntimeError(f"{proc.name} exited with {proc.returncode}{why} (log: {proc.log_path})")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


class Daemon:
    """One flyfs daemon process (`flyfs ROLE ARGS...`), restartable."""

    def __init__(self, name: str, args: list[str], log_path: str, env: dict | None = None):
        self.name = name
        self.args = args
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Daemon":
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        log = open(self.log_path, "ab")
        env = {**os.environ, **(self.env or {})}
        env.setdefault("PYTHONUNBUFFERED", "1")
        env["FLYFS_PARENT_PID"] = str(os.getpid())
        self.proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, *self.args],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        log.close()
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.alive:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`."""
        if not self.alive:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, n: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(f.readlines()[-n:]).decode(errors="replace")
        except OSError:
            return ""
