"""Stage 1 training step at the paper's size on one GPU, run as a Ray Train worker: the release-size flow model
(600M parameters, frozen, bfloat16) with rank-512 rsLoRA adapters, DINOv2 ViT-L/14-reg computing the image
condition inside the step, bf16 autocast, AdamW.

For each per-GPU batch (objects of `--voxels` active voxels each, 518^2 input images) it measures the step time,
samples per second and peak memory, up to the largest batch that fits (with and without gradient checkpointing
of the torso blocks). Weights are random (no download here): the time and memory of a step do not depend on
them.

    python benchmarks/stage1.py --out benchmarks/results/stage1_h100.json [--no-ray]
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoders.dinov2 import Dinov2Config, Dinov2Features, save_random_dinov2
from encoders.slat_flow import SlatFlowConfig, build_random_slat_flow
from encoders.sparse import SparseTensor
from training.stage1.model import LoraSettings, expected_trainable_parameters, stage1_model
from training.stage1.objective import rectified_flow_loss

PAPER_BUDGET = "about two days on 4 H100s (NeAR paper, Stage 1)"


def surface_coords(num_voxels: int, batch: int, *, grid: int = 64) -> torch.Tensor:
    """(batch * n, 4) int32: each object the `num_voxels` voxels nearest a sphere of radius 0.4 grid (a closed
    surface a few voxels thick, as voxelized assets are), batch index first."""
    axis = torch.arange(grid)
    xyz = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    distance = ((xyz.float() - grid / 2 + 0.5).norm(dim=1) - 0.4 * grid).abs()
    shell = xyz[distance.argsort()[:num_voxels]]
    shell = shell[torch.argsort((shell * torch.tensor([grid * grid, grid, 1])).sum(1))]
    batch_index = torch.arange(batch).repeat_interleave(num_voxels)[:, None]
    return torch.cat([batch_index, shell.repeat(batch, 1)], dim=1).to(torch.int32)


def measure(
    model: torch.nn.Module, dinov2: Dinov2Features, optimizer: torch.optim.Optimizer, *, batch: int,
    voxels: int, steps: int,
) -> dict[str, Any]:  # fmt: skip
    device = torch.device("cuda")
    coords = surface_coords(voxels, batch).to(device)
    x0 = SparseTensor(coords, torch.randn(len(coords), 8, device=device))
    shaded = torch.randn(len(coords), 8, device=device)
    images = torch.rand(batch, 4, 518, 518, device=device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        cond = dinov2.condition(images).clone()
        loss = rectified_flow_loss(model, x0, shaded, cond, generator, autocast=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        torch.cuda.synchronize()
        if step >= 2:  # the first steps allocate and autotune
            times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    return {
        "batch": batch,
        "voxels_per_object": voxels,
        "step_s": round(step_s, 4),
        "samples_per_s": round(batch / step_s, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "loss": round(loss.item(), 4),
    }


def run(settings: dict[str, Any]) -> dict[str, Any]:
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda")
    with tempfile.TemporaryDirectory() as folder:
        save_random_dinov2(Path(folder) / "dinov2", seed=0)
        dinov2 = Dinov2Features(Dinov2Config(model=str(Path(folder) / "dinov2")), device=device)
    results: dict[str, Any] = {"rows": []}
    for checkpointing in settings["checkpointing"]:
        flow = build_random_slat_flow(SlatFlowConfig(conv_backend="torch"), seed=0).to_torso_dtype(
            torch.bfloat16
        )
        flow.gradient_checkpointing = checkpointing
        lora = LoraSettings()
        results["trainable_parameters_expected"] = expected_trainable_parameters(flow, lora)
        model = stage1_model(flow, lora).to(device).train()
        results["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for batch in settings["batches"]:
            try:
                row = measure(
                    model, dinov2, optimizer, batch=batch, voxels=settings["voxels"], steps=settings["steps"]
                )
            except torch.OutOfMemoryError:
                results["rows"].append({"batch": batch, "gradient_checkpointing": checkpointing, "oom": True})
                break
            finally:
                torch.cuda.empty_cache()
            results["rows"].append({**row, "gradient_checkpointing": checkpointing})
            print(json.dumps(results["rows"][-1]), flush=True)
        del model, optimizer, flow
        torch.cuda.empty_cache()
    return results


def _ray_worker(settings: dict[str, Any]) -> None:
    """Runs in the Ray Train worker; imports this module by name there (the `__main__` copy does not pickle).
    The rows go back through a file: Ray Train 2's `Result.metrics` keeps only checkpointed reports."""
    from benchmarks.stage1 import run as run_in_worker

    Path(settings["rows_file"]).write_text(json.dumps(run_in_worker(settings)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--voxels", type=int, default=16384, help="active voxels per object (TRELLIS max 32768)"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16, 24, 32])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--checkpointing",
        choices=["off", "on", "both"],
        default="both",
        help="gradient checkpointing of the torso",
    )
    parser.add_argument(
        "--no-ray", action="store_true", help="run in this process instead of a Ray Train worker"
    )
    args = parser.parse_args()
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    settings = {"voxels": args.voxels, "batches": args.batches, "steps": args.steps, "checkpointing": modes}
    if args.no_ray:
        results, runner = run(settings), "this process"
    else:
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        ray.init(include_dashboard=False)
        rows_file = Path(tempfile.mkdtemp()) / "rows.json"
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={**settings, "rows_file": str(rows_file)},
            scaling_config=ScalingConfig(num_workers=1, use_gpu=True),
            run_config=RunConfig(name="stage1-benchmark", storage_path=str(Path(tempfile.mkdtemp()) / "ray")),
        )
        trainer.fit()
        results, runner = json.loads(rows_file.read_text()), "a Ray Train TorchTrainer worker (1 GPU)"
    fitting = [r for r in results["rows"] if not r.get("oom")]
    best = max(fitting, key=lambda r: r["samples_per_s"]) if fitting else None
    report = {
        "benchmark": "stage1_train_step",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor(),
        "torch": torch.__version__,
        "runner": runner,
        "model": "slat_flow_img_dit_L_64l8p2 (600,432,520 frozen, bf16) + rsLoRA r=512 on to_qkv/to_q/to_kv/to_out",
        "condition": "DINOv2 ViT-L/14-reg on 518^2 images, inside the step",
        **settings,
        **results,
        "best": best,
        "paper_budget": PAPER_BUDGET,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(best))


if __name__ == "__main__":
    main()
