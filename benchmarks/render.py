"""Render benchmark: import, first-frame (shader compile) and steady per-view time per recipe, and the project's
`lh` throughput against a plain bpy script's (`render_baseline_bpy.py`) at several process counts.

    python benchmarks/render.py --resolution 64 256 --views 4 --allow-software-gl --out benchmarks/results/render_cpu.json
    python benchmarks/render.py --resolution 512 --views 32 --recipes --children 1 8 12 --out render_h100.json  # GPU

A comparison starts N processes of one kind, warms each up on one view of every asset, then counts the views
all of them finish between one shared start and one shared stop (`--window` seconds), with the CPU and GPU
busy shares over that window; then the same for the other kind. It prints both rates and their ratio.

Seeds are fixed (demo assets seed 0, recipe seed 0); the JSON records the machine, GL renderer and versions.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.monitor import UtilizationSampler  # noqa: E402
from infra.environments import find_render_python  # noqa: E402
from pipelines.demo import generate_demo_assets  # noqa: E402
from pipelines.local_render import render_files  # noqa: E402
from render_jobs.protocol import GPU_BACKENDS  # noqa: E402
from render_jobs.recipes import RECIPE_NAMES, recipe_config  # noqa: E402
from render_jobs.supervisor import RenderSupervisor, RenderWorkerConfig  # noqa: E402


def _import_time_s(python: Path) -> float:
    code = "import time; t = time.perf_counter(); import bpy; print(time.perf_counter() - t)"
    return float(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1])


def _one(supervisor, asset, recipe, out, worker, frame_format="exr") -> dict:
    record = next(render_files([asset], recipe, out, worker=worker, supervisor=supervisor, frame_format=frame_format))
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


def _views_done(root: Path) -> int:
    """Frames written under `root` so far: the project's beauty files (finished or not yet committed sets) or
    the baseline's EXRs."""
    return sum(1 for _ in root.glob("**/beauty/*.*")) + sum(1 for _ in root.glob("cycle*/*.exr"))


def _measure_window(roots: list[Path], window_s: float) -> dict:
    """Views finished under `roots` between a shared start (now) and a shared stop, with the CPU and GPU busy
    shares over the same window."""
    with UtilizationSampler() as usage:
        before = sum(_views_done(r) for r in roots)
        started = time.perf_counter()
        time.sleep(window_s)
        views = sum(_views_done(r) for r in roots) - before
        wall = time.perf_counter() - started
    return {"views": views, "window_s": wall, "views_per_s": views / wall, **usage.summary()}


def window_project(children: int, recipe, assets: list[Path], worker: RenderWorkerConfig, out: Path,
                   window_s: float) -> dict:
    """`children` supervised render children, each warmed up on one view of every asset, then rendering the
    recipe's views of the assets round and round as the build does (uncompressed transient frames)."""
    warm = recipe_config("lh", num_views=1, resolution_px=recipe.resolution_px, samples=recipe.samples)
    supervisors = [RenderSupervisor(worker) for _ in range(children)]
    _in_parallel([s.start for s in supervisors])
    _in_parallel([lambda s=s, i=i: [_one(s, a, warm, out / f"warm{i}", worker) for a in assets]
                  for i, s in enumerate(supervisors)])
    stop = threading.Event()

    def loop(supervisor: RenderSupervisor, root: Path) -> None:
        for cycle in range(1_000_000):
            for asset in assets:
                if stop.is_set():
                    return
                _one(supervisor, asset, recipe, root / f"cycle{cycle}", worker, frame_format="npy")

    roots = [out / f"child{i}" for i in range(children)]
    threads = [threading.Thread(target=loop, args=(s, r)) for s, r in zip(supervisors, roots)]
    for thread in threads:
        thread.start()
    measured = _measure_window(roots, window_s)
    stop.set()
    for thread in threads:
        thread.join()
    for supervisor in supervisors:
        supervisor.close()
    return measured


def window_baseline(children: int, recipe, assets: list[Path], python: Path, gpu_backend: str, out: Path,
                    window_s: float) -> dict:
    """`children` processes of the plain bpy script (`render_baseline_bpy.py`), started together once all are
    warm."""
    script = Path(__file__).with_name("render_baseline_bpy.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out.mkdir(parents=True)
    procs, logs = [], []
    for i in range(children):
        logs.append(out / f"baseline{i}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(
                [str(python), str(script), "--out", str(out / f"baseline{i}"), "--views", str(recipe.num_views),
                 "--resolution", str(recipe.resolution_px), "--samples", str(recipe.samples), "--gpu-backend",
                 gpu_backend, *map(str, assets)], stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                text=True, env=env))
    try:
        for proc, log in zip(procs, logs):
            while "ready" not in log.read_text().splitlines():
                if proc.poll() is not None:
                    raise RuntimeError(f"baseline process failed:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        return _measure_window([out / f"baseline{i}" for i in range(children)], window_s)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def compare(children: int, recipe, assets: list[Path], worker: RenderWorkerConfig, python: Path, out: Path,
            window_s: float) -> dict:
    """The project and the plain script, the same views, samples and process count, each over its own common
    window on the same machine; the ratio of their views per second."""
    project = window_project(children, recipe, assets, worker, out / "project", window_s)
    shutil.rmtree(out / "project", ignore_errors=True)
    baseline = window_baseline(children, recipe, assets, python, worker.gpu_backend, out / "baseline", window_s)
    shutil.rmtree(out / "baseline", ignore_errors=True)
    result = {"processes": children, "recipe": "lh", "views_per_asset": recipe.num_views,
              "resolution_px": recipe.resolution_px, "samples": recipe.samples, "gpu_backend": worker.gpu_backend,
              "project": project, "baseline": baseline, "ratio": project["views_per_s"] / baseline["views_per_s"]}
    print(f"{children:>3} processes, {recipe.samples:>2} samples: project {project['views_per_s']:6.1f} views/s, "
          f"baseline {baseline['views_per_s']:6.1f} views/s, ratio {result['ratio']:.2f}x", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--views", type=int, default=4, help="views of the steady-state measurement")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPE_NAMES), choices=RECIPE_NAMES, help="recipes to time one child on")
    parser.add_argument("--children", type=int, nargs="*", default=[],
                        help="process counts at which to compare the project's lh renders with the plain bpy script")
    parser.add_argument("--samples", type=int, nargs="+", default=[16], help="EEVEE samples of the comparisons")
    parser.add_argument("--window", type=float, default=20.0, help="seconds of each common measured window")
    parser.add_argument("--assets", type=Path, nargs="*", default=[],
                        help="asset files to render (default: the demo assets, seed 0)")
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
        assets = args.assets or generate_demo_assets(tmp / "assets", seed=0, render_python=str(python))
        results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
                   "command": " ".join(sys.argv), "import_bpy_s": _import_time_s(python), "recipes": [],
                   "comparisons": []}
        for resolution in args.resolution:
            for name in args.recipes:
                results["recipes"].append(bench_recipe(name, resolution, args.views, assets, worker, tmp / f"{name}{resolution}"))
                print(json.dumps(results["recipes"][-1]), flush=True)
            for samples in args.samples:
                recipe = recipe_config("lh", num_views=args.views, resolution_px=resolution, samples=samples)
                for children in args.children:
                    results["comparisons"].append(
                        compare(children, recipe, assets, worker, python, tmp / f"cmp{children}-{samples}", args.window))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
