"""Stage 2 on one GPU: the rasterizer backends against each other, the paper-size decoder's training step and
frame rate, and overfitting one factory-rendered asset.

    python benchmarks/stage2.py rasterizer --out benchmarks/results/stage2_rasterizer_h100.json
    python benchmarks/stage2.py decoder --out benchmarks/results/stage2_decoder_h100.json
    python benchmarks/stage2.py overfit --data-root DIR --release NAME --env-maps DIR --held-out MAP.exr \
        --out benchmarks/results/stage2_overfit_h100.json
    python benchmarks/stage2.py speed --out benchmarks/results/stage2_speed_h100.json
    python benchmarks/stage2.py speed --tiny --device cpu --out /tmp/stage2_speed_cpu.json   # a check, not a number

`decoder` builds the paper's model (12 + 6 blocks of width 768, 16 registers, 4096 lighting tokens, 32
Gaussians per voxel) with random weights (the time and memory of a step do not depend on them) and measures,
per per-GPU batch of objects of `--voxels` voxels rendered at 512^2, the step time and peak memory up to the
largest batch that fits, then the time to render one view under one lighting of a decoded object.

`speed` measures the fast paths in one run, each against today's path on the same GPU and weights (paper-size
model, random weights, bf16): the frame rate of one view under one lighting of a decoded object (`--voxels` voxels,
32 Gaussians each, `--size`^2), a new camera every frame, with every switch off (before), each alone and all on
(after); then training samples/s per per-GPU batch, before (one frame per asset, plain paths) and after
(`--frames-per-asset` frames per asset, fast paths), without and with gradient checkpointing. `--tiny` runs the
same on the CPU demo model in seconds, to check the code before spending GPU time.
"""

import argparse
import dataclasses
import gc
import importlib.metadata
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.stage1 import surface_coords
from encoders.sparse import SparseTensor
from pipelines.demo import DEMO_STAGE2_MODEL
from render_jobs.cameras import opencv_intrinsics, opencv_w2c
from tests.training.test_stage2_parts import random_scene
from training.stage2.agx import AgX
from training.stage2.envmap import encode_env_map
from training.stage2.losses import LossWeights, Stage2Target, stage2_losses
from training.stage2.model import (
    Stage2Inputs,
    Stage2Model,
    Stage2ModelConfig,
    ViewRenderer,
    ViewRendererConfig,
    take,
)
from training.stage2.rasterizer import Camera, rasterize

PAPER = "NeAR paper: 500K iterations of batch 48 on 4 H100s in about 10 days; decoder at 30 FPS"


def _device_info() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)"
    try:
        gsplat = importlib.metadata.version("gsplat")
    except importlib.metadata.PackageNotFoundError:
        gsplat = None
    return {"gpu": gpu, "torch": torch.__version__, "gsplat": gsplat, "python": platform.python_version(),
            "machine": platform.node(), "command": " ".join(sys.argv)}  # fmt: skip


def rasterizer(args: argparse.Namespace) -> dict[str, Any]:
    """Max |gsplat - torch| over random scenes (features up to 4), and gsplat's time at 512^2."""
    scenes = []
    for seed in range(args.scenes):
        splats = random_scene(args.gaussians, seed=seed, device="cuda")
        K = torch.tensor(opencv_intrinsics(0.7, args.size), dtype=torch.float32, device="cuda")
        camera = Camera(w2c=torch.eye(4, device="cuda"), K=K, width=args.size, height=args.size)
        fast, fast_alpha = rasterize(splats, camera, backend="gsplat")
        reference, reference_alpha = rasterize(splats, camera, backend="torch")
        scenes.append({
            "seed": seed,
            "max_abs_diff_features": (fast - reference).abs().max().item(),
            "max_abs_diff_alpha": (fast_alpha - reference_alpha).abs().max().item(),
            "mean_alpha": reference_alpha.mean().item(),
        })  # fmt: skip
    worst = max(max(s["max_abs_diff_features"], s["max_abs_diff_alpha"]) for s in scenes)
    return {"gaussians": args.gaussians, "image_px": args.size, "channels": 9, "scenes": scenes,
            "max_abs_diff": worst, "tolerance": 1e-3, "agree": worst < 1e-3}  # fmt: skip


