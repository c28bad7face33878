#!/usr/bin/env bash
# One call on the GPU machine: take this call's part (unpack.sh), then run the named benchmarks, results under
# $OUT (default ./gpu-node-out). Each name is one measurement of docs/benchmarks.md:
#   stage2   Stage 2 decoder frames per second and training samples per second, every speed path on and off
#   encode   the encoder step on one paper-size asset, reading EXR and npy frames
#   render   the project's lh renders against the plain bpy script at 1, 8 and 12 processes
#   samples  the lh samples study (images, features and latents against 64 samples)
#   build    a whole build of ../shared/assets (copied into .gpu-node/assets before pack.sh) at paper sizes
#   collect  wait for a build a previous call started, then verify it
#   check    which of the packages the factory needs the image has, and whether every project module imports
#   smoke    the container image's smoke test (infra/container/smoke.sh) on this GPU with the image's library set
#   bash benchmarks/gpu_node/run.sh stage2 encode
set -euo pipefail
out=${OUT:-$PWD/gpu-node-out}
mkdir -p "$out"
bash benchmarks/gpu_node/unpack.sh
# shellcheck disable=SC1091
source /tmp/near-gpu-node/env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
collect_build() {  # waits for the build while the call has time, then verifies its data root and keeps its report
  # A call may run 600 s; the unpacking before and the verifies after (about 2 minutes) share them.
  while [ ! -f /tmp/paper/build.rc ] && [ "$SECONDS" -lt 440 ]; do sleep 1; done
  tail -5 /tmp/paper/build.log; cp /tmp/paper/build.log "$out/build.log"
  [ -f /tmp/paper/build.rc ] || { echo "build: still running; call again with 'collect'"; return 0; }
  report=$(python3 -c "import json; print(json.load(open('/tmp/paper/build_h100.json'))['report'])")
  cp /tmp/paper/build_h100.json "$out/"
  # The report folder in one file under the 16 MiB a returned file may have: the page, its JSON and its contact
  # sheets at most 640 px wide (the page shows them at 320).
  python3 - "$(dirname "$report")" "$out/build_report.tar" <<'PY'
import io, sys, tarfile
from pathlib import Path
from PIL import Image
folder, out = Path(sys.argv[1]), sys.argv[2]
with tarfile.open(out, "w") as tar:
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        name = str(path.relative_to(folder))
        if path.suffix != ".png":
            tar.add(path, arcname=name)
            continue
        image = Image.open(path)
        scale = min(1.0, 640 / image.width)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
        data = io.BytesIO()
        image.save(data, "PNG", optimize=True)
        info = tarfile.TarInfo(name)
        info.size = data.tell()
        data.seek(0)
        tar.addfile(info, data)
PY
  python3 -m pipelines.cli catalog --root /tmp/paper/data verify --deep 2>&1 | tail -20 | tee "$out/verify.txt"
  python3 -m pipelines.cli catalog --root /tmp/paper/data verify paper-h100 2>&1 | tail -5 | tee -a "$out/verify.txt"
  du -sh /tmp/paper/data | tee -a "$out/verify.txt"
}
for step in "$@"; do
  echo "== $step $(date +%T)"
  case $step in
    stage2)
      python3 -m pytest -q -p no:cacheprovider --noconftest -m gpu tests/training/test_stage2_speed_paths.py \
        tests/training/test_stage2_parts.py > "$out/stage2_gpu_tests.txt" 2>&1 || true
      tail -5 "$out/stage2_gpu_tests.txt"
      python3 benchmarks/stage2.py speed --batches 4 --checkpointed-batches 12 --out "$out/stage2_speed_h100.json" ;;
    encode)
      python3 benchmarks/encode_asset.py --device cuda --frame-formats exr npy --repeats 2 --out "$out/encode_asset_h100.json" ;;
    render)
      python3 benchmarks/render.py --resolution 512 --views 32 --recipes --children 1 8 12 --samples 16 \
        --gpu-backend vulkan --window 10 --out "$out/render_h100.json" ;;
    samples)
      python3 benchmarks/lh_samples.py --demo metal_torus open_box textured_cube \
        --device cuda --views 8 --resolution 512 --gpu-backend vulkan --out "$out/lh_samples_h100.json" ;;
    build)  # in its own session, so it outlives a call that ends first; `collect` waits for it
      python3 benchmarks/gpu_node/paper_config.py --assets /tmp/near-gpu-node/assets --out /tmp/paper --render-slots 12
      setsid nohup bash -c "python3 benchmarks/build.py --config /tmp/paper/build.yaml --keep \
        --out /tmp/paper/build_h100.json; echo \$? > /tmp/paper/build.rc" > /tmp/paper/build.log 2>&1 < /dev/null &
      collect_build ;;
    collect)
      collect_build ;;
    smoke)
      bash infra/container/smoke.sh 2>&1 | tee "$out/smoke.txt" ;;
    check)
      python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__)"
      for module in ray pyarrow pandas gsplat zarr pyiceberg transformers OpenEXR; do
        python3 -c "import $module; print('$module', getattr($module, '__version__', '?'))" 2>&1 | tail -1 || true
      done
      python3 - <<'PY'  # every module of the main env's packages: a dependency the parts lack shows here, not mid-build
import importlib, pkgutil
failed = []
for package in ("catalogs", "encoders", "infra", "pipelines", "training"):
    for module in pkgutil.walk_packages(importlib.import_module(package).__path__, f"{package}."):
        try:
            importlib.import_module(module.name)
        except Exception as err:  # reported, all of them
            failed.append(f"{module.name}: {type(err).__name__}: {err}")
print("project modules: all import" if not failed else "project modules that do not import:\n  " + "\n  ".join(failed))
PY
      ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
echo "== done $(date +%T)"
