#!/usr/bin/env bash
# Builds the NeAR factory image without a Docker daemon or a registry, then runs infra/container/smoke.sh in it.
# For a Debian 12 machine where we are root (the development machines and CI):
#   1. installs buildah and mmdebstrap (apt) when missing;
#   2. makes a Debian 12 rootfs with mmdebstrap (minbase + ca-certificates) and imports it as the local image
#      localhost/near-base:bookworm (`buildah from scratch` + `buildah add` of the tarball), once;
#   3. `buildah bud --isolation chroot` of infra/container/Dockerfile with BASE set to that image (the oci and
#      rootless isolations fail here: crun says "cgroups in hybrid mode not supported"), storage driver overlay
#      (vfs with NEAR_STORAGE_DRIVER=vfs: slower, a full copy per layer), storage under /var/lib/containers;
#   4. `buildah run --isolation chroot` of smoke.sh in a container of the new image, as the image's user in its
#      WORKDIR (`podman run` works here only with `--runtime runc` (apt install runc) and explicit
#      `--ulimit nofile=20000:20000 --ulimit nproc=4096:4096`: crun refuses the hybrid cgroups and podman's
#      default RLIMIT_NOFILE is above this sandbox's hard limit);
#   5. with --export, `buildah push` to an oci-archive (load it elsewhere with `podman load -i` or
#      `skopeo copy oci-archive:FILE docker://REGISTRY/near-factory:TAG`).
# No PyTorch index is reachable here, so the CPU torch wheel comes from a local folder (NEAR_WHEELS, default
# /opt/wheels, mounted read-only into the build; elsewhere NEAR_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# does it; with neither, pip takes PyPI's CUDA torch), and the host's CA bundle is mounted for pip when this machine
# reaches PyPI through a TLS-intercepting proxy. Neither stays in the image. Work files (rootfs tarball,
# archive) go to NEAR_IMAGE_WORK (default /var/lib/near-image), never into the checkout.
#
#   bash infra/container/build.sh                 # build localhost/near-factory:cpu and smoke-test it
#   bash infra/container/build.sh --no-smoke --export
#
# Where a registry is reachable, build the GPU image with any builder, from the checkout root:
#   docker build -f infra/container/Dockerfile -t near-factory:cu .
#   podman build -f infra/container/Dockerfile -t near-factory:cu .        # or: buildah bud ... (same flags)
#   docker build -f infra/container/Dockerfile --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu22.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t near-factory:cu128 .
#   docker run --rm --gpus all near-factory:cu bash infra/container/smoke.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
work=${NEAR_IMAGE_WORK:-/var/lib/near-image}
driver=${NEAR_STORAGE_DRIVER:-overlay}
image=${NEAR_IMAGE:-localhost/near-factory:cpu}
base=localhost/near-base:bookworm
wheels=${NEAR_WHEELS:-/opt/wheels}
ca_bundle=${NEAR_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
smoke=1 export_archive=0
for arg in "$@"; do
  case $arg in
    --no-smoke) smoke=0 ;;
    --export) export_archive=1 ;;
    *) echo "build.sh: unknown option $arg (known: --no-smoke --export)" >&2; exit 2 ;;
  esac
done
case $work in "$root"|"$root"/*) echo "build.sh: NEAR_IMAGE_WORK must be outside the checkout" >&2; exit 2 ;; esac
bah=(buildah --storage-driver "$driver")
step() { printf '[build] %-8s %s\n' "$1" "$2"; }
started=$SECONDS

if ! command -v buildah >/dev/null || ! command -v mmdebstrap >/dev/null; then
  step apt "installing buildah and mmdebstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah mmdebstrap >/dev/null
fi

mkdir -p "$work"
if ! "${bah[@]}" inspect --type image "$base" >/dev/null 2>&1; then
  rootfs=$work/debian-bookworm-rootfs.tar
  if [ ! -s "$rootfs" ]; then
    step rootfs "mmdebstrap Debian 12 minbase -> $rootfs"
    mmdebstrap --variant=minbase --include=ca-certificates --components=main bookworm "$rootfs" \
      "deb http://deb.debian.org/debian bookworm main" \
      "deb http://deb.debian.org/debian bookworm-updates main" \
      "deb http://deb.debian.org/debian-security bookworm-security main"
  fi
  step import "$rootfs -> $base"
  ctr=$("${bah[@]}" from scratch)
  "${bah[@]}" add "$ctr" "$rootfs" / >/dev/null
  "${bah[@]}" config --cmd /bin/bash "$ctr"
  "${bah[@]}" commit --rm -q "$ctr" "$base" >/dev/null
fi

build_args=(--build-arg "BASE=$base")
volumes=()
if [ -n "${NEAR_TORCH_INDEX_URL:-}" ]; then  # e.g. https://download.pytorch.org/whl/cpu where that is reachable
  build_args+=(--build-arg "TORCH_INDEX_URL=$NEAR_TORCH_INDEX_URL")
fi
if [ -d "$wheels" ]; then
  build_args+=(--build-arg "WHEELS=/run/near-build/wheels")
  volumes+=(-v "$wheels:/run/near-build/wheels:ro")
fi
if [ -s "$ca_bundle" ]; then
  build_args+=(--build-arg "BUILD_CA_BUNDLE=/run/near-build/ca.crt")
  volumes+=(-v "$ca_bundle:/run/near-build/ca.crt:ro")
fi
step build "$image from $base (storage $driver, isolation chroot)"
t0=$SECONDS
"${bah[@]}" bud --isolation chroot --layers -f "$root/infra/container/Dockerfile" "${build_args[@]}" "${volumes[@]}" \
  -t "$image" "$root"
step build "done in $((SECONDS - t0)) s; size $("${bah[@]}" images --format '{{.Size}}' "$image")"

if [ "$smoke" = 1 ]; then
  step smoke "infra/container/smoke.sh inside $image"
  t0=$SECONDS
  ctr=$("${bah[@]}" from -q "$image")
  trap '"${bah[@]}" rm "$ctr" >/dev/null' EXIT
  "${bah[@]}" run --isolation chroot "$ctr" -- bash infra/container/smoke.sh
  step smoke "passed in $((SECONDS - t0)) s"
fi

if [ "$export_archive" = 1 ]; then
  archive=$work/near-factory-cpu.oci.tar
  step export "$archive"
  rm -f "$archive"
  "${bah[@]}" push -q "$image" "oci-archive:$archive:${image##*/}"
  ls -l "$archive"
fi
step total "$((SECONDS - started)) s"
