"""The `flyfs` command line.

Each command lives in the module that implements it, as `main(argv)`; this
file is only the table of commands, grouped by purpose.
"""
from __future__ import annotations

import importlib
import sys

# name -> (group, "module:function", one-line help)
COMMANDS = {
    "up": ("cluster", "flyfs.cluster.launcher:main", "start a whole replicated cluster (and mount) on this machine"),
    "mgmtd": ("cluster", "flyfs.cluster.mgmtd:main", "run a cluster manager"),
    "meta": ("cluster", "flyfs.metaserver.server:main", "run a metadata server"),
    "storage": ("cluster", "flyfs.storage.server:main", "run a storage daemon"),
    "mount": ("cluster", "flyfs.fuse.mount:main", "mount flyfs with FUSE"),
    "umount": ("cluster", "flyfs.fuse.mount:umount_main", "unmount a flyfs mount"),
    "status": ("inspect", "flyfs.cluster.status:main", "show nodes, targets and chains"),
    "stat": ("inspect", "flyfs.client.commands:stat_main", "show a file's attributes"),
    "set-layout": ("admin", "flyfs.client.commands:set_layout_main", "set a directory's chunk size and stripe"),
    "ls": ("tools", "flyfs.client.commands:ls_main", "list a directory"),
    "bench": ("tools", "flyfs.cli:bench_main", "run a benchmark: kv, storage, meta, fs, io, graysort, all"),
}

BENCHES = {
    "kv": "flyfs.bench.kv:main",
    "storage": "flyfs.bench.storage:main",
    "meta": "flyfs.bench.meta:main",
    "fs": "flyfs.bench.fs:main",
    "io": "flyfs.bench.io:main",
    "graysort": "flyfs.bench.graysort:main",
}


def _load(target: str):
    module, func = target.split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("flyfs"):
            raise SystemExit(f"flyfs: '{module}' is not available in this build ({e.name} missing)") from None
        raise
    return getattr(mod, func)


def usage() -> str:
    lines = ["usage: flyfs COMMAND [ARGS...]", ""]
    for group in ("cluster", "inspect", "admin", "tools"):
        cmds = [(n, h) for n, (g, _, h) in COMMANDS.items() if g == group]
        if cmds:
            lines.append(f"{group}:")
            lines += [f"  {n:<10} {h}" for n, h in cmds]
    lines += ["", "example: flyfs up --data-dir .flyfs --mount ./mnt",
              "run 'flyfs COMMAND --help' for a command's options"]
    return "\n".join(lines)


def bench_main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: flyfs bench {" + ",".join([*BENCHES, "all"]) + "} [ARGS...]\n"
              "example: flyfs bench kv --quick")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "all":
        quick = ["--quick"] if "--quick" in rest else []
        rc = 0
        for bench in BENCHES:
            try:
                rc |= _load(BENCHES[bench])(quick) or 0
            except SystemExit as e:
                print(f"bench {bench}: {e}")
            except Exception as e:  # one broken benchmark must not hide the others
                print(f"bench {bench}: failed: {type(e).__name__}: {e}")
                rc = 1
        return rc
    if name not in BENCHES:
        print(f"flyfs bench: unknown benchmark {name!r}; choose from {', '.join(BENCHES)}, all", file=sys.stderr)
        return 2
    return _load(BENCHES[name])(rest) or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"flyfs: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return _load(COMMANDS[name][1])(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
