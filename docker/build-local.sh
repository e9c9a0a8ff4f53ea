#!/usr/bin/env bash
# Build the image where there is no Docker engine and no container registry (make image-test, CI):
#   1. base: Debian 12 minbase + Python 3.11 from the Debian mirror (debootstrap, 2-4 min), kept as a
#      tarball in $HPCNLP_CACHE so later builds on the same machine skip it;
#   2. wheelhouse: every wheel of requirements/lock.txt (torch: the local CPU wheel), so the image
#      build installs with --no-index and needs no network;
#   3. podman build of docker/Dockerfile against that base.
#   HPCNLP_GPU_IMAGE=1: the cluster's CUDA image instead (make image-test-gpu): no wheelhouse, the build
#   installs requirements/lock-cuda.txt from PyPI (CUDA torch + its nvidia-* wheels), DeepSpeed's ops for cuda.
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
# DeepSpeed's source too, hash-checked: the Dockerfile's deepspeed-ops stage builds it again with its C++ ops.
deepspeed_req=$(awk '/^deepspeed==/{p=1} p{print; if (!/\\$/) exit}' requirements/lock.txt)

# The base's record: the mirror's Release date (the snapshot.debian.org date that rebuilds this base,
# see docs/container.md, "Pinning the base") and its package set. A base without one is made again.
record=$cache/base-bookworm-py311.txt
t0=$SECONDS
fresh=""
if [ ! -s "$tarball" ] || [ ! -s "$record" ]; then
  echo "build-local: debootstrap bookworm from ${mirror:-deb.debian.org} (once per machine)"
  mkdir -p "$cache"
  rootfs=$(mktemp -d)
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
    bookworm "$rootfs" "${mirror:-http://deb.debian.org/debian}" > "$cache/debootstrap.log" 2>&1 \
    || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
  {
    echo "mirror: ${mirror:-http://deb.debian.org/debian}"
    echo "debootstrapped: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "release-date: $(sed -n 's/^Date: //p' "$rootfs"/var/lib/apt/lists/*Release | head -1)"
    echo "packages:"
    dpkg-query --admindir="$rootfs/var/lib/dpkg" -W
  } > "$record.tmp"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball" && mv "$record.tmp" "$record"
  rm -rf "$rootfs"
  fresh=1
fi
if [ -n "$fresh" ] || ! podman image exists "$base"; then
  podman import --quiet "$tarball" "$base" > /dev/null
fi
echo "build-local: base $base ready ($((SECONDS - t0)) s)"

# The stamp records what the wheelhouse was made from: an unchanged lock skips pip altogether.
t0=$SECONDS
variant=(--build-arg WHEEL_DIR=docker/wheelhouse --build-arg DS_ACCELERATOR=cpu)
if [ -n "${HPCNLP_GPU_IMAGE:-}" ]; then
  variant=(--build-arg WHEEL_DIR= --build-arg DS_ACCELERATOR=cuda)
  mkdir -p docker/wheelhouse  # the Dockerfile binds docker/; nothing from it is installed
  # A host whose HTTPS goes through a proxy with its own CA (this one): pip inside the build trusts it
  # through a pip.conf mounted for the build's RUN steps only (not a layer of the image).
  cert=$("$pip" config list 2>/dev/null | sed -n "s/^[^=]*\.cert='\(.*\)'$/\1/p" | head -1)
  if [ -n "$cert" ]; then
    conf=$(mktemp -d)
    printf '[global]\ncert = /etc/hpcnlp-build-ca.crt\n' > "$conf/pip.conf"
    variant+=(--volume "$cert:/etc/hpcnlp-build-ca.crt:ro" --volume "$conf/pip.conf:/etc/pip.conf:ro")
  fi
else
  stamp=docker/wheelhouse/made-from.txt
  made_from() { cat "${locks[@]}"; echo "$deepspeed_req (source)"; }
  if ! made_from | cmp -s - "$stamp"; then
    log=$(mktemp)
    "$pip" wheel --quiet --no-deps --require-hashes --wheel-dir docker/wheelhouse "${locks[@]/#/-r}" \
      > "$log" 2>&1 || { grep -v '^WARNING: Location' "$log" >&2; exit 1; }
    "$pip" download --quiet --no-deps --no-binary :all: --require-hashes --dest docker/wheelhouse \
      -r <(echo "$deepspeed_req") > "$log" 2>&1 || { grep -v '^WARNING: Location' "$log" >&2; exit 1; }
    rm -f "$log"
    made_from > "$stamp"
  fi
  echo "build-local: wheelhouse docker/wheelhouse ($(ls docker/wheelhouse/*.whl | wc -l) wheels, $((SECONDS - t0)) s)"
fi

# chroot isolation: podman's default runtime (crun) refuses this host's hybrid cgroups.
t0=$SECONDS
# DS_ACCELERATOR=cpu: DeepSpeed's ops for the CPU torch of this build (make image: cuda).
podman build --isolation=chroot --file docker/Dockerfile --tag "$image" \
  --build-arg BASE_IMAGE="$base" "${variant[@]}" \
  --build-arg BASE_DATE="$(date -u -d "$(sed -n 's/^release-date: //p' "$record")" +%Y%m%dT%H%M%SZ)" \
  --build-arg VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)" \
  --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || true)" \
  --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  --build-arg SOURCE="$(git config --get remote.origin.url || true)" "${@:2}" .
echo "build-local: built $image in $((SECONDS - t0)) s, $(podman image inspect --format '{{.Size}}' "$image") bytes"
