"""Train Stage 2 on one GPU from a factory-built release, then evaluate it with `near eval`, on the test split
and on the train split: the numbers in docs/benchmarks.md, "Evaluation".

    python benchmarks/evaluation.py --data-root /tmp/acc5/data --release eval-h100 --stage1 /tmp/acc5/stage1 \
        --model benchmarks/stage2_overfit_model.json --seconds 330 --out results.tar

The Stage 2 trainer runs in this process (no Ray Train), for `--seconds` of training after its first step (which
JIT-builds gsplat), then checkpoints; `near eval` then scores the test split (every task) and the train split
(forward rendering) under the release's held-out maps. The result is one tar: the training curve, both
evaluations' metrics.json, metrics.csv, report.html and images.
"""

import argparse
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's packages before benchmarks/catalogs.py

from training.run import step_batches  # noqa: E402
from training.stage2.config import Stage2Config  # noqa: E402
from training.stage2.trainer import Stage2Trainer  # noqa: E402


def train(args: argparse.Namespace, run_dir: Path) -> dict:
    config = Stage2Config.from_dict({
        "data_root": str(args.data_root), "release": args.release, "out_dir": str(run_dir),
        "model": json.loads(args.model.read_text()), "steps": 10**6, "batch_size": args.batch, "lr": args.lr,
        "warmup_steps": args.warmup, "ema_decay": args.ema, "data_workers": 4, "val_split": "train",
        "val_every": 10**9, "checkpoint_every": 10**9, "image_every": 10**9, "log_every": 10**9,
        "use_gpu": torch.cuda.is_available(),
    })  # fmt: skip
    trainer = Stage2Trainer(config, device=torch.device("cuda" if config.use_gpu else "cpu"))
    batches = iter(torch.utils.data.DataLoader(step_batches(trainer), batch_size=None, num_workers=4,
                                               prefetch_factor=4))
    curve, losses = [], []
    first = time.perf_counter()
    losses.append(trainer.train_step(next(batches))["total"])  # gsplat's JIT build happens here
    start = time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        losses.append(trainer.train_step(next(batches))["total"])
        if trainer.step % 100 == 0:
            curve.append({"step": trainer.step, "seconds": round(time.perf_counter() - start, 1),
                          "loss": round(sum(losses[-100:]) / len(losses[-100:]), 5)})
            print(curve[-1], flush=True)
    trainer.save_checkpoint()
    return {"steps": trainer.step, "first_step_s": round(start - first, 1),
            "train_s": round(time.perf_counter() - start, 1), "training_frames": len(trainer.train_data),
            "held_out_frames": len(trainer.val_sets["held_out_env"]) if "held_out_env" in trainer.val_sets else 0,
            "parameters": trainer.num_parameters, "model": config.model.to_dict(), "batch": args.batch,
            "lr": args.lr, "ema_decay": args.ema, "curve": curve, "device": torch.cuda.get_device_name()
            if torch.cuda.is_available() else "cpu"}  # fmt: skip


def evaluate(args: argparse.Namespace, run_dir: Path, split: str, tasks: str | None, out: Path) -> float:
    command = [sys.executable, "-m", "pipelines.cli", "eval", "--release", args.release, "--stage1",
               str(args.stage1), "--stage2", str(run_dir), "--split", split, "--out", str(out)]
    if tasks:
        command += ["--tasks", tasks]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return round(time.perf_counter() - start, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--release", required=True)
    parser.add_argument("--stage1", type=Path, required=True, help="A Stage 1 run folder (near eval needs one).")
    parser.add_argument("--model", type=Path, required=True, help="JSON of the Stage 2 model config.")
    parser.add_argument("--seconds", type=float, default=300.0, help="Training time after the first step.")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema", type=float, default=0.99)
    parser.add_argument("--work", type=Path, default=Path("/tmp/near-eval-benchmark"))
    parser.add_argument("--out", type=Path, required=True, help="The tar of everything.")
    args = parser.parse_args()
    run_dir = args.work / "stage2"
    result = {"release": args.release, "training": train(args, run_dir)}
    result["eval_seconds"] = {
        "test": evaluate(args, run_dir, "test", None, args.work / "eval-test"),
        "train": evaluate(args, run_dir, "train", "forward_rendering", args.work / "eval-train"),
    }
    (args.work / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    with tarfile.open(args.out, "w") as tar:
        for name in ("result.json", "eval-test", "eval-train"):
            tar.add(args.work / name, arcname=name)


if __name__ == "__main__":
    main()
