"""Render benchmark: import, first-frame (shader compile) and steady per-view time per recipe, plus throughput
with several concurrent render children.

    python benchmarks/render.py --resolution 64 256 --views 4 --allow-software-gl --out benchmarks/results/render_cpu.json
    python benchmarks/render.py --resolution 512 --views 32 --children 1 8 --out render_h100.json   # on a GPU
    python benchmarks/render.py --resolution 512 --recipes --children 8 12 --samples 16 8 --gpu-backend vulkan --out ...

Seeds are fixed (demo assets seed 0, recipe seed 0); the JSON records the machine, GL renderer and versions.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infra.environments import find_render_python  # noqa: E402
from pipelines.demo import generate_demo_assets  # noqa: E402
from pipelines.local_render import render_files  # noqa: E402
from render_jobs.protocol import GPU_BACKENDS  # noqa: E402
from render_jobs.recipes import RECIPE_NAMES, recipe_config  # noqa: E402
from render_jobs.supervisor import RenderSupervisor, RenderWorkerConfig  # noqa: E402


def _import_time_s(python: Path) -> float:
    code = "import time; t = time.perf_counter(); import bpy; print(time.perf_counter() - t)"
    return float(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1])


def _one(supervisor, asset, recipe, out, worker) -> dict:
    record = next(render_files([asset], recipe, out, worker=worker, supervisor=supervisor))
    if not record.result.is_ok:
        raise RuntimeError(f"{asset}: {record.result.reason} {record.result.message}\n{record.result.stderr_tail}")
    return record.result.timings_s


def _in_parallel(targets: list) -> None:
    threads = [threading.Thread(target=target) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def bench_recipe(name: str, resolution: int, views: int, assets: list[Path], worker: RenderWorkerConfig, out: Path) -> dict:
    """A fresh child: start-up, first frame of a first and of a second material, then steady views."""
    lightings = 2 if name == "relight" else None
    one_view = recipe_config(name, num_views=1, lightings_per_view=1 if lightings else None, resolution_px=resolution)
    many = recipe_config(name, num_views=views, lightings_per_view=lightings, resolution_px=resolution)
    with RenderSupervisor(worker) as supervisor:
        started = time.perf_counter()
        info = supervisor.start()
        startup_s = time.perf_counter() - started
        first = _one(supervisor, assets[0], one_view, out / "first", worker)
        second = _one(supervisor, assets[1], one_view, out / "second", worker)
        steady = _one(supervisor, assets[1], many, out / "steady", worker)
    frames = views * (lightings or 1)
    return {
        "recipe": name, "resolution_px": resolution, "samples": many.samples, "passes": list(many.passes),
        "child_startup_s": startup_s, "warm_up_s": info.startup_s,
        "first_frame_s": first["render_s"], "first_frame_new_material_warm_child_s": second["render_s"],
        "steady_frames": frames, "steady_per_view_s": steady["render_s"] / frames,
        "steady_blender_per_view_s": steady["blender_s"] / frames, "steady_views_per_s": frames / steady["render_s"],
        "gpu_backend": info.gpu_backend, "gl_renderer": info.gl_renderer,
    }


def bench_concurrency(children: int, resolution: int, samples: int, views: int, assets: list[Path], worker: RenderWorkerConfig,
                      out: Path) -> dict:
    """`children` supervised children render the `lh` recipe at once after their warm-up; total views per second
    and the share of the machine's CPU time they took."""
    recipe = recipe_config("lh", num_views=views, resolution_px=resolution, samples=samples)
    warm = recipe_config("lh", num_views=1, resolution_px=resolution, samples=samples)
    supervisors = [RenderSupervisor(worker) for _ in range(children)]
    _in_parallel([s.start for s in supervisors])
    for i, s in enumerate(supervisors):  # pay the first-frame cost of the materials once per child
        for asset in assets:
            _one(s, asset, warm, out / f"warm{i}", worker)
    psutil.cpu_percent()  # starts the CPU-time window
    started = time.perf_counter()
    _in_parallel([lambda s=s, i=i: [_one(s, a, recipe, out / f"c{i}", worker) for a in assets] for i, s in enumerate(supervisors)])
    wall = time.perf_counter() - started
    cpu_busy = psutil.cpu_percent() / 100
    for s in supervisors:
        s.close()
    frames = children * len(assets) * views
    return {"children": children, "recipe": "lh", "resolution_px": resolution, "samples": samples, "gpu_backend": worker.gpu_backend,
            "views": frames, "wall_s": wall, "views_per_s": frames / wall, "cpu_busy": cpu_busy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--views", type=int, default=4, help="views of the steady-state measurement")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPE_NAMES), choices=RECIPE_NAMES, help="recipes to time one child on")
    parser.add_argument("--children", type=int, nargs="*", default=[], help="concurrent children to measure (lh)")
    parser.add_argument("--samples", type=int, nargs="+", default=[16], help="EEVEE samples of the concurrency runs")
    parser.add_argument("--gpu-backend", choices=GPU_BACKENDS, default="opengl")
    parser.add_argument("--allow-software-gl", action="store_true")
    parser.add_argument("--render-python", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    python = find_render_python(args.render_python)
    worker = RenderWorkerConfig(render_python=str(python), allow_software_gl=args.allow_software_gl, timeout_s=1800,
                                gpu_backend=args.gpu_backend)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        assets = generate_demo_assets(tmp / "assets", seed=0, render_python=str(python))
        results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
                   "import_bpy_s": _import_time_s(python), "recipes": [], "concurrency": []}
        for resolution in args.resolution:
            for name in args.recipes:
                results["recipes"].append(bench_recipe(name, resolution, args.views, assets, worker, tmp / f"{name}{resolution}"))
                print(json.dumps(results["recipes"][-1]), flush=True)
            for samples in args.samples:
                for children in args.children:
                    results["concurrency"].append(
                        bench_concurrency(children, resolution, samples, args.views, assets, worker, tmp / f"conc{children}-{samples}"))
                    print(json.dumps(results["concurrency"][-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
