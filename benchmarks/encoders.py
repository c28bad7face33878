"""Encoder benchmarks: voxelization, DINOv2 throughput, back-projection, SLAT encoder (issue acceptance 5).

    python benchmarks/encoders.py --out benchmarks/results/encoders_cpu.json              # this machine
    python benchmarks/encoders.py --device cuda --out benchmarks/results/encoders_h100.json

Models have the real architectures with random weights (the throughput does not depend on the values):
DINOv2 ViT-L/14 with registers at 518^2 and the released SLAT encoder configuration. Times are medians of
`--repeats` runs after one warm-up run; CUDA timings synchronize before reading the clock.
"""

import argparse
import functools
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoders.attention import AttentionBackend
from encoders.backproject import BackprojectConfig, Cameras, backproject
from encoders.dinov2 import Dinov2Config, Dinov2Features, save_random_dinov2
from encoders.slat_encoder import SlatEncoderConfig, build_random_slat_encoder
from encoders.sparse import SparseTensor
from encoders.voxelize import voxelize_mesh
from infra.errors import ConfigError
from render_jobs.views import hammersley_views


def torus_mesh(
    num_triangles: int, *, major: float = 0.3, minor: float = 0.15
) -> tuple[np.ndarray, np.ndarray]:
    """A closed torus in [-0.5, 0.5]^3 with about `num_triangles` triangles: vertices (V, 3), faces (F, 3)."""
    rings = max(3, round(math.sqrt(num_triangles / 4)))  # around the tube
    segments = 2 * rings  # around the axis
    u, v = np.meshgrid(
        np.linspace(0, 2 * np.pi, segments, endpoint=False),
        np.linspace(0, 2 * np.pi, rings, endpoint=False),
        indexing="ij",
    )
    vertices = np.stack(
        [(major + minor * np.cos(v)) * np.cos(u), (major + minor * np.cos(v)) * np.sin(u), minor * np.sin(v)],
        -1,
    )
    i, j = np.meshgrid(np.arange(segments), np.arange(rings), indexing="ij")
    a, b = i * rings + j, ((i + 1) % segments) * rings + j
    c, d = ((i + 1) % segments) * rings + (j + 1) % rings, i * rings + (j + 1) % rings
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    return vertices.reshape(-1, 3).astype(np.float32), faces.astype(np.int32)


