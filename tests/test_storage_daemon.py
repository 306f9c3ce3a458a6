"""`python -m flyfs.storage.server`: command line, identity kept across restarts, SIGTERM."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid

import pytest

from flyfs.cluster.mgmtd import Mgmtd
from flyfs.cluster.mgmtd_client import MgmtdClient
from flyfs.cluster.procs import free_port
from flyfs.storage.server import IDENTITY_FILE, main


def _spawn(args, log):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "flyfs.storage.server", *args], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


async def _wait_line(path, text, proc, timeout=60.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        with open(path) as f:
            for line in f:
                if text in line:
                    return line
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode}:\n{open(path).read()}")
        await asyncio.sleep(0.05)
    raise AssertionError(f"{text!r} not logged in {timeout}s:\n{open(path).read()}")


async def test_daemon_registers_keeps_its_identity_and_stops_on_sigterm(tmp_path):
    mgmtd = Mgmtd(f"memory://storage-daemon-{uuid.uuid4().hex}", "127.0.0.1:0", heartbeat_timeout=2.0)
    await mgmtd.start()
    mc = MgmtdClient(mgmtd.address)
    dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
    port = free_port()
    args = ["--mgmtd", mgmtd.address, "--data", ",".join(dirs), "--listen", f"127.0.0.1:{port}",
            "--log-level", "INFO"]
    log_path = tmp_path / "storage.log"
    procs = []
    try:
        with open(log_path, "ab") as log:
            p = _spawn(args, log)
        procs.append(p)
        line = await _wait_line(log_path, "storage listening on", p)
        assert f"127.0.0.1:{port}" in line
        ids = [json.load(open(os.path.join(d, IDENTITY_FILE))) for d in dirs]
        node_id = ids[0]["node_id"]
        assert ids[1]["node_id"] == node_id and ids[0]["target_id"] != ids[1]["target_id"]
        info = await mc.get_routing_info(force=True)
        assert info.nodes[node_id].address == f"127.0.0.1:{port}"
        assert {info.targets[i["target_id"]].data_path for i in ids} == set(dirs)
        p.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(p.wait, 30) == 0
        # Restarted: same node and target ids, nothing new registered.
        log_path = tmp_path / "storage-2.log"
        with open(log_path, "ab") as log:
            p = _spawn(args, log)
        procs.append(p)
        await _wait_line(log_path, f"node {node_id} targets", p)
        info = await mc.get_routing_info(force=True)
        assert sorted(info.targets) == sorted(i["target_id"] for i in ids)
        assert list(info.nodes) == [node_id]
        p.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(p.wait, 30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        await mc.close()
        await mgmtd.stop()


def test_command_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--mgmtd", "127.0.0.1:1"])            # no --data
    assert e.value.code == 2
    capsys.readouterr()
    assert main(["--mgmtd", "127.0.0.1:1", "--data", str(tmp_path / "x"), "--listen", "nonsense"]) == 1
    err = capsys.readouterr().err
    assert "flyfs storage:" in err and "nonsense" in err and err.count("\n") == 1
    # Data dirs that belong to two different nodes.
    for name, node in (("p", 1), ("q", 2)):
        os.makedirs(tmp_path / name)
        json.dump({"node_id": node, "target_id": node}, open(tmp_path / name / IDENTITY_FILE, "w"))
    assert main(["--mgmtd", "127.0.0.1:1", "--data", f"{tmp_path / 'p'},{tmp_path / 'q'}"]) == 1
    assert "different storage nodes" in capsys.readouterr().err
