"""How many EEVEE samples the `lh` recipe needs, judged by what its images feed: DINOv2's input, the
back-projected features and the SLAT latents.

    # this machine: tiny models and images, a smoke run of the whole path
    python benchmarks/lh_samples.py --demo --tiny --resolution 64 --views 4 --samples 1 4 16 --reference 64 \
        --allow-software-gl --device cpu --out /tmp/lh_samples_cpu.json
    # a GPU: real-size models at the recipe's resolution; concave (open_box, suzanne) and glossy assets among them
    python benchmarks/lh_samples.py --demo metal_torus open_box textured_cube \
        ../shared/assets/gltf-blender-io/scenes/{02_suzanne,08_clearcoat,04_common_materials}.blend \
        --device cuda --views 24 --resolution 512 --out benchmarks/results/lh_samples_h100.json

Each asset is rendered through the project's render path (one supervised render child, the `lh` recipe) at
every sample count and twice at the reference count, then encoded as the build's encoder step encodes it
(`AssetEncoder` with the build's config, so DINOv2 runs in bfloat16 on CUDA and float32 on the CPU). The voxels
are the build's voxelization of the reference render set's mesh and are shared by every sample count; the
cameras and mesh of all render sets of an asset are checked to be identical. Against the reference it reports

- images, as DINOv2 receives them (RGB x alpha on black, resized to 518^2, ImageNet-normalized; compared in
  float32, before the cast to the model's dtype): PSNR with the error in display units (peak 1), and the mean
  absolute error in normalized units;
- features (N, 1024) and latents (N, 8) of both roles (`lh` from the beauty pass, `bc` from the base color
  AOV): relative L2 error ||x - ref|| / ||ref||, and the cosine similarity per voxel (mean, 1st percentile).

Two more rows put these in scale: `again` is the reference rendered and encoded a second time (all zero when
EEVEE's sampling and the encoders are deterministic), and `bf16` is the reference encoded with DINOv2 in
bfloat16 against float32 (its image columns: the cast of the network input to bfloat16). Sample noise below
`bf16` is below the precision noise the build already accepts on CUDA.

Models: by default the real architectures (DINOv2 ViT-L/14 with registers, the released SLAT encoder
configuration) with seeded random weights, since no weights can be downloaded here; `--tiny` uses the demo's
small models (CPU smoke runs). Random networks respond to pixel noise differently from trained ones, so rerun
with real weights where they exist: `--dinov2` and `--slat-encoder` take a local path or a hub id and load
through the encoders' own code (`Dinov2Config.model`, `AssetEncoderConfig.slat_encoder`).
"""

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoders.asset_encoder import AssetEncoder, AssetEncoderConfig, load_views  # noqa: E402
from encoders.dinov2 import IMAGENET_STD, Dinov2Config, Dinov2Features, save_random_dinov2  # noqa: E402
from encoders.slat_encoder import SlatEncoderConfig, build_random_slat_encoder, save_slat_encoder  # noqa: E402
from infra.environments import find_render_python  # noqa: E402
from pipelines.demo import generate_demo_assets, write_demo_models  # noqa: E402
from pipelines.local_render import render_files  # noqa: E402
from render_jobs.protocol import GPU_BACKENDS, WorkerInfo  # noqa: E402
from render_jobs.recipes import recipe_config  # noqa: E402
from render_jobs.render_set import MESH_FILE, RenderSet  # noqa: E402
from render_jobs.supervisor import RenderSupervisor, RenderWorkerConfig  # noqa: E402

AGAIN = "again"
"""Row of the reference rendered and encoded a second time: the run-to-run noise of EEVEE and the encoders."""
BF16 = "bf16"
"""Row of the reference encoded with DINOv2 in bfloat16 against float32: the precision yardstick."""


class RenderFailed(RuntimeError):
    """An asset's render came back failed; the study goes on without it."""


@dataclasses.dataclass(frozen=True)
class RenderedAsset:
    """One asset's render sets, keyed by row: each sample count (as a string) and `AGAIN`."""

    path: Path
    sets: dict[str, Path]
    per_view_s: dict[str, dict[str, float]]  # row -> {"render": wall s per view, "blender": s inside Blender}


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One render set as the encoder step sees it, per role; feature and latent rows follow the asset's voxels."""

    images: dict[str, Float[Tensor, "V 3 S S"]]  # DINOv2 input, on the encoder's device
    features: dict[str, np.ndarray]  # (N, 1024) float16
    latents: dict[str, np.ndarray]  # (N, 8) float32


