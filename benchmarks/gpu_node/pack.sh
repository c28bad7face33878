#!/usr/bin/env bash
# Packs what a bare GPU machine (Python 3.12 + torch, no network) needs to run the factory, as parts of at most
# 57 MB that can travel one per call: the render env (the CPython 3.11 runtime it was made with and
# .venv-render, at the same absolute paths), the main env's cp312 wheels such an image lacks (benchmarks/gpu_node/
# requirements-cp312.txt; each wheel part installs on its own), and the GL, EGL, Vulkan and X libraries headless
# EEVEE links. Writes .gpu-node/parts/ (git-ignored) and .gpu-node/manifest.sha256 (unpack.sh checks every part against it).
#   bash benchmarks/gpu_node/pack.sh            # here, once; again after changing an env
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=$root/.gpu-node
runtime=$(cd "$(dirname "$(readlink -f "$root/.venv-render/bin/python")")/.." && pwd)
part_bytes=$((57 * 1000 * 1000))  # with the checkout (~7 MB), under a call's 64 MiB
rm -rf "$out/parts" "$out/bins" && mkdir -p "$out/parts" "$out/gl" "$out/bins"

echo "pack: render env ($runtime and $root/.venv-render)"
stdlib=${runtime#/}/lib/python3.11
venv=${root#/}/.venv-render
tar -C / -cf - --anchored \
  --exclude="$stdlib/test" --exclude="$stdlib/site-packages" --exclude="$stdlib/idlelib" \
  --exclude="$stdlib/tkinter" --exclude="$stdlib/ensurepip" --exclude="$stdlib/config-*" \
  --exclude="$venv/lib/python3.11/site-packages/pip" --exclude="$venv/lib/python3.11/site-packages/__editable__*" \
  --exclude="$venv/lib/python3.11/site-packages/bpy/lib/libOpenImageDenoise_device_hip*" \
  --exclude="$venv/lib/python3.11/site-packages/bpy/lib/libOpenImageDenoise_device_sycl*" \
  "${runtime#/}/bin/python3.11" "${runtime#/}/lib/libpython3.11.so.1.0" "${runtime#/}/lib/python3.11" \
  "$venv" \
  | zstd -q -T0 -15 --long=30 | (cd "$out/parts" && split -b $part_bytes -d -a 2 - render.)

# Wheels into parts, each whole and installable on its own; the part of many small wheels first (it is what
# most benchmarks need), a wheel larger than a part as pieces (`<wheel>.piece.NN`, joined once all arrived).
# requirements-cp312.txt: what the device image lacks; requirements-cp312-ray.txt: Ray, for an image without it.
pack_wheels() {  # requirements file, part prefix
  rm -rf "$out/wheels" && mkdir -p "$out/wheels"
  "$root/.venv/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$out/wheels" -r "$1" 2>&1 | grep -v "is ignored" || true
  python3 - "$out" "$part_bytes" "$2" <<'PY'
import sys, tarfile
from pathlib import Path
out, limit, prefix = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
room = limit - (1 << 20)  # tar headers and padding
items = []
for wheel in (out / "wheels").glob("*.whl"):
    data = wheel.read_bytes()
    if len(data) <= room:
        items.append(wheel)
        continue
    for i in range(0, len(data), room // 2):
        piece = out / "bins" / f"{wheel.name}.piece.{i // (room // 2):02d}"
        piece.write_bytes(data[i:i + room // 2])
        items.append(piece)
bins: list[list[Path]] = []
for item in sorted(items, key=lambda p: -p.stat().st_size):  # first fit, largest first
    size = item.stat().st_size + 2048
    fitting = [b for b in bins if sum(p.stat().st_size + 2048 for p in b) + size <= room]
    if fitting:
        fitting[0].append(item)
    else:
        bins.append([item])
for i, b in enumerate(sorted(bins, key=len, reverse=True)):
    with tarfile.open(out / "parts" / f"{prefix}.{i:02d}", "w") as tar:
        for item in b:
            tar.add(item, arcname=item.name)
PY
}
echo "pack: main env wheels for cp312"
pack_wheels "$root/benchmarks/gpu_node/requirements-cp312.txt" wheels
pack_wheels "$root/benchmarks/gpu_node/requirements-cp312-ray.txt" raywheels

echo "pack: GL, EGL, Vulkan and X libraries (Debian packages)"
lists=$(mktemp -d)
apt_opts=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists="$lists" -oDir::Cache="$lists")
mkdir -p "$lists/partial"
apt-get "${apt_opts[@]}" update -qq 2>/dev/null
(cd "$out/gl" && apt-get "${apt_opts[@]}" download -qq libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 \
  libgles2 libx11-6 libx11-xcb1 libxcb1 libxau6 libxdmcp6 libbsd0 libmd0 libxext6 libxi6 libxfixes3 libxrender1 \
  libxxf86vm1 libxkbcommon0 libsm6 libice6 2>/dev/null)
tar -C "$out" -cf "$out/parts/gl.00" gl
rm -rf "$lists" "$out/bins"

if [ -d "$out/assets" ]; then  # assets to build there, if any were put in .gpu-node/assets
  tar -C "$out" -cf - assets | zstd -q -19 -T0 > "$out/parts/assets.00"
fi
echo "$root/.venv-render" > "$out/render-env-path"
(cd "$out/parts" && sha256sum -- * > ../manifest.sha256)
ls -l "$out/parts"
