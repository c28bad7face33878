"""What `near train` shows: the run folder and the TensorBoard command, a progress bar fed by rank 0, one line
per validation and a closing table; none of Ray's internal noise (issue: 184 `PlacementGroupCleaner` lines, a
`core_worker.cc` error and each logged step's metrics dict twice)."""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from pipelines.demo import DEMO_STAGE2_MODEL
from training.progress import TrainingProgress, summary_table
from training.run import RunFolder, StepProgress, TrainingConfig, train_loop

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.blender
def test_near_train_stage2_shows_progress_and_a_summary_without_ray_noise(
    tiny_release: dict[str, Path], tmp_path: Path
) -> None:
    config = {
        "data_root": str(tiny_release["data_root"]), "release": tiny_release["release"], "out_dir": "run-cli",
        "model": DEMO_STAGE2_MODEL, "steps": 4, "batch_size": 4, "lr": "1e-3", "warmup_steps": 5,
        "data_workers": 0, "val_split": "train", "val_samples": 4, "val_every": 4, "checkpoint_every": 4,
        "image_every": 2,
    }  # fmt: skip
    config_file = tmp_path / "stage2.yaml"
    config_file.write_text(yaml.safe_dump(config))
    completed = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "train", "stage2", "--release", config["release"],
         "--config", str(config_file)],
        check=False, capture_output=True, text=True, timeout=900, cwd=REPO,
        env={**os.environ, "RAY_ADDRESS": "local"},  # a fresh local cluster, as a user's first run starts
    )  # fmt: skip
    out, err = completed.stdout, completed.stderr
    assert completed.returncode == 0, err[-3000:]
    noise = ["PlacementGroupCleaner", "core_worker.cc", "Token authentication", "TrainingReport(", "'loss':"]
    assert [line for line in (out + err).splitlines() if any(n in line for n in noise)] == []
    run = (tmp_path / "run-cli").resolve()
    assert f"run folder: {run}\n" in err
    assert f"tensorboard --logdir {run / 'tensorboard'}\n" in err
    assert re.search(r"^stage2 step 4/4 validation: psnr [\d.]+ +ssim [\d.]+$", err, re.MULTILINE), err
    last_frame = r"^stage2 .*\b4/4 loss [\d.]+ [\d.]+ samples/s ETA"
    assert re.search(last_frame, err, re.MULTILINE), err
    assert "stage2 finished: step 4/4" in out and re.search(r"│ val_psnr +│ +[\d.]+ │", out), out
    assert f"checkpoint: {run / 'checkpoints' / 'step-00000004'}\n" in out
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [4] and "val_psnr" in metrics[0]  # a line per logged step
    assert any((run / "tensorboard").iterdir())


class _FakeData:
    def __len__(self) -> int:
        return 3

    def batch(self, indices: list[int]) -> list[int]:
        return indices


class _FakeTrainer:
    """What `train_loop` drives, without a model: the loss is 1 / step, validation gives the step."""

    def __init__(self, config: TrainingConfig, out_dir: Path, rank: int) -> None:
        self.config, self.step, self.rank, self.world_size, self.writer = config, 0, rank, 2, None
        self.train_data, self.run_folder = _FakeData(), RunFolder(out_dir, rank)

    def train_step(self, batch: Any) -> dict[str, float]:
        self.step += 1
        return {"loss": 1.0 / self.step}

    def validate(self) -> dict[str, float]:
        return {"psnr": float(self.step)}

    def save_checkpoint(self) -> Path | None:
        return self.run_folder.write_checkpoint(self.step, lambda folder: {}) if self.rank == 0 else None


class _Report:
    def __init__(self) -> None:
        self.logged: list[dict[str, Any]] = []
        self.steps: list[StepProgress] = []

    def __call__(self, metrics: dict[str, Any]) -> None:
        self.logged.append(metrics)

    def step_done(self, progress: StepProgress) -> None:
        self.steps.append(progress)


@pytest.mark.parametrize("rank", [0, 1])
def test_train_loop_tells_a_progress_report_of_every_step_on_rank_0_only(tmp_path: Path, rank: int) -> None:
    config = TrainingConfig(steps=5, batch_size=2, num_workers=2, data_workers=0, log_every=2, val_every=3,
                            checkpoint_every=4)  # fmt: skip
    report = _Report()
    trainer = _FakeTrainer(config, tmp_path, rank)
    train_loop(trainer, "stage0", trainer.train_step, report)
    assert [m["step"] for m in report.logged] == [2, 3, 4, 5]  # `report` as before: the logged steps
    if rank == 1:
        assert report.steps == []
        return
    assert [p.step for p in report.steps] == [1, 2, 3, 4, 5]
    validations = {p.step: p.validation for p in report.steps if p.validation}
    assert validations == {3: {"psnr": 3.0}, 5: {"psnr": 5.0}}
    assert {p.step: Path(p.checkpoint).name for p in report.steps if p.checkpoint} == {
        4: "step-00000004", 5: "step-00000005"
    }
    assert report.steps[0] == StepProgress("stage0", 1, 5, 2, {"loss": 1.0})


def test_train_loop_takes_a_plain_report(tmp_path: Path) -> None:
    config = TrainingConfig(steps=2, batch_size=1, data_workers=0, log_every=1, val_every=2)
    trainer, logged = _FakeTrainer(config, tmp_path, rank=0), []
    train_loop(trainer, "stage0", trainer.train_step, logged.append)
    assert [m["step"] for m in logged] == [1, 2] and logged[-1]["val_psnr"] == 2.0


def test_training_progress_shows_the_bar_validations_and_a_summary() -> None:
    output = io.StringIO()
    console = Console(file=output, width=120)
    with TrainingProgress(40, "stage2", samples_per_step=4, starting="starting", console=console) as bar:
        bar.update(10, {"loss": 0.57123}, status="ckpt 10")
        bar.validation(20, {"psnr": 10.0213, "ssim": 0.3581})
        bar.update(40, {"loss": 0.5})
    console.print(summary_table("stage2 finished: step 40/40 in 0:01:00", {"step": 40, "val_psnr": 10.0213}))
    lines = output.getvalue().splitlines()
    assert "stage2 step 20/40 validation: psnr 10.02  ssim 0.3581" in lines
    assert re.match(r"stage2 ━+ 40/40 loss 0.5 [\d.e+]+ samples/s ETA 0:00:00 ckpt 10", lines[1]), lines
    assert "stage2 finished: step 40/40 in 0:01:00" in lines[2]
    assert any(re.search(r"│ val_psnr +│ +10.02 │", line) for line in lines)