def _timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` calls after one warm-up call, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device, fn) -> float:
    """Peak extra device memory of `fn` above what was allocated before it (CUDA), in MiB."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def bench_voxelize(device: torch.device, sizes: list[int], repeats: int) -> list[dict]:
    rows = []
    for size in sizes:
        vertices, faces = torus_mesh(size)
        mesh = torch.from_numpy(vertices).to(device), torch.from_numpy(faces).to(device)
        seconds, coords = _timed(functools.partial(voxelize_mesh, *mesh), device, repeats)
        rows.append({"triangles": len(faces), "voxels": len(coords), "seconds": seconds})
        print(
            f"voxelize {len(faces):>9,} triangles -> {len(coords):,} voxels: {seconds * 1e3:.1f} ms",
            flush=True,
        )
    return rows


def bench_dinov2(device: torch.device, batch_sizes: list[int], batches: int) -> list[dict]:
    """The extractor (fused pass) per batch size, beside transformers' own module on the same weights."""
    with tempfile.TemporaryDirectory() as tmp:
        model = str(Path(tmp) / "vitl14-reg")
        save_random_dinov2(model, seed=0)
        return [_bench_dinov2_once(model, device, b, batches) for b in batch_sizes]


def _bench_dinov2_once(model: str, device: torch.device, batch_size: int, batches: int) -> dict:
    from transformers import Dinov2WithRegistersModel

    extractor = Dinov2Features(Dinov2Config(model=model, batch_size=batch_size), device=device)
    views = torch.rand(batch_size * batches, 4, 512, 512, device=device, dtype=torch.float16)
    pixels = extractor.preprocess(views[:batch_size])
    reference = Dinov2WithRegistersModel.from_pretrained(model, dtype=extractor.dtype).eval().to(device)

    def network(forward) -> None:
        for _ in range(batches):
            forward(pixels)

    with torch.inference_mode():
        net_s, _ = _timed(functools.partial(network, extractor.tokens), device, repeats=3)
        ref_s, _ = _timed(
            functools.partial(network, lambda x: reference.encoder(reference.embeddings(x))),
            device,
            repeats=3,
        )
    total_s, tokens = _timed(functools.partial(extractor, views), device, repeats=3)
    peak = _peak_mb(device, functools.partial(extractor, views[:batch_size]))
    row = {
        "batch_size": batch_size,
        "dtype": str(extractor.dtype).removeprefix("torch."),
        "network_img_per_s": batch_size * batches / net_s,
        "transformers_module_img_per_s": batch_size * batches / ref_s,
        "with_preprocess_img_per_s": len(views) / total_s,
        "peak_mb_per_batch": peak,
        "tokens_shape": list(tokens.shape[1:]),
    }
    print(
        f"dinov2 batch {batch_size}: {row['network_img_per_s']:.1f} img/s network "
        f"(transformers' module {row['transformers_module_img_per_s']:.1f}), "
        f"{row['with_preprocess_img_per_s']:.1f} img/s with preprocessing, peak {peak:.0f} MiB",
        flush=True,
    )
    return row


def _surface_coords(num_voxels: int, device: torch.device) -> torch.Tensor:
    """`num_voxels` contiguous surface voxels (in grid order) of a sphere of radius 0.49 around a torus: real
    window occupancy for attention, about as many voxels as a large asset."""
    meshes = [torus_mesh(200_000, major=0.0, minor=0.49), torus_mesh(200_000, major=0.3, minor=0.12)]
    vertices = np.concatenate([meshes[0][0], meshes[1][0]])
    faces = np.concatenate([meshes[0][1], meshes[1][1] + len(meshes[0][0])])
    coords = voxelize_mesh(torch.from_numpy(vertices), torch.from_numpy(faces))
    return coords[:num_voxels].to(device)


def bench_backproject(device: torch.device, num_voxels: int, num_views: int, repeats: int) -> dict:
    coords = _surface_coords(num_voxels, device)
    views = hammersley_views(num_views, rng=np.random.default_rng(0))  # the lh rig
    cameras = Cameras.from_blender(
        np.stack([v.c2w for v in views]), np.array([v.fov_rad for v in views]), device=device
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    maps = torch.randn(num_views, 1024, 37, 37, device=device, dtype=dtype)
    seconds, _feats = _timed(
        lambda: backproject(maps, coords, cameras, config=BackprojectConfig()), device, repeats
    )
    peak = _peak_mb(device, lambda: backproject(maps, coords, cameras, config=BackprojectConfig()))
    row = {
        "voxels": len(coords),
        "views": num_views,
        "channels": 1024,
        "seconds": seconds,
        "peak_mb": peak,
        "feature_maps_mb": maps.numel() * maps.element_size() / 2**20,
    }
    print(
        f"backproject {len(coords):,} voxels x {num_views} views x 1024: {seconds * 1e3:.1f} ms, peak {peak:.0f} MiB "
        f"(+ {row['feature_maps_mb']:.0f} MiB of feature maps)",
        flush=True,
    )
    return row


def bench_slat(
    device: torch.device, num_voxels: int, backends: list[AttentionBackend], repeats: int
) -> list[dict]:
    coords = torch.nn.functional.pad(_surface_coords(num_voxels, device), (1, 0))
    feats = torch.randn(len(coords), 1024, device=device)
    rows = []
    for backend in backends:
        model = build_random_slat_encoder(SlatEncoderConfig(attention_backend=backend), seed=0).to(device)
        if device.type == "cpu":
            model.blocks.float()  # CPU half matmuls are slow: what load_slat_encoder does on the CPU
        try:
            with torch.inference_mode():
                seconds, _ = _timed(functools.partial(model, SparseTensor(coords, feats)), device, repeats)
        except ConfigError as err:  # a backend that cannot run here is reported, not fatal
            rows.append({"backend": backend, "error": f"{type(err).__name__}: {err}"})
            print(f"slat encoder {backend}: unavailable ({err})", flush=True)
            continue
        rows.append({"backend": backend, "voxels": len(coords), "seconds": seconds})
        print(f"slat encoder {backend}: {len(coords):,} voxels in {seconds * 1e3:.1f} ms", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="*", default=["voxelization", "dinov2", "backproject", "slat"])
    parser.add_argument("--triangles", type=int, nargs="*", default=[10_000, 1_000_000, 5_000_000])
    parser.add_argument(
        "--batch-sizes", type=int, nargs="*", default=None, help="DINOv2 [cpu: 2; cuda: 32 64 128]"
    )
    parser.add_argument(
        "--batches", type=int, default=None, help="DINOv2 batches per timing [cpu: 1; cuda: 8]"
    )
    parser.add_argument("--voxels", type=int, default=20_000)
    parser.add_argument("--views", type=int, default=150)
    parser.add_argument(
        "--backends",
        nargs="*",
        default=None,
        help="SLAT attention [cpu: sdpa; cuda: sdpa torch_varlen flash_attn]",
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    is_cuda = device.type == "cuda"
    if is_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    results = {
        "device": torch.cuda.get_device_name(device)
        if is_cuda
        else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if "voxelization" in args.only:
        results["voxelization"] = bench_voxelize(device, args.triangles, args.repeats)
    if "dinov2" in args.only:
        results["dinov2"] = bench_dinov2(
            device,
            args.batch_sizes or ([32, 64, 128] if is_cuda else [2]),
            args.batches or (8 if is_cuda else 1),
        )
    if "backproject" in args.only:
        results["backproject"] = bench_backproject(device, args.voxels, args.views, args.repeats)
    if "slat" in args.only:
        backends = args.backends or (["sdpa", "torch_varlen", "flash_attn"] if is_cuda else ["sdpa"])
        results["slat_encoder"] = bench_slat(device, args.voxels, backends, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