def _inputs(
    model: Stage2ModelConfig, objects: int, voxels: int, size: int
) -> tuple[Stage2Inputs, Stage2Target]:
    device = torch.device("cuda")
    coords = surface_coords(voxels, objects).to(device)
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[1, 3] = -2.0  # 2 units in front of the object, looking along +y (Blender camera: -z forward)
    c2w[:3, :3] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    w2c = torch.tensor(opencv_w2c(c2w.numpy()), dtype=torch.float32, device=device)
    K = torch.tensor(opencv_intrinsics(0.698, size), dtype=torch.float32, device=device)
    maps = torch.rand(objects, 3, *model.tokenizer.map_size, device=device)
    inputs = Stage2Inputs(
        slat=SparseTensor(coords, torch.randn(len(coords), model.decoder.input_channels, device=device)),
        sample_asset=torch.arange(objects, device=device),
        w2c=w2c.expand(objects, 4, 4), K=K.expand(objects, 3, 3),
        env_ldr=maps, env_log=maps, env_dir=torch.nn.functional.normalize(maps - 0.5, dim=1),
        image_size=(size, size),
    )  # fmt: skip
    image = torch.rand(objects, size, size, 1, device=device)
    target = Stage2Target(
        image.expand(-1, -1, -1, 3), image, image.expand(-1, -1, -1, 3), image, image, image,
        torch.ones(objects, device=device),
    )
    return inputs, target


