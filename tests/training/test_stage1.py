"""Stage 1: the widened LoRA model, exact checkpoints and resume, and training on a factory-built release."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from encoders.slat_flow import SlatFlowConfig, SlatFlowModel, build_random_slat_flow
from encoders.sparse import SparseTensor
from tests.encoders.helpers import shell_coords
from training.run import CHECKPOINTS, LATEST
from training.stage1.config import Stage1Config
from training.stage1.model import LoraSettings, expected_trainable_parameters, stage1_model, velocity
from training.stage1.trainer import Stage1Trainer

TINY_FLOW = SlatFlowConfig(
    model_channels=48, cond_channels=24, num_blocks=2, num_heads=3, io_block_channels=(16,), use_fp16=False
)
TINY_LORA = LoraSettings(rank=8, alpha=8.0)


def _inputs(
    config: SlatFlowConfig, seed: int
) -> tuple[SparseTensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    coords = shell_coords([9.0, 6.0], grid=config.resolution)
    x = SparseTensor(coords, torch.randn(len(coords), 8, generator=generator))
    shaded = torch.randn(len(coords), 8, generator=generator)
    return (
        x,
        shaded,
        torch.tensor([300.0, 800.0]),
        torch.randn(2, 5, config.cond_channels, generator=generator),
    )


def test_release_size_trainable_parameters_are_the_lora_matrices_and_the_widened_input_layer() -> None:
    with torch.device("meta"):
        flow = SlatFlowModel(SlatFlowConfig())
    expected = expected_trainable_parameters(flow, LoraSettings())
    assert expected == 24 * 6_815_744 + 16 * 128 + 128 == 163_580_032
    model = stage1_model(flow, LoraSettings())
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    print(f"stage 1 trainable parameters: {sum(trainable.values()):,} (analytical {expected:,})")
    assert sum(trainable.values()) == expected
    assert all("lora_" in name or "input_layer.modules_to_save" in name for name in trainable)
    assert {name.split(".")[-4] for name in trainable if "lora_A" in name} == {
        "to_qkv",
        "to_q",
        "to_kv",
        "to_out",
    }
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) > 600_000_000  # the frozen base


def test_widened_model_equals_the_pretrained_one_at_step_zero() -> None:
    original = build_random_slat_flow(TINY_FLOW, seed=0).eval()
    x, shaded, t, cond = _inputs(TINY_FLOW, seed=1)
    with torch.no_grad():
        expected = original(x, t, cond).feats
        model = stage1_model(build_random_slat_flow(TINY_FLOW, seed=0).eval(), TINY_LORA)
        widened = velocity(model, x, shaded, t, cond).feats
    assert torch.equal(widened, expected)
    assert model.base_model.model.input_layer.in_features == 16


@pytest.fixture
def stage1_config(tiny_release: dict[str, Path], tmp_path: Path) -> Stage1Config:
    models = tiny_release["models"]
    return Stage1Config(
        data_root=str(tiny_release["data_root"]),
        release=tiny_release["release"],
        out_dir=str(tmp_path / "run"),
        base_model=str(models / "slat-flow-demo.safetensors"),
        dinov2=str(models / "dinov2-demo"),
        lora=LoraSettings(rank=16, alpha=16.0),
        steps=3,
        batch_size=2,
        lr=1e-3,
        ema_decay=0.9,
        val_split="train",
        log_every=1,
        val_every=1000,
        checkpoint_every=2,
    )


def test_checkpoints_round_trip_and_resume_reproduces_the_next_loss(stage1_config: Stage1Config) -> None:
    first = Stage1Trainer(stage1_config, device=torch.device("cpu"))
    losses = [first.train_step() for _ in range(2)]
    folder = first.save_checkpoint()
    next_loss = first.train_step()
    meta = json.loads((folder / "checkpoint.json").read_text())
    assert meta["release"]["name"] == stage1_config.release and len(meta["release"]["manifest_sha256"]) == 64
    assert meta["trainable_parameters"] == first.num_trainable and meta["step"] == 2

    resumed = Stage1Trainer(stage1_config, device=torch.device("cpu"))  # finds `latest` = step 2
    assert resumed.step == 2
    assert resumed.train_step() == next_loss, "the resumed run's next loss equals the uninterrupted run's"
    assert losses[0] != losses[1]

    # adapters: the resumed model at step 3 equals the original at step 3; merging changes nothing
    batch = first.train_data.batch([0, 1])
    cond = first.dinov2.condition(batch.images)
    t = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        a = velocity(first.model, batch.lh, batch.shaded, t, cond).feats
        b = velocity(resumed.model, batch.lh, batch.shaded, t, cond).feats
        merged = first.merged_model()
        m = merged(batch.lh.replace(feats=torch.cat([batch.lh.feats, batch.shaded], 1)), t, cond).feats
    assert torch.equal(a, b)
    assert type(merged) is SlatFlowModel and merged.input_layer.in_features == 16
    torch.testing.assert_close(m, a, rtol=1e-4, atol=1e-5)


def test_training_lowers_the_loss_and_beats_the_shaded_baseline(stage1_config: Stage1Config) -> None:
    """An overfit check on the training assets: the flow loss falls clearly, and LH-SLATs sampled from
    (Z_s, image) are closer to the truth than Z_s itself."""
    config = stage1_config.replace(steps=100, lr=2e-3, checkpoint_every=1000, sampler=stage1_config.sampler.replace(
        steps=12, cfg_strength=0.0))  # fmt: skip
    trainer = Stage1Trainer(config, device=torch.device("cpu"))
    items = list(range(len(trainer.train_data)))
    before = trainer.evaluate(trainer.train_data, items)
    losses = [trainer.train_step() for _ in range(config.steps)]
    after = trainer.evaluate(trainer.train_data, items)
    early, late = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"loss {early:.3f} -> {late:.3f}; flow loss {before['flow_loss']:.3f} -> {after['flow_loss']:.3f}; "
          f"sampled MSE {before['mse_sampled']:.3f} -> {after['mse_sampled']:.3f}, "
          f"Z_s baseline {after['mse_shaded_baseline']:.3f}")  # fmt: skip
    assert late < 0.8 * early, "the training loss (random t per step, so noisy) falls by a fifth or more"
    assert after["flow_loss"] < before["flow_loss"], "the same noise and times: a lower loss"
    assert after["mse_sampled"] < 0.6 * before["mse_sampled"]
    assert after["mse_sampled"] < after["mse_shaded_baseline"]


@pytest.mark.ray
def test_near_train_stage1_runs_through_ray_train(stage1_config: Stage1Config, tmp_path: Path) -> None:
    config_file = tmp_path / "stage1.yaml"
    data = stage1_config.replace(steps=2, val_every=2).to_dict()
    data.pop("release")
    config_file.write_text(json.dumps(data))  # JSON is YAML
    completed = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "train", "stage1", "--release", stage1_config.release,
         "--config", str(config_file)],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "stage1 finished" in completed.stdout and "val_mse_sampled" in completed.stdout
    run = Path(stage1_config.out_dir)
    assert (run / CHECKPOINTS / LATEST).read_text().strip() == "step-00000002"
    assert any((run / "tensorboard").iterdir())
