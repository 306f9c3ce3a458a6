"""The committed protobuf stubs must match what `make proto` generates from the .proto files."""
import importlib
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO = ROOT / "flyfs" / "proto"


def test_stubs_are_fresh(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), str(tmp_path)],
                   check=True, capture_output=True)
    generated = sorted(p.name for p in tmp_path.glob("*.py"))
    committed = sorted(p.name for p in PROTO.glob("*_pb2*.py"))
    assert generated == committed, "stubs missing or extra: run `make proto`"
    for name in generated:
        assert (tmp_path / name).read_text() == (PROTO / name).read_text(), \
            f"flyfs/proto/{name} is stale: run `make proto` and commit the result"


def test_every_proto_has_stubs_that_import():
    for proto in PROTO.glob("*.proto"):
        mod = importlib.import_module(f"flyfs.proto.{proto.stem}_pb2")
        assert mod.DESCRIPTOR.name == proto.name
