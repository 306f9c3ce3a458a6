#!/usr/bin/env python3
"""Generate the Python stubs for flyfs/proto/*.proto with grpcio-tools.

Usage: gen_proto.py [OUTDIR]   (default: flyfs/proto, next to the .proto files)

Imports between generated modules are rewritten to package-relative form so the
stubs live inside `flyfs.proto`. The output is deterministic, so a test can
regenerate into a temporary directory and compare with the committed files.
"""
import pathlib
import re
import sys

from grpc_tools import protoc
import grpc_tools

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "flyfs" / "proto"


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    protos = sorted(p.name for p in PROTO_DIR.glob("*.proto"))
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}",
            f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    names = [p[:-len(".proto")] for p in protos]
    written = []
    for name in names:
        for suffix in ("_pb2.py", "_pb2_grpc.py"):
            path = out_dir / f"{name}{suffix}"
            text = path.read_text()
            for other in names:
                text = re.sub(rf"^import {other}_pb2 as ", f"from . import {other}_pb2 as ",
                              text, flags=re.M)
            path.write_text(text)
            written.append(path)
    return written


if __name__ == "__main__":
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR
    for p in generate(out):
        print(p.relative_to(out) if out != PROTO_DIR else p.relative_to(ROOT))
