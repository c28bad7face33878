"""The GPU steps of one asset at the paper's sizes: voxelize, DINOv2 on 150 + 150 views, back-projection and
the SLAT encoder for both roles, through `AssetEncoder.encode` exactly as the build's encoder actor runs it.

    python benchmarks/encode_asset.py --device cuda --out benchmarks/results/encode_asset_h100.json

The `lh` render set is written synthetically (the render set format, random HDR views at 512^2, the lh rig's
150 cameras, a torus mesh of about 20K surface voxels): the encoder's time does not depend on the pixel values.
Models are the real architectures with random weights. Reports the median of `--repeats` encodes after a
warm-up, and the time per part (reading the EXRs is CPU work inside the step).
"""

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.encoders import torus_mesh
from encoders.asset_encoder import AssetEncoder, AssetEncoderConfig
from encoders.dinov2 import Dinov2Config, save_random_dinov2
from encoders.slat_encoder import SlatEncoderConfig, build_random_slat_encoder, save_slat_encoder
from render_jobs.exr import write_channels
from render_jobs.render_set import (
    FORMAT_VERSION,
    MESH_FILE,
    TRANSFORMS_FILE,
    beauty_path,
    gbuffer_path,
    write_ply,
)
from render_jobs.views import hammersley_views


def write_lh_render_set(root: Path, *, views: int, size: int, triangles: int) -> None:
    """A render set in the `lh` layout with random views; enough for `AssetEncoder.encode`."""
    rng = np.random.default_rng(0)
    (root / "beauty").mkdir(parents=True)
    (root / "gbuffer").mkdir()
    vertices, faces = torus_mesh(triangles, major=0.3, minor=0.15)
    write_ply(root / MESH_FILE, vertices, faces)

    def half() -> np.ndarray:
        return rng.random((size, size), dtype=np.float32).astype(np.float16)

    frames = []
    for index, view in enumerate(hammersley_views(views, rng=rng)):
        write_channels(root / beauty_path(index, 0), {"R": half(), "G": half(), "B": half(), "A": half()})
        write_channels(
            root / gbuffer_path(index),
            {
                "alpha": half(),
                "depth": np.full((size, size), 2.0, np.float32),
                "basecolor.R": half(),
                "basecolor.G": half(),
                "basecolor.B": half(),
            },
        )
        frames.append(
            {
                "file_path": beauty_path(index, 0),
                "gbuffer_path": gbuffer_path(index),
                "view_index": index,
                "lighting_index": 0,
                "camera_angle_x": view.fov_rad,
                "transform_matrix": view.c2w.tolist(),
                "lighting": {"kind": "homogenized"},
            }
        )
    meta = {
        "format": FORMAT_VERSION,
        "source_id": "0" * 64,
        "frames": frames,
        "passes": {"beauty": {}, "alpha": {}, "depth": {}, "basecolor": {}},
    }
    (root / TRANSFORMS_FILE).write_text(json.dumps(meta))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--views", type=int, default=150)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--triangles", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_random_dinov2(tmp / "dinov2", seed=0)
        save_slat_encoder(build_random_slat_encoder(SlatEncoderConfig(), seed=0), tmp / "slat.safetensors")
        write_lh_render_set(tmp / "set", views=args.views, size=args.size, triangles=args.triangles)
        encoder = AssetEncoder(
            AssetEncoderConfig(
                dinov2=Dinov2Config(model=str(tmp / "dinov2")), slat_encoder=str(tmp / "slat.safetensors")
            ),
            device=device,
        )
        encoder.encode(tmp / "set")  # warm-up: compiles the fused LayerNorm, loads kernels
        runs = []
        for _ in range(args.repeats):
            clock = time.perf_counter()
            encoding = encoder.encode(tmp / "set")
            runs.append({"wall_s": time.perf_counter() - clock, **encoding.meta["timings"]})
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "torch": torch.__version__,
        "views_per_role": args.views,
        "size_px": args.size,
        "voxels": len(encoding.coords),
        "median_s": median,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"voxels": result["voxels"], **{k: round(v, 3) for k, v in median.items()}}))


if __name__ == "__main__":
    main()
