"""Shared fixtures: a real etcd server for the session, and KV engines of every kind."""
import itertools
import os

import pytest

from flyfs.kv import open_engine
from flyfs.kv.etcd_server import EtcdServer

ENGINES = ["memory", "rocksdb", "etcd"]
_counter = itertools.count()


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    """One etcd process for the whole test session (never skipped: CI installs etcd-server)."""
    server = EtcdServer(str(tmp_path_factory.mktemp("etcd"))).start()
    yield server
    server.stop()


@pytest.fixture
def engine_url(request, tmp_path):
    """A fresh, empty namespace URL for the engine named by the test's `kind` parameter."""
    kind = request.param if hasattr(request, "param") else "memory"
    if kind == "memory":
        return f"memory://t{os.getpid()}-{next(_counter)}"
    if kind == "rocksdb":
        return f"rocksdb://{tmp_path}/kv"
    etcd = request.getfixturevalue("etcd_server")
    return etcd.url(f"t{os.getpid()}-{next(_counter)}")


@pytest.fixture
async def engine(engine_url):
    e = open_engine(engine_url)
    yield e
    await e.close()


def pytest_generate_tests(metafunc):
    # Any test using `engine`/`engine_url` runs against every engine unless it parametrizes itself.
    if "engine_url" in metafunc.fixturenames and "engine_url" not in [
            m.args[0] for m in metafunc.definition.iter_markers("parametrize")]:
        metafunc.parametrize("engine_url", ENGINES, indirect=True)