def _step_time(
    model: Stage2Model, inputs: Stage2Inputs, target: Stage2Target, steps: int
) -> tuple[float, float]:
    agx = AgX.from_simple_ocio().cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            render = model(inputs)
        loss = stage2_losses(render, target, agx=agx, lpips=None, weights=LossWeights())["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30


@torch.no_grad()
def _frame_time(model: Stage2Model, inputs: Stage2Inputs, repeats: int = 20) -> dict[str, float]:
    """One view under one lighting of an object already decoded (intrinsic pass cached), and the intrinsic
    pass itself, in bf16."""
    timings: dict[str, list[float]] = {"intrinsic_s": [], "view_s": []}
    for _ in range(repeats + 3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            torch.cuda.synchronize()
            start = time.perf_counter()
            features, registers, gaussians = model.decode_intrinsic(inputs.slat)
            torch.cuda.synchronize()
            middle = time.perf_counter()
            gather, rows, lighting = model.decode_lighting(inputs, features, registers)
            model.render(inputs, take(gaussians, gather), lighting, rows)
            torch.cuda.synchronize()
        timings["intrinsic_s"].append(middle - start)
        timings["view_s"].append(time.perf_counter() - middle)
    median = {k: sorted(v[3:])[len(v[3:]) // 2] for k, v in timings.items()}
    return {**{k: round(v, 5) for k, v in median.items()}, "view_fps": round(1 / median["view_s"], 1),
            "full_decode_fps": round(1 / (median["intrinsic_s"] + median["view_s"]), 1)}  # fmt: skip


def decoder(args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for checkpointing in (False, True):
        config = Stage2ModelConfig()
        config = config.replace(decoder=config.decoder.replace(gradient_checkpointing=checkpointing))
        model = Stage2Model(config).cuda().train()
        for batch in args.batches:
            try:
                inputs, target = _inputs(config, batch, args.voxels, args.size)
                step_s, memory = _step_time(model, inputs, target, args.steps)
            except torch.OutOfMemoryError:
                runs.append(
                    {"gradient_checkpointing": checkpointing, "batch": batch, "result": "out of memory"}
                )
                break
            finally:
                inputs = target = None
                torch.cuda.empty_cache()
            runs.append({"gradient_checkpointing": checkpointing, "batch": batch, "step_s": round(step_s, 4),
                         "samples_per_s": round(batch / step_s, 2), "peak_memory_gib": round(memory, 2)})  # fmt: skip
            print(runs[-1], flush=True)
        del model
        torch.cuda.empty_cache()
    model = Stage2Model(Stage2ModelConfig()).cuda().eval()
    parameters = {
        name: sum(p.numel() for p in module.parameters()) for name, module in model.named_children()
    }
    inputs, _ = _inputs(model.config, 1, args.voxels, args.size)
    return {"voxels_per_object": args.voxels, "image_px": args.size, "parameters": parameters,
            "parameters_total": sum(parameters.values()), "steps": runs,
            "frame": _frame_time(model, inputs), "paper": PAPER}  # fmt: skip

SWITCHES = ("batched_cross_attention", "batched_rasterizer", "reuse_map_features", "cuda_graph")
"""Every fast path's switch: the first two in `Stage2ModelConfig`, the last two in `ViewRendererConfig`."""


def _switched(config: Stage2ModelConfig, on: set[str]) -> Stage2ModelConfig:
    decoder = config.decoder.replace(batched_cross_attention="batched_cross_attention" in on)
    return config.replace(decoder=decoder, batched_rasterizer="batched_rasterizer" in on)


def _turntable(
    config: Stage2ModelConfig, assets: int, frames_per_asset: int, voxels: int, size: int, device: torch.device
) -> Stage2Inputs:  # fmt: skip
    """`assets` objects of `voxels` voxels, each in `frames_per_asset` frames: sample s seen by a camera 2 units
    away at yaw 2 pi s / S, under its own random map, E_dir in that camera's frame."""
    samples = assets * frames_per_asset
    generator = torch.Generator().manual_seed(0)
    # the Blender camera at y = -2 looking along +y (its -z), turned about z
    base = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, -2.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    encodings, w2cs = [], []
    for s in range(samples):
        yaw = 2 * math.pi * s / samples
        turn = torch.eye(4)
        turn[:2, :2] = torch.tensor([[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]])
        c2w = turn @ base
        hdr = torch.rand(*config.tokenizer.map_size, 3, generator=generator) * 4
        encodings.append(encode_env_map(hdr, yaw_rad=0.0, c2w=c2w))
        w2cs.append(torch.tensor(opencv_w2c(c2w.double().numpy()), dtype=torch.float32))
    coords = surface_coords(voxels, assets)
    K = torch.tensor(opencv_intrinsics(0.698, size), dtype=torch.float32)
    inputs = Stage2Inputs(
        slat=SparseTensor(coords, torch.randn(len(coords), config.decoder.input_channels, generator=generator)),
        sample_asset=torch.arange(assets).repeat_interleave(frames_per_asset), w2c=torch.stack(w2cs),
        K=K.expand(samples, 3, 3).contiguous(), env_ldr=torch.stack([e.ldr for e in encodings]),
        env_log=torch.stack([e.log for e in encodings]), env_dir=torch.stack([e.direction for e in encodings]),
        image_size=(size, size),
    )  # fmt: skip
    return inputs.to(device)


def _build(config: Stage2ModelConfig, device: torch.device) -> Stage2Model:
    """Seeded random weights, initialised on the device itself (fast for 253M parameters)."""
    torch.manual_seed(0)
    with device:
        return Stage2Model(config)


def _timed(fn: Callable[[int], Any], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median seconds of `fn(i)` over `repeats` calls after `warmup`."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


@torch.no_grad()
def _view_fps(
    config: Stage2ModelConfig, on: set[str], views: Stage2Inputs, device: torch.device, repeats: int
) -> dict[str, Any]:  # fmt: skip
    """Frames per second of one view under one lighting of a decoded object, a new camera every frame (a turntable
    of the views in `views`). Without `ViewRenderer`'s switches this is today's path: `decode_intrinsic` once, then
    `decode_lighting` and `render` per frame."""
    model = _build(_switched(config, on), device).eval()
    count = views.w2c.shape[0]

    def view(i: int) -> Stage2Inputs:
        one = slice(i % count, i % count + 1)
        per_sample = ("sample_asset", "w2c", "K", "env_ldr", "env_log", "env_dir")
        return dataclasses.replace(views, **{name: getattr(views, name)[one] for name in per_sample})

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        first = view(0)
        if on & {"reuse_map_features", "cuda_graph"}:
            renderer_config = ViewRendererConfig(
                reuse_map_features="reuse_map_features" in on, cuda_graph="cuda_graph" in on
            )
            renderer = ViewRenderer(model, first.slat, first.sample_asset, first.env_ldr, first.env_log,
                                    config=renderer_config)  # fmt: skip

            def frame(i: int) -> None:
                inputs = view(i)
                renderer(inputs.w2c, inputs.K, inputs.env_dir, inputs.image_size)
        else:
            features, registers, gaussians = model.decode_intrinsic(first.slat)

            def frame(i: int) -> None:
                inputs = view(i)
                gather, groups, lighting = model.decode_lighting(inputs, features, registers)
                model.render(inputs, take(gaussians, gather), lighting, groups)

        seconds = _timed(frame, device, repeats)
    del model
    _free(device)
    return {"switches_on": sorted(on), "view_ms": round(1000 * seconds, 2), "fps": round(1 / seconds, 1)}


def _train_rate(
    config: Stage2ModelConfig, on: set[str], *, batch: int, frames_per_asset: int, checkpointing: bool, voxels: int,
    size: int, steps: int, device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    config = _switched(config, on)
    config = config.replace(decoder=config.decoder.replace(gradient_checkpointing=checkpointing))
    row = {"batch": batch, "frames_per_asset": frames_per_asset, "gradient_checkpointing": checkpointing,
           "switches_on": sorted(on)}  # fmt: skip
    model = inputs = None
    try:
        model = _build(config, device).train()
        inputs = _turntable(config, batch // frames_per_asset, frames_per_asset, voxels, size, device)
        row.update(_train_steps(model, inputs, device, steps))
    except torch.OutOfMemoryError:
        row["result"] = "out of memory"
    finally:
        del model, inputs
        _free(device)
    print(row, flush=True)
    return row


def _train_steps(model: Stage2Model, inputs: Stage2Inputs, device: torch.device, steps: int) -> dict[str, Any]:
    agx = AgX.from_simple_ocio().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    samples, (height, width) = inputs.w2c.shape[0], inputs.image_size
    image = torch.rand(samples, height, width, 1, device=device)
    target = Stage2Target(image.expand(-1, -1, -1, 3), image, image.expand(-1, -1, -1, 3), image, image, image,
                          torch.ones(samples, device=device))  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step(i: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            render = model(inputs)
        loss = stage2_losses(render, target, agx=agx, lpips=None, weights=LossWeights(),
                             generator=torch.Generator().manual_seed(i))["total"]  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    seconds = _timed(step, device, steps, warmup=2)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"step_s": round(seconds, 4), "samples_per_s": round(samples / seconds, 2),
            "peak_memory_gib": None if memory is None else round(memory, 2)}  # fmt: skip


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def speed(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.tiny:
        config = Stage2ModelConfig.from_dict(DEMO_STAGE2_MODEL)
        voxels, size, repeats, steps, batches = 300, 48, 5, 3, {False: [4], True: [4]}
    else:
        config = Stage2ModelConfig()
        voxels, size, repeats, steps = args.voxels, args.size, args.repeats, args.steps
        batches = {False: args.batches, True: args.checkpointed_batches}
    views = _turntable(config, 1, 8, voxels, size, device)  # one object seen by 8 cameras, each under its own map
    views = dataclasses.replace(views, sample_asset=torch.zeros_like(views.sample_asset))
    variants = {"before": set(), **{name: {name} for name in SWITCHES}, "after": set(SWITCHES)}
    frame = {}
    for name, on in variants.items():
        frame[name] = _view_fps(config, on, views, device, repeats)
        print(name, frame[name], flush=True)
    training = [
        _train_rate(config, on, batch=batch, frames_per_asset=k, checkpointing=checkpointing, voxels=voxels,
                    size=size, steps=steps, device=device)
        for checkpointing, sizes in batches.items() for batch in sizes
        for on, k in ((set(), 1), (set(SWITCHES[:2]), args.frames_per_asset)) if batch % k == 0
    ]  # fmt: skip
    return {"model": "demo (tiny)" if args.tiny else "paper", "device": str(device), "voxels_per_object": voxels,
            "gaussians_per_voxel": config.heads.gaussians_per_voxel, "image_px": size,
            "env_map_px": list(config.tokenizer.map_size), "precision": "bf16" if device.type == "cuda" else "float32",
            "frame": frame, "frame_speedup": round(frame["after"]["fps"] / frame["before"]["fps"], 2),
            "training": training, "paper": PAPER}  # fmt: skip


def overfit(args: argparse.Namespace) -> dict[str, Any]:
    from training.run import step_batches
    from training.stage2.config import Stage2Config
    from training.stage2.trainer import Stage2Trainer

    config = Stage2Config.from_dict({
        "data_root": args.data_root, "release": args.release, "out_dir": args.run_dir,
        "env_maps": [args.env_maps], "held_out_env_maps": [args.held_out], "val_split": "none",
        "model": json.loads(Path(args.model).read_text()) if args.model else {},
        "steps": args.steps, "batch_size": args.batch, "lr": args.lr, "warmup_steps": args.warmup,
        "ema_decay": 0.0, "data_workers": 4, "log_every": 50, "val_every": args.steps, "image_every": 10**9,
        "checkpoint_every": args.steps, "val_samples": 64, "use_gpu": torch.cuda.is_available(),
    })  # fmt: skip
    trainer = Stage2Trainer(config, device=torch.device("cuda" if config.use_gpu else "cpu"))
    train_indices = list(range(len(trainer.train_data)))
    curve, start = [], time.perf_counter()

    def evaluate() -> dict[str, Any]:
        trainer.model.eval()
        point = {"step": trainer.step, "seconds": round(time.perf_counter() - start, 1)}
        point.update(
            {
                f"train_{k}": round(v, 4)
                for k, v in trainer.evaluate(trainer.train_data, train_indices).items()
            }
        )
        held_out = trainer.val_sets["held_out_env"]
        point.update(
            {
                f"held_out_{k}": round(v, 4)
                for k, v in trainer.evaluate(held_out, list(range(len(held_out)))).items()
            }
        )
        trainer.model.train()
        print(point, flush=True)
        return point

    losses = []
    batches = iter(
        torch.utils.data.DataLoader(
            step_batches(trainer), batch_size=None, num_workers=4, prefetch_factor=4
        )
    )
    while trainer.step < config.steps:
        losses.append(trainer.train_step(next(batches))["total"])
        if trainer.step % args.eval_every == 0 or trainer.step == config.steps:
            curve.append({**evaluate(), "loss": round(sum(losses[-50:]) / len(losses[-50:]), 5)})
            args.out.write_text(
                json.dumps({"partial": True, "curve": curve}, indent=2) + "\n"
            )  # kept if cut short
    return {"release": args.release, "training_frames": len(trainer.train_data),
            "held_out_env_map": args.held_out, "held_out_frames": len(trainer.val_sets["held_out_env"]),
            "model": config.model.to_dict(), "steps": config.steps, "batch": config.batch_size, "lr": config.lr,
            "seconds": round(time.perf_counter() - start, 1), "curve": curve, "final": curve[-1],
            "parameters": trainer.num_parameters}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    raster = commands.add_parser("rasterizer")
    raster.add_argument("--scenes", type=int, default=8)
    raster.add_argument("--gaussians", type=int, default=2000)
    raster.add_argument("--size", type=int, default=64)
    dec = commands.add_parser("decoder")
    dec.add_argument("--voxels", type=int, default=16384)
    dec.add_argument("--size", type=int, default=512)
    dec.add_argument("--steps", type=int, default=5)
    dec.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 6, 8, 12, 16, 24])
    fast = commands.add_parser("speed")
    fast.add_argument("--device", default="cuda")
    fast.add_argument("--tiny", action="store_true", help="the demo model at CPU sizes: checks that the code runs")
    fast.add_argument("--voxels", type=int, default=16384)
    fast.add_argument("--size", type=int, default=512)
    fast.add_argument("--repeats", type=int, default=20)
    fast.add_argument("--steps", type=int, default=5)
    fast.add_argument("--frames-per-asset", type=int, default=4)
    fast.add_argument("--batches", type=int, nargs="+", default=[4, 8], help="per GPU, without checkpointing")
    fast.add_argument("--checkpointed-batches", type=int, nargs="+", default=[12, 24])
    fit = commands.add_parser("overfit")
    fit.add_argument("--data-root", required=True)
    fit.add_argument("--release", required=True)
    fit.add_argument("--env-maps", required=True)
    fit.add_argument("--held-out", required=True)
    fit.add_argument("--model", help="JSON file of the model config (default: the paper's)")
    fit.add_argument("--run-dir", default="/tmp/stage2-overfit")
    fit.add_argument("--steps", type=int, default=3000)
    fit.add_argument("--batch", type=int, default=8)
    fit.add_argument("--lr", type=float, default=5e-4)
    fit.add_argument("--warmup", type=int, default=100)
    fit.add_argument("--eval-every", type=int, default=500)
    for command in (raster, dec, fast, fit):
        command.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = {"benchmark": f"stage2 {args.command}", **_device_info(), **globals()[args.command](args)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("curve", "scenes", "model")}, indent=2))


if __name__ == "__main__":
    main()
