"""Ordinary tools on the FUSE mount: cp -a, tar, rsync -a, git clone, sqlite3,
python -m venv. Each result is compared with the same work on a local directory."""
from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import uuid

import pytest

from test_client_cluster import fly  # noqa: F401 (fixture)
from test_fuse_mount import Mount, pytestmark  # noqa: F401 (skip rule)


@pytest.fixture(scope="module")
def mnt(fly, tmp_path_factory):
    m = Mount(fly, tmp_path_factory.mktemp("fusetools")).start()
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def d(mnt):
    p = mnt.p("tools-" + uuid.uuid4().hex[:8])
    os.mkdir(p)
    return p


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A local tree: nested dirs, files of many sizes, modes, a symlink, a hard link, old mtimes."""
    root = tmp_path_factory.mktemp("src") / "tree"
    for i in range(4):
        sub = root / f"dir{i}" / "deeper"
        sub.mkdir(parents=True)
        for j in range(6):
            f = sub / f"file{j}.bin"
            f.write_bytes(os.urandom(j * 70_001 % 300_000 + j))
            os.chmod(f, 0o600 + j * 0o11)
            os.utime(f, ns=(1_500_000_000_000_000_000 + j, 1_500_000_000_000_000_000 + i * 1000 + j))
    (root / "empty").write_bytes(b"")
    (root / "exec.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "exec.sh", 0o755)
    os.symlink("dir0/deeper/file1.bin", root / "link")
    os.link(root / "dir1" / "deeper" / "file2.bin", root / "hardlink.bin")
    return str(root)


def snapshot(top: str, mtimes: bool = True) -> dict:
    """Everything cp -a / tar / rsync must keep, per relative path. Hard links are
    compared by inode number (libfuse 2 gives each path of a hard-linked file its own
    kernel inode, so a path's cached st_nlink may lag a new link by attr_timeout)."""
    out = {}
    for dirpath, dirs, files in os.walk(top):
        for name in sorted(dirs + files):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, top)
            st = os.lstat(p)
            entry = {"type": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode)}
            if stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    entry["data"] = f.read()
                if mtimes:
                    entry["mtime"] = int(st.st_mtime)
                entry["ino"] = st.st_ino
            out[rel] = entry
    groups: dict[int, list[str]] = {}
    for rel, entry in out.items():
        if "ino" in entry:
            groups.setdefault(entry.pop("ino"), []).append(rel)
    for paths in groups.values():
        for rel in paths:
            out[rel]["links"] = sorted(paths)
    return out


def run(cmd, cwd=None, timeout=300):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r.stdout


def test_cp_a(tree, d):
    run(["cp", "-a", tree, os.path.join(d, "copy")])
    assert snapshot(os.path.join(d, "copy")) == snapshot(tree)


def test_tar_extract_and_create(tree, d, tmp_path):
    archive = tmp_path / "t.tar"
    run(["tar", "cf", str(archive), "-C", os.path.dirname(tree), "tree"])
    run(["tar", "xf", str(archive), "-C", d])
    assert snapshot(os.path.join(d, "tree")) == snapshot(tree)
    back = tmp_path / "back.tar"                       # and reading it all back through the mount
    run(["tar", "cf", str(back), "-C", d, "tree"])
    out = tmp_path / "out"
    out.mkdir()
    run(["tar", "xf", str(back), "-C", str(out)])
    assert snapshot(str(out / "tree")) == snapshot(tree)


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed")
def test_rsync_a_and_nothing_left_to_do(tree, d):
    dst = os.path.join(d, "r") + "/"
    run(["rsync", "-aH", tree + "/", dst])
    assert snapshot(dst) == snapshot(tree)
    again = run(["rsync", "-aH", "--itemize-changes", tree + "/", dst])
    assert again.strip() == ""                          # sizes and mtimes came through exactly


@pytest.mark.slow
def test_git_clone_commit_fsck(d, tmp_path):
    src = tmp_path / "repo"
    src.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@x", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path)}

    def git(*args, cwd):
        r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, f"git {args}: {r.stderr[-2000:]}"
        return r.stdout

    git("init", "-q", "-b", "main", cwd=src)
    for i in range(5):
        (src / f"f{i}.txt").write_text(f"version {i}\n" * (i * 1000 + 1))
        git("add", ".", cwd=src)
        git("commit", "-q", "-m", f"c{i}", cwd=src)
    git("clone", "-q", str(src), os.path.join(d, "clone"), cwd=d)
    clone = os.path.join(d, "clone")
    git("fsck", "--full", cwd=clone)
    assert git("log", "--oneline", cwd=clone).count("\n") == 5
    assert git("status", "--porcelain", cwd=clone) == ""
    with open(os.path.join(clone, "new.txt"), "w") as f:
        f.write("made on flyfs\n")
    git("add", "new.txt", cwd=clone)
    git("commit", "-q", "-m", "on flyfs", cwd=clone)
    git("gc", "-q", cwd=clone)
    git("fsck", "--full", cwd=clone)
    assert git("show", "HEAD:new.txt", cwd=clone) == "made on flyfs\n"


def test_sqlite3(d):
    path = os.path.join(d, "db.sqlite")
    con = sqlite3.connect(path)
    con.execute("create table t (k integer primary key, v text)")
    for batch in range(5):
        with con:
            con.executemany("insert into t (v) values (?)", [(f"row {batch}-{i}" * 5,) for i in range(200)])
    con.close()
    con = sqlite3.connect(path)
    assert con.execute("pragma integrity_check").fetchone() == ("ok",)
    assert con.execute("select count(*) from t").fetchone() == (1000,)
    assert con.execute("select v from t where k = 777").fetchone() == ("row 3-176" * 5,)
    with con:
        con.execute("delete from t where k % 2 = 0")
    con.execute("vacuum")
    assert con.execute("select count(*) from t").fetchone() == (500,)
    con.close()


def test_python_venv(d):
    venv = os.path.join(d, "venv")
    run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=600)
    out = run([os.path.join(venv, "bin", "python"), "-c", "import sys; print(sys.prefix)"])
    assert out.strip() == venv


@pytest.mark.slow
def test_python_venv_with_pip(d):
    venv = os.path.join(d, "venv")
    run([sys.executable, "-m", "venv", venv], timeout=600)       # ensurepip: ~1000 files
    out = run([os.path.join(venv, "bin", "python"), "-m", "pip", "--version"])
    assert venv in out


def test_bench_fs_smoke(fly, mnt, capsys):
    """`flyfs bench fs` runs end to end on tiny sizes and prints its table (figures are not checked)."""
    from flyfs.bench.fs import main
    assert main(["--cluster", fly.mgmtd_address, "--mount", mnt.path, "--size", "2MiB", "--files", "20",
                 "--reads", "20"]) == 0
    out = capsys.readouterr().out
    for row in ("seq write 1 MiB", "random read 4 KiB", "small files: create+write", "flyfs/local"):
        assert row in out
    assert "mount" in out and "api batch_read" in out
    assert not [n for n in os.listdir(mnt.path) if n.startswith("bench-")]     # cleaned up
