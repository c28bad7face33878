"""Where EEVEE's time per `lh` view goes, and what fewer samples cost in quality.

    # throughput: K render children per variant of EEVEE settings, frames counted over a common window
    python benchmarks/eevee_settings.py throughput --variants benchmarks/eevee_variants.json --out sweep.json
    # quality: lh views rendered at several sample counts, PSNR against the highest
    python benchmarks/eevee_settings.py quality --samples 4 8 16 64 --out quality.json

Both run the factory's own scene code (`render_jobs.blender_scene`) on the demo assets (seed 0) in render
children; a variant is a JSON object with optional keys `samples`, `resolution`, `children`, `gpu_backend`,
`passes` and `eevee` (attribute paths under `scene.eevee`, e.g. "ray_tracing_options.resolution_scale").
Results: docs/benchmarks.md.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infra.environments import find_render_python  # noqa: E402
from render_jobs.contact_sheet import srgb_encode  # noqa: E402
from render_jobs.protocol import GPU_BACKEND_ENV_VAR  # noqa: E402

SOURCE_ID = "0" * 64  # fixed cameras


# ---------------------------------------------------------------------------------------------------------
# Render-env side


def _start_blender(variant: dict) -> tuple[Any, Path]:
    """Import bpy with the variant's GPU backend and render the warm-up frame, as a render child does."""
    from render_jobs.gpu_backend import select_gpu_backend

    select_gpu_backend(variant.get("gpu_backend", "opengl"))
    from render_jobs import blender_scene as scene

    scratch = Path(tempfile.mkdtemp(prefix="near-eevee-"))
    scene.disable_auto_run_scripts()
    scene.warm_up(scratch)
    return scene, scratch


def _scene_for(scene: Any, asset: Path, variant: dict):
    """Prepare `asset` exactly as the worker does and return (rig, frames) of an `lh` recipe set up as `variant` says."""
    import bpy

    from render_jobs.recipes import plan_frames, recipe_config
    from render_jobs.worker import prepare_scene

    recipe = recipe_config("lh", resolution_px=variant.get("resolution", 512), samples=variant.get("samples", 16))
    recipe = recipe.replace(passes=tuple(variant.get("passes", recipe.passes)))
    prepare_scene(scene, asset, recipe)
    rig = scene.RenderRig(recipe, {})
    for path, value in variant.get("eevee", {}).items():
        *parents, name = path.split(".")
        target = bpy.context.scene.eevee
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, name, value)
    return rig, plan_frames(recipe, SOURCE_ID, [])


def child_throughput(asset: Path, variant: dict, sync: Path, rank: int) -> None:
    """Render frames of `asset` from the shared start time until the window closes; print how many."""
    scene, scratch = _start_blender(variant)
    rig, frames = _scene_for(scene, asset, variant)

    def render(i: int) -> None:
        rig.set_view(frames[i % len(frames)].view)
        rig.set_lighting(frames[i % len(frames)].lighting)
        rig.render(scratch / "frame.exr")

    for i in range(3):  # shaders and first frames, outside the window
        render(i)
    (sync / f"ready{rank}").touch()
    while not (sync / "go").exists():
        time.sleep(0.01)
    start, seconds = json.loads((sync / "go").read_text())
    while time.time() < start:
        time.sleep(0.001)
    count = 0
    while time.time() < start + seconds:
        render(3 + count)
        count += 1
    print(json.dumps({"frames": count, "gpu_backend": scene.gl_info()["gpu_backend"]}), flush=True)


