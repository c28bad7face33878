"""The GPU steps of one asset at the paper's sizes: voxelize, DINOv2 on 150 + 150 views, back-projection and
the SLAT encoder for both roles, through `AssetEncoder.encode` exactly as the build's encoder actor runs it.

    python benchmarks/encode_asset.py --device cuda --frame-formats exr npy --out benchmarks/results/encode_asset_h100.json

The `lh` render set is written synthetically (the render set format, random HDR views at 512^2, the lh rig's
150 cameras, a torus mesh of about 20K surface voxels): the encoder's time does not depend on the pixel values.
Models are the real architectures with random weights. Reports the median of `--repeats` encodes after a
warm-up, and the time per part (reading the views is CPU work inside the step), once per frame format: `exr`
(ZIP-compressed OpenEXR, what `near render` writes) and `npy` (the uncompressed transient frames of a build).
"""

import argparse
import json
import os
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
from encoders.asset_encoder import AssetEncoder, AssetEncoderConfig, load_views
from encoders.dinov2 import Dinov2Config, save_random_dinov2
from encoders.slat_encoder import SlatEncoderConfig, build_random_slat_encoder, save_slat_encoder
from render_jobs.render_set import (
    FORMAT_VERSION,
    FRAME_FORMATS,
    MESH_FILE,
    TRANSFORMS_FILE,
    RenderSet,
    beauty_path,
    gbuffer_path,
    write_frame_file,
    write_ply,
)
from render_jobs.views import hammersley_views


def write_lh_render_set(root: Path, *, views: int, size: int, triangles: int, frame_format: str) -> None:
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
        write_frame_file(root / beauty_path(index, 0, frame_format), {"R": half(), "G": half(), "B": half(), "A": half()})
        write_frame_file(
            root / gbuffer_path(index, frame_format),
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
                "file_path": beauty_path(index, 0, frame_format),
                "gbuffer_path": gbuffer_path(index, frame_format),
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


def read_only(args: argparse.Namespace) -> None:
    """The step's reading of the views (`load_views`, both roles and depth, as `AssetEncoder.encode` reads
    them) per frame format, median of `--repeats` after one read that fills the page cache."""
    result = {"machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
              "command": " ".join(sys.argv), "views_per_role": args.views, "size_px": args.size, "load_views_s": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for frame_format in args.frame_formats:
            root = Path(tmp) / frame_format
            write_lh_render_set(root, views=args.views, size=args.size, triangles=1000, frame_format=frame_format)
            render_set = RenderSet.open(root)
            runs = []
            for _ in range(args.repeats + 1):
                clock = time.perf_counter()
                load_views(render_set, ("lh", "bc"), with_depth=True)
                runs.append(time.perf_counter() - clock)
            result["load_views_s"][frame_format] = {"median": statistics.median(runs[1:]), "runs": runs[1:]}
            print(frame_format, f"{statistics.median(runs[1:]):.3f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


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
    parser.add_argument("--frame-formats", nargs="+", choices=FRAME_FORMATS, default=["npy"])
    parser.add_argument("--read-only", action="store_true",
                        help="time only reading the views, the step's CPU part (no models, any machine)")
    args = parser.parse_args()
    if args.read_only:
        read_only(args)
        return
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_random_dinov2(tmp / "dinov2", seed=0)
        save_slat_encoder(build_random_slat_encoder(SlatEncoderConfig(), seed=0), tmp / "slat.safetensors")
        encoder = AssetEncoder(
            AssetEncoderConfig(
                dinov2=Dinov2Config(model=str(tmp / "dinov2")), slat_encoder=str(tmp / "slat.safetensors")
            ),
            device=device,
        )
        formats = {}
        for frame_format in args.frame_formats:
            root = tmp / frame_format
            write_lh_render_set(root, views=args.views, size=args.size, triangles=args.triangles,
                                frame_format=frame_format)
            encoder.encode(root)  # warm-up: compiles the fused LayerNorm, loads kernels, reads the files once
            runs = []
            for _ in range(args.repeats):
                clock = time.perf_counter()
                encoding = encoder.encode(root)
                runs.append({"wall_s": time.perf_counter() - clock, **encoding.meta["timings"]})
            median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            formats[frame_format] = {"median_s": median, "runs": runs}
            print(json.dumps({"frame_format": frame_format, "voxels": len(encoding.coords),
                              **{k: round(v, 3) for k, v in median.items()}}), flush=True)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "torch": torch.__version__,
        "views_per_role": args.views,
        "size_px": args.size,
        "voxels": len(encoding.coords),
        "frame_formats": formats,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
