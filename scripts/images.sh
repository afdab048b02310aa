#!/usr/bin/env bash
# Builds tapd's images with podman, without pulling from any registry:
#   localhost/tapd-python:3.11-bookworm   Debian bookworm minbase + python3, made by
#                                         debootstrap from the Debian mirror
#   localhost/tapd-scorer:0.1.0           deploy/Dockerfile.scorer, target scorer
#   localhost/tapd-trainer-cpu:0.1.0      deploy/Dockerfile.scorer, target trainer
# and, with STACK=1, what `make stack` also needs:
#   localhost/tapd-tansu:0.6.0            deploy/Dockerfile.tansu (Kafka-API broker)
#   localhost/tapd-prometheus:bookworm    deploy/Dockerfile.prometheus
# Prints one `timing <step> <seconds>` line per step (docs/DEPLOY.md).
# Needs root, podman, runc, debootstrap (WITH_IMAGES=1 ./scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-$ROOT/.venv}
CACHE=${IMAGES_CACHE:-$ROOT/.cache/images}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' deploy/Dockerfile.scorer)
BASE=localhost/tapd-python:3.11-bookworm
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
STACK=${STACK:-0}

log() { printf '[images] %s\n' "$*" >&2; }
timed() {  # timed NAME CMD...: run, then print how long it took
  local name=$1 t0 dt rc=0; shift
  t0=$(date +%s%N)
  "$@" || rc=$?
  dt=$(( ($(date +%s%N) - t0) / 100000000 ))
  printf 'timing %s %d.%d s\n' "$name" $((dt / 10)) $((dt % 10))
  return $rc
}

mkdir -p "$CACHE"
# podman as root with runc and cgroupfs (no systemd in a build container or CI
# machine); the default ulimits of some hosts exceed what runc may set.
export CONTAINERS_CONF="$CACHE/containers.conf"
cat >"$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF

# Build-time trust: pip inside the build uses this machine's CA bundle (it may
# sit behind a TLS-intercepting proxy); it never reaches the images.
CA=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
build_args=(--build-arg "PIP_CERT=/run/build-ca.crt" -v "$CA:/run/build-ca.crt:ro")

base() {
  if podman image exists "$BASE"; then log "$BASE exists"; return; fi
  local rootfs="$CACHE/rootfs"
  if [ ! -x "$rootfs/usr/bin/python3" ]; then
    rm -rf "$rootfs"
    log "debootstrap bookworm minbase from $MIRROR"
    debootstrap --variant=minbase \
      --include=python3,python3-venv,python-is-python3,ca-certificates \
      bookworm "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log"
  fi
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import \
    --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$BASE" >/dev/null
}

wheels() {
  # the torch CPU wheel, for the offline build (mounted at /wheels)
  mkdir -p "$CACHE/wheels"
  if ! ls "$CACHE"/wheels/torch-"$TORCH_VERSION"+cpu-*.whl >/dev/null 2>&1; then
    "$VENV/bin/pip" download -q --no-deps -d "$CACHE/wheels" "torch==$TORCH_VERSION+cpu"
  fi
}

build() {  # build TARGET TAG
  podman build -q --format docker -f deploy/Dockerfile.scorer --target "$1" -t "$2" \
    --build-arg "PYTHON_IMAGE=$BASE" "${build_args[@]}" \
    -v "$CACHE/wheels:/wheels:ro" .
}

timed base base
timed wheels wheels
timed scorer build scorer "localhost/tapd-scorer:$VERSION"
timed trainer build trainer "localhost/tapd-trainer-cpu:$VERSION"
if [ "$STACK" = 1 ]; then
  timed tansu podman build -q --format docker -f deploy/Dockerfile.tansu -t localhost/tapd-tansu:0.6.0 \
    --build-arg "PYTHON_IMAGE=$BASE" "${build_args[@]}" deploy
  timed prometheus podman build -q --format docker -f deploy/Dockerfile.prometheus \
    -t localhost/tapd-prometheus:bookworm --build-arg "DEBIAN_IMAGE=$BASE" deploy
fi
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'tapd-' | sed 's/^/image /'