def child_quality(assets: list[Path], samples: list[int], views: int, out: Path, variant: dict) -> None:
    """Save beauty and base color (linear RGB) of `views` lh views per asset and sample count."""
    import bpy

    from render_jobs.exr import read_channels

    scene, scratch = _start_blender(variant)
    for asset in assets:
        rig, frames = _scene_for(scene, asset, variant)
        picked = frames[:: len(frames) // views][:views]
        arrays = {}
        for spp in samples:
            bpy.context.scene.eevee.taa_render_samples = spp
            for k, frame in enumerate(picked):
                rig.set_view(frame.view)
                rig.set_lighting(frame.lighting)
                rig.render(scratch / "frame.exr")
                channels = read_channels(scratch / "frame.exr", view_layer=rig.view_layer_name)
                arrays[f"{spp}/{k}/beauty"] = np.stack([channels[f"Combined.{c}"] for c in "RGB"], -1)
                arrays[f"{spp}/{k}/basecolor"] = np.stack([channels[f"basecolor.{c}"] for c in "RGB"], -1)
        np.savez(out / f"{asset.stem}.npz", **arrays)
        scene.reset()


# ---------------------------------------------------------------------------------------------------------
# Main-env side


def _demo_asset_paths(render_python: Path, folder: Path) -> list[Path]:
    from pipelines.demo import generate_demo_assets

    return generate_demo_assets(folder, seed=0, render_python=str(render_python))


def _child(render_python: Path, args: list[str], variant: dict, **popen) -> subprocess.Popen:
    env = {**os.environ, GPU_BACKEND_ENV_VAR: variant.get("gpu_backend", "opengl")}
    return subprocess.Popen([str(render_python), __file__, *args, "--variant", json.dumps(variant)], env=env, **popen)


def run_throughput(render_python: Path, variants: dict, asset: Path, children: int, seconds: float) -> list[dict]:
    results = []
    for name, variant in variants.items():
        k = variant.get("children", children)
        sync = Path(tempfile.mkdtemp(prefix="near-sync-"))
        procs = [_child(render_python, ["child-throughput", str(asset), str(sync), str(rank)], variant,
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for rank in range(k)]
        while sum((sync / f"ready{r}").exists() for r in range(k)) < k and all(p.poll() is None for p in procs):
            time.sleep(0.05)
        (sync / "go.tmp").write_text(json.dumps([time.time() + 0.5, seconds]))
        (sync / "go.tmp").rename(sync / "go")
        outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        frames = sum(o["frames"] for o in outs)
        results.append({"variant": name, **variant, "children": k, "views_per_s": frames / seconds,
                        "gpu_backend": outs[0]["gpu_backend"]})
        print(json.dumps(results[-1]), flush=True)
    return results


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def run_quality(render_python: Path, assets: list[Path], samples: list[int], views: int, variant: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        child = _child(render_python, ["child-quality", tmp, str(views), *map(str, samples), "--assets", *map(str, assets)], variant)
        if child.wait() != 0:
            raise RuntimeError("quality child failed")
        reference = max(samples)
        results = []
        for asset in assets:
            data = dict(np.load(Path(tmp) / f"{asset.stem}.npz"))
            for spp in samples[:-1]:
                row = {"asset": asset.stem, "samples": spp, "reference_samples": reference}
                for kind in ("beauty", "basecolor"):
                    a = srgb_encode(np.stack([data[f"{spp}/{k}/{kind}"] for k in range(views)]))
                    b = srgb_encode(np.stack([data[f"{reference}/{k}/{kind}"] for k in range(views)]))
                    row[f"{kind}_psnr_db"] = _psnr(a, b)
                    row[f"{kind}_p99_abs"] = float(np.quantile(np.abs(a - b), 0.99))
                results.append(row)
                print(json.dumps(row), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    throughput = sub.add_parser("throughput")
    throughput.add_argument("--variants", type=Path, required=True)
    throughput.add_argument("--asset", default="textured_cube", help="demo asset to render")
    throughput.add_argument("--children", type=int, default=8)
    throughput.add_argument("--seconds", type=float, default=10.0)
    quality = sub.add_parser("quality")
    quality.add_argument("--samples", type=int, nargs="+", default=[4, 6, 8, 16, 64])
    quality.add_argument("--views", type=int, default=6)
    quality.add_argument("--assets", type=Path, nargs="*", default=None, help="asset files (default: the demo assets)")
    quality.add_argument("--resolution", type=int, default=512)
    quality.add_argument("--gpu-backend", default="opengl")
    for p in (throughput, quality):
        p.add_argument("--render-python", default=None)
        p.add_argument("--out", type=Path, required=True)
    child_t = sub.add_parser("child-throughput")
    child_t.add_argument("asset", type=Path)
    child_t.add_argument("sync", type=Path)
    child_t.add_argument("rank", type=int)
    child_q = sub.add_parser("child-quality")
    child_q.add_argument("out", type=Path)
    child_q.add_argument("views", type=int)
    child_q.add_argument("samples", type=int, nargs="+")
    child_q.add_argument("--assets", type=Path, nargs="+", required=True)
    for p in (child_t, child_q):
        p.add_argument("--variant", type=json.loads, default={})
    args = parser.parse_args()

    if args.command == "child-throughput":
        return child_throughput(args.asset, args.variant, args.sync, args.rank)
    if args.command == "child-quality":
        return child_quality(args.assets, sorted(args.samples), args.views, args.out, args.variant)
    render_python = find_render_python(args.render_python)
    with tempfile.TemporaryDirectory() as tmp:
        demo = {p.stem: p for p in _demo_asset_paths(render_python, Path(tmp) / "assets")}
        if args.command == "throughput":
            results = run_throughput(render_python, json.loads(args.variants.read_text()), demo[args.asset], args.children, args.seconds)
        else:
            variant = {"gpu_backend": args.gpu_backend, "resolution": args.resolution}
            results = run_quality(render_python, args.assets or list(demo.values()), sorted(args.samples), args.views, variant)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": args.command, "results": results}, indent=1))


if __name__ == "__main__":
    main()