def image_errors(images: Float[Tensor, "V 3 S S"], reference: Float[Tensor, "V 3 S S"]) -> dict[str, float | None]:
    """PSNR (dB; the error times ImageNet's std, i.e. in display units with peak 1) and mean absolute error (in
    normalized units) of DINOv2 inputs. PSNR is None for identical images: JSON has no infinity."""
    diff = images.double() - reference.double()
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64, device=diff.device).view(1, 3, 1, 1)
    mse = float((diff * std).square().mean())
    return {"psnr_db": 10 * math.log10(1 / mse) if mse > 0 else None, "mae": float(diff.abs().mean())}


def row_errors(x: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Relative L2 error of (N, C) `x` against `reference`, and the cosine similarity of each row (voxel) to its
    reference row: mean and 1st percentile (the worst voxels, which a mean hides)."""
    x, reference = x.astype(np.float64), reference.astype(np.float64)
    rel = np.linalg.norm(x - reference) / max(np.linalg.norm(reference), np.finfo(np.float64).tiny)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(reference, axis=1)
    cos = (x * reference).sum(1) / np.maximum(norms, np.finfo(np.float64).tiny)
    return {"rel_l2": float(rel), "cos_mean": float(cos.mean()), "cos_p01": float(np.quantile(cos, 0.01))}


def compare(encoded: Encoded, reference: Encoded) -> dict[str, dict[str, dict]]:
    """role -> {"image", "features", "latents"} -> errors against `reference`."""
    return {
        role: {
            "image": image_errors(encoded.images[role], reference.images[role]),
            "features": row_errors(encoded.features[role], reference.features[role]),
            "latents": row_errors(encoded.latents[role], reference.latents[role]),
        }
        for role in reference.features
    }


def encode(encoder: AssetEncoder, render_dir: Path, coords: np.ndarray, *, inputs: Dinov2Features) -> Encoded:
    """Features and latents of `render_dir` on fixed voxels `coords` (N, 3), as the build's encoder step makes
    them; the images are `inputs.preprocess` of the same views (its dtype decides theirs)."""
    found = encoder.features(render_dir, coords)
    latents = encoder.encode_latents(coords, found.features)
    views, _ = load_views(RenderSet.open(render_dir), encoder.config.roles, False)
    images = {
        role: torch.cat([inputs.preprocess(batch) for batch in rgba.split(inputs.config.batch_size)])
        for role, rgba in views.items()
    }
    return Encoded(images, found.features, latents)


def render_asset(
    path: Path,
    *,
    samples: list[int],
    reference: int,
    views: int,
    resolution: int,
    out: Path,
    supervisor: RenderSupervisor,
    worker: RenderWorkerConfig,
) -> RenderedAsset:
    """Every sample count, then the reference again. A one-view warm-up render comes first, so that no timing
    includes the compilation of the asset's shaders."""
    runs = [("warm-up", 1, 1), *((str(s), views, s) for s in (*samples, reference)), (AGAIN, views, reference)]
    sets, per_view_s = {}, {}
    for row, num_views, spp in runs:
        recipe = recipe_config("lh", num_views=num_views, resolution_px=resolution, samples=spp)
        result = next(render_files([path], recipe, out / row, worker=worker, supervisor=supervisor)).result
        if not result.is_ok:
            raise RenderFailed(f"{path.name} at {spp} samples: {result.reason} {result.message}")
        sets[row] = Path(result.out_dir)
        per_view_s[row] = {"render": result.timings_s["render_s"] / num_views,
                           "blender": result.timings_s["blender_s"] / num_views}
    del sets["warm-up"], per_view_s["warm-up"]
    return RenderedAsset(path, sets, per_view_s)


def check_same_scene(sets: dict[str, Path]) -> None:
    """Every render set of an asset has the same cameras and mesh: the sample count changes only pixels.

    The recipe plans cameras from its seed and the asset's source_id alone; this checks that it stays so.
    """

    def scene(root: Path) -> tuple[list, bytes]:
        frames = RenderSet.open(root).frames
        return [(f.record["transform_matrix"], f.fov_rad) for f in frames], (root / MESH_FILE).read_bytes()

    first, *rest = sets.items()
    expected = scene(first[1])
    for row, root in rest:
        if scene(root) != expected:
            raise RuntimeError(f"the render set of row {row} has other cameras or another mesh than row {first[0]}")


def study_asset(asset: RenderedAsset, reference: str, encoders: dict[str, AssetEncoder], build: AssetEncoder) -> dict:
    """Errors of every row of `asset` against its `reference` row, plus the `BF16` yardstick."""
    check_same_scene(asset.sets)
    reference_dir = asset.sets[reference]
    coords = build.encode(reference_dir).coords  # the build's voxelization of the render set's mesh
    fp32, bf16 = encoders["float32"], encoders["bfloat16"]
    truth = encode(build, reference_dir, coords, inputs=fp32.dinov2)
    errors = {
        row: compare(encode(build, root, coords, inputs=fp32.dinov2), truth)
        for row, root in asset.sets.items()
        if row != reference
    }
    errors[BF16] = compare(
        encode(bf16, reference_dir, coords, inputs=bf16.dinov2),
        encode(fp32, reference_dir, coords, inputs=fp32.dinov2),
    )
    again = errors[AGAIN]
    return {
        "path": str(asset.path),
        "voxels": len(coords),
        "eevee_deterministic": all(again[role]["image"]["mae"] == 0 for role in again),
        "per_view_s": {row: asset.per_view_s[row] for row in asset.sets},
        "errors": errors,
    }


def load_encoders(dinov2: str, slat_encoder: str, device: torch.device) -> tuple[AssetEncoder, dict[str, AssetEncoder]]:
    """The build's encoder, and encoders with DINOv2 in "bfloat16" and "float32" (one of them is the build's)."""
    config = AssetEncoderConfig(dinov2=Dinov2Config(model=dinov2), slat_encoder=slat_encoder)
    build = AssetEncoder(config, device=device)
    build_precision = "bfloat16" if build.dinov2.dtype == torch.bfloat16 else "float32"
    other = "float32" if build_precision == "bfloat16" else "bfloat16"
    other_config = dataclasses.replace(config, dinov2=dataclasses.replace(config.dinov2, precision=other))
    return build, {build_precision: build, other: AssetEncoder(other_config, device=device)}


def _models(args: argparse.Namespace, folder: Path) -> tuple[str, str]:
    """The DINOv2 and SLAT encoder references: given ones, else random real-size ones (or the demo's tiny ones)."""
    if args.tiny:
        models = write_demo_models(folder, seed=0)
        dinov2, slat = str(models["dinov2"]), str(models["slat_encoder"])
    else:
        dinov2, slat = str(folder / "dinov2-vitl14-reg"), str(folder / "slat_enc_swin8_B_64l8.safetensors")
        if args.dinov2 is None:
            save_random_dinov2(dinov2, seed=0)
        if args.slat_encoder is None:
            save_slat_encoder(build_random_slat_encoder(SlatEncoderConfig(), seed=0), slat)
    return args.dinov2 or dinov2, args.slat_encoder or slat


def _assets(args: argparse.Namespace, folder: Path, render_python: Path) -> dict[str, Path]:
    """Asset name (file stem) -> path: the chosen demo assets, then the given files."""
    paths = list(args.assets)
    if args.demo is not None:
        demo = {p.stem: p for p in generate_demo_assets(folder, seed=0, render_python=str(render_python))}
        unknown = sorted(set(args.demo) - set(demo))
        if unknown:
            raise SystemExit(f"unknown demo assets {unknown}; choose from {sorted(demo)}")
        paths = [demo[name] for name in (args.demo or demo)] + paths
    names = [p.stem for p in paths]
    if len(set(names)) != len(names):
        raise SystemExit(f"asset file names must differ (rows are named by them): {names}")
    return dict(zip(names, paths))


def _environment(device: torch.device, info: WorkerInfo) -> dict:
    versions = {name: importlib.metadata.version(name) for name in ("torch", "transformers", "numpy")}
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "renderer": {"bpy": info.bpy_version, "gpu_backend": info.gpu_backend, "gl_renderer": info.gl_renderer,
                     "gl_device_type": info.gl_device_type},
        "versions": versions,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "inf" if value is None else format(value, spec)


def table(results: dict[str, dict], rows: list[str], roles: tuple[str, ...]) -> str:
    """Per role, one line per asset and row (the reference row has its time only): ms per view, image PSNR and
    MAE, relative L2 error and 1 - mean cosine of features and latents; then the worst asset of each row."""
    header = (f"{'asset':<22}{'row':>6}{'ms/view':>9}{'img dB':>8}{'img MAE':>9}"
              f"{'feat L2':>9}{'feat 1-cos':>11}{'lat L2':>9}{'lat 1-cos':>10}")
    lines = []
    for role in roles:
        lines += [f"\nrole {role}: errors against the reference render", header]
        for name, result in results.items():
            for row in rows:
                errors = result["errors"].get(row, {}).get(role)
                lines.append(_line(name, row, result["per_view_s"].get(row, {}).get("render"), errors))
        for row in rows:
            errors = [result["errors"][row][role] for result in results.values() if row in result["errors"]]
            if errors:
                lines.append(_line("worst asset", row, None, _worst(errors)))
    return "\n".join(lines)


def _line(name: str, row: str, seconds: float | None, errors: dict | None) -> str:
    ms = "-" if seconds is None else f"{seconds * 1e3:.1f}"
    line = f"{name[:21]:<22}{row:>6}{ms:>9}"
    if errors is None:
        return line
    image, feats, latents = errors["image"], errors["features"], errors["latents"]
    return (f"{line}{_fmt(image['psnr_db'], '.1f'):>8}{image['mae']:>9.1e}{feats['rel_l2']:>9.1e}"
            f"{1 - feats['cos_mean']:>11.1e}{latents['rel_l2']:>9.1e}{1 - latents['cos_mean']:>10.1e}")


def _worst(errors: list[dict]) -> dict:
    """The worst value of each number over assets (lowest PSNR and cosine, highest error)."""
    psnrs = [e["image"]["psnr_db"] for e in errors if e["image"]["psnr_db"] is not None]
    worst = {"image": {"psnr_db": min(psnrs, default=None), "mae": max(e["image"]["mae"] for e in errors)}}
    for kind in ("features", "latents"):
        worst[kind] = {"rel_l2": max(e[kind]["rel_l2"] for e in errors),
                       "cos_mean": min(e[kind]["cos_mean"] for e in errors)}
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("assets", type=Path, nargs="*", help="asset files (any format the render path imports)")
    parser.add_argument("--demo", nargs="*", default=None, metavar="NAME",
                        help="add the demo assets (all, or the named ones: open_box is concave, metal_torus glossy)")
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--reference", type=int, default=64, help="samples of the reference render")
    parser.add_argument("--views", type=int, default=24, help="views per render (the recipe has 150)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the demo's tiny random models (CPU smoke runs)")
    parser.add_argument("--dinov2", default=None, help="DINOv2 weights: local folder or hub id [random ViT-L/14-reg]")
    parser.add_argument("--slat-encoder", default=None, help="SLAT encoder: local .safetensors or hub id [random]")
    parser.add_argument("--gpu-backend", choices=GPU_BACKENDS, default="opengl")
    parser.add_argument("--allow-software-gl", action="store_true")
    parser.add_argument("--render-python", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not (args.assets or args.demo is not None):
        parser.error("give asset files, --demo, or both")
    if args.tiny and (args.dinov2 or args.slat_encoder):
        parser.error("--tiny replaces --dinov2 and --slat-encoder")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    samples = sorted(set(args.samples) - {args.reference})
    python = find_render_python(args.render_python)
    worker = RenderWorkerConfig(render_python=str(python), allow_software_gl=args.allow_software_gl, timeout_s=1800,
                                gpu_backend=args.gpu_backend)
    with tempfile.TemporaryDirectory(prefix="near-lh-samples-") as tmp:
        tmp = Path(tmp)
        assets = _assets(args, tmp / "assets", python)
        clock = time.perf_counter()
        rendered, failed = {}, {}
        with RenderSupervisor(worker) as supervisor:
            info = supervisor.start()
            for name, path in assets.items():
                try:
                    rendered[name] = render_asset(path, samples=samples, reference=args.reference, views=args.views,
                                                  resolution=args.resolution, out=tmp / "renders" / name,
                                                  supervisor=supervisor, worker=worker)
                except RenderFailed as err:
                    failed[name] = str(err)
                    print(f"skipped: {err}", flush=True)
                else:
                    print(f"rendered {name}", flush=True)
        render_s, clock = time.perf_counter() - clock, time.perf_counter()
        build, encoders = load_encoders(*_models(args, tmp / "models"), device)
        results = {}
        for name, asset in rendered.items():
            results[name] = study_asset(asset, str(args.reference), encoders, build)
            print(f"encoded {name}: {results[name]['voxels']} voxels", flush=True)
        encode_s = time.perf_counter() - clock
    report = {
        **_environment(device, info),
        "settings": {"samples": samples, "reference": args.reference, "views": args.views,
                     "resolution_px": args.resolution, "roles": list(build.config.roles)},
        "models": {name: dataclasses.asdict(weights) for name, weights in build.weights.items()},
        "dinov2_precision": str(build.dinov2.dtype).removeprefix("torch."),
        "wall_s": {"render": render_s, "encode": encode_s},
        "assets": results,
        "failed": failed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(results, [*map(str, samples), str(args.reference), AGAIN, BF16], build.config.roles))
    print(f"\nrender {render_s:.0f} s, encode {encode_s:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
