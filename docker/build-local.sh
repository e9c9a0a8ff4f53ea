#!/usr/bin/env bash
# Build the image where there is no Docker engine and no container registry (make image-test, CI):
#   1. base: Debian 12 minbase + Python 3.11 from the Debian mirror (debootstrap, 2-4 min), kept as a
#      tarball in $HPCNLP_CACHE so later builds on the same machine skip it;
#   2. wheelhouse: every wheel of requirements/lock.txt (torch: the local CPU wheel), so the image
#      build installs with --no-index and needs no network;
#   3. podman build of docker/Dockerfile against that base.
# Usage: docker/build-local.sh [image-name [podman build options]]   (default localhost/hpcnlp:test; root)
#   e.g. docker/build-local.sh localhost/hpcnlp:mine --build-arg MODEL_DIR=models/pydocs-mlm
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:-localhost/hpcnlp:test}
base=localhost/hpcnlp-base:bookworm-py311
cache=${HPCNLP_CACHE:-/var/cache/hpcnlp}
tarball=$cache/base-bookworm-py311.tar
# The Debian mirror this machine's apt already uses (the one "registry" reachable everywhere we build).
apt_sources=(/etc/apt/sources.list.d/*.sources /etc/apt/sources.list)
mirror=${DEBIAN_MIRROR:-$( (grep -shoE 'https?://[^ ]+/debian/?$' "${apt_sources[@]}" || true) | head -1)}
pip=${PIP:-.venv/bin/pip}
# The hash-checked locks the image installs (setuptools, for pyproject.toml, is in lock.txt).
locks=(requirements/lock.txt requirements/model.txt)

t0=$SECONDS
if ! podman image exists "$base"; then
  if [ ! -s "$tarball" ]; then
    echo "build-local: debootstrap bookworm from ${mirror:-deb.debian.org} (once per machine)"
    mkdir -p "$cache"
    rootfs=$(mktemp -d)
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
      bookworm "$rootfs" "${mirror:-http://deb.debian.org/debian}" > "$cache/debootstrap.log" 2>&1 \
      || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
  fi
  podman import --quiet "$tarball" "$base" > /dev/null
fi
echo "build-local: base $base ready ($((SECONDS - t0)) s)"

# The stamp records what the wheelhouse was made from: an unchanged lock skips pip altogether.
t0=$SECONDS
stamp=docker/wheelhouse/made-from.txt
if ! cat "${locks[@]}" | cmp -s - "$stamp"; then
  log=$(mktemp)
  "$pip" wheel --quiet --no-deps --require-hashes --wheel-dir docker/wheelhouse "${locks[@]/#/-r}" \
    > "$log" 2>&1 || { grep -v '^WARNING: Location' "$log" >&2; exit 1; }
  rm -f "$log"
  cat "${locks[@]}" > "$stamp"
fi
echo "build-local: wheelhouse docker/wheelhouse ($(ls docker/wheelhouse/*.whl | wc -l) wheels, $((SECONDS - t0)) s)"

# chroot isolation: podman's default runtime (crun) refuses this host's hybrid cgroups.
t0=$SECONDS
podman build --isolation=chroot --file docker/Dockerfile --tag "$image" \
  --build-arg BASE_IMAGE="$base" --build-arg WHEEL_DIR=docker/wheelhouse "${@:2}" .
echo "build-local: built $image in $((SECONDS - t0)) s, $(podman image inspect --format '{{.Size}}' "$image") bytes"
