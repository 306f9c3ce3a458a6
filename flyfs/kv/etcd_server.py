"""Start a local etcd server (for tests and single-machine clusters on etcd).

    with EtcdServer(data_dir) as etcd:
        engine = open_engine(etcd.url("myprefix"))
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

from .errors import EngineUnavailable


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EtcdServer:
    """One etcd process on 127.0.0.1 with its own data dir."""

    def __init__(self, data_dir: str | None = None, host: str = "127.0.0.1"):
        self.binary = shutil.which("etcd") or "/usr/bin/etcd"
        if not os.path.exists(self.binary):
            raise EngineUnavailable("etcd: binary not found; install the etcd-server package (make setup does)")
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="flyfs-etcd-")
        self.host = host
        self.port = free_port(host)
        self.peer_port = free_port(host)
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, prefix: str = "") -> str:
        return f"etcd://{self.endpoint}/{prefix}" if prefix else f"etcd://{self.endpoint}"

    def start(self, timeout: float = 30.0) -> "EtcdServer":
        os.makedirs(self.data_dir, exist_ok=True)
        client = f"http://{self.host}:{self.port}"
        peer = f"http://{self.host}:{self.peer_port}"
        self._log = open(os.path.join(self.data_dir, "etcd.log"), "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--name", "flyfs", "--data-dir", os.path.join(self.data_dir, "data"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"flyfs={peer}", "--log-level", "error",
             "--quota-backend-bytes", str(4 << 30)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "ETCD_UNSUPPORTED_ARCH": os.environ.get("ETCD_UNSUPPORTED_ARCH", "")})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EngineUnavailable(f"etcd exited with {self.proc.returncode}; see {self.data_dir}/etcd.log")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise EngineUnavailable(f"etcd did not start within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
