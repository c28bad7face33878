#!/usr/bin/env bash
# Run on the GPU machine, in the repository root, at the start of every call: keeps the parts this call
# carried (under /tmp, which outlives calls while the machine stays warm), checks each against the manifest,
# installs what is complete, and writes /tmp/near-gpu-node/env.sh. Prints what is still missing.
#   bash benchmarks/gpu_node/unpack.sh && source /tmp/near-gpu-node/env.sh
set -euo pipefail
root=$(pwd)
store=/tmp/near-gpu-node
mkdir -p "$store/parts" "$store/wheels" "$store/installed"
cp .gpu-node/manifest.sha256 "$store/"
for part in .gpu-node/parts/*; do
  [ -f "$part" ] || continue
  name=$(basename "$part")
  [ -f "$store/parts/$name" ] && continue  # carried before (ignored files stay in the checkout between calls)
  (cd .gpu-node/parts && grep " $name\$" "$store/manifest.sha256" | sha256sum -c --quiet -) \
    || { echo "unpack: $name does not match the manifest" >&2; exit 1; }
  cp "$part" "$store/parts/$name"
done
have() { [ -f "$store/parts/$1" ]; }
unzstd() {  # stdin to stdout; without the zstd tool, the zstandard wheel (wheels.00) decodes it
  if command -v zstd > /dev/null; then zstd -d -q --long=30; else
    python3 -c "import sys, zstandard; zstandard.ZstdDecompressor(max_window_size=1 << 31)\
.copy_stream(sys.stdin.buffer, sys.stdout.buffer)"; fi
}
missing=$(cut -d' ' -f3 "$store/manifest.sha256" | while read -r name; do have "$name" || echo "$name"; done)

if have gl.00 && [ ! -f "$store/installed/gl" ]; then
  tar -C "$store" -xf "$store/parts/gl.00"
  for deb in "$store"/gl/*.deb; do
    case $(basename "$deb") in  # the loaders go where the driver's vendor files expect them; the rest aside
      libvulkan1_*|libegl1_*|libglvnd0_*|libopengl0_*|libgl1_*|libglx0_*|libgles2_*) dpkg -x "$deb" / ;;
      *) dpkg -x "$deb" "$store/xlibs" ;;
    esac
  done
  ldconfig
  touch "$store/installed/gl"
fi

if have assets.00 && [ ! -f "$store/installed/assets" ]; then
  unzstd < "$store/parts/assets.00" | tar -C "$store" -xf -
  touch "$store/installed/assets"
fi

for part in "$store"/parts/wheels.* "$store"/parts/raywheels.*; do
  [ -f "$part" ] || continue
  [ -f "$store/installed/$(basename "$part")" ] && continue
  tar -C "$store/wheels" -xf "$part"
  touch "$store/installed/$(basename "$part")"
done
for first in "$store"/wheels/*.piece.00; do  # wheels that travelled in pieces, once all pieces are here
  [ -f "$first" ] || continue
  wheel=${first%.piece.00}
  cat "$wheel".piece.* > "$wheel.tmp"
  if python3 -c "import zipfile, sys; zipfile.ZipFile(sys.argv[1]).testzip()" "$wheel.tmp" 2>/dev/null; then  # all here
    mv "$wheel.tmp" "$wheel" && rm "$wheel".piece.*
  else
    rm "$wheel.tmp"
  fi
done
new=$(cd "$store/wheels" && for w in *.whl; do [ -f "$w" ] && [ ! -f "$store/installed/$w" ] && echo "$w"; done || true)
if [ -n "$new" ]; then
  (cd "$store/wheels" && python3 -m pip install -q --no-index --no-deps --no-compile --upgrade $new)
  for w in $new; do touch "$store/installed/$w"; done
fi

if ! echo "$missing" | grep -q '^render\.' && [ ! -f "$store/installed/render" ]; then
  cat "$store"/parts/render.* | unzstd | tar -C / -xf -
  touch "$store/installed/render"
fi

render_env=$(cat .gpu-node/render-env-path)  # where pack.sh found it: the runtime's paths are absolute
site=$(python3 -c 'import site; print(site.getsitepackages()[0])')
echo "$root" > "$site/near_repo.pth"  # the checkout on the main python's path, in every process Ray starts
if [ -f "$store/installed/render" ]; then
  echo "$root" > "$render_env/lib/python3.11/site-packages/near_repo.pth"
  cat > "$store/render-python" <<PY
#!/bin/sh
LD_LIBRARY_PATH=$store/xlibs/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH} exec $render_env/bin/python "\$@"
PY
  chmod +x "$store/render-python"
fi
mkdir -p "$store/bin"  # `near` and its interpreter, as the main env's bin/ has them (infra/container/smoke.sh)
# a wrapper, not a link: a venv's interpreter finds its pyvenv.cfg (its site-packages) beside the path it was run by
printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > "$store/bin/python"
chmod +x "$store/bin/python"
printf '#!/bin/sh\nexec %s -m pipelines.cli "$@"\n' "$store/bin/python" > "$store/bin/near"
chmod +x "$store/bin/near"
driver=/usr/local/nvidia/share  # the NVIDIA driver's vendor files, where the device image mounts them
cat > "$store/env.sh" <<ENV
export PATH=$store/bin:\$PATH
export NEAR_RENDER_PYTHON=$store/render-python
export VK_DRIVER_FILES=$driver/vulkan/icd.d/nvidia_icd.json
export __EGL_VENDOR_LIBRARY_FILENAMES=$driver/glvnd/egl_vendor.d/10_nvidia.json
export HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONUNBUFFERED=1
ENV
echo "unpack: installed $(ls "$store/installed" | tr '\n' ' ')"
echo "unpack: still missing: $(echo $missing)"
