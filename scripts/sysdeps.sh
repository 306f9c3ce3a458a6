#!/usr/bin/env bash
# Install the system packages flyfs needs, by name, only when missing.
# fuse3 gives fusermount3; libfuse-dev builds fuse-python; etcd-server is the distributed KV engine.
# Never install the `fuse` package: on Debian it removes fuse3.
set -euo pipefail
need=()
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
dpkg -s libfuse-dev >/dev/null 2>&1 || need+=(libfuse-dev)
command -v rsync >/dev/null 2>&1 || need+=(rsync)   # the FUSE tests run rsync on the mount
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing system packages: ${need[*]}"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
