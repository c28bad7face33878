"""Stage 2 from a factory-built release: relight frames with the environment maps the release packs, training
that lowers the loss, exact resume, and `near train stage2` through Ray Train with no render env in reach."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from catalogs.release_reader import Release
from infra.environments import RENDER_PYTHON_ENV_VAR
from infra.errors import ConfigError
from pipelines.demo import DEMO_STAGE2_MODEL
from pipelines.steps import ENV_MAPS
from training.run import CHECKPOINTS, LATEST
from training.stage2.config import Stage2Config
from training.stage2.data import Stage2Data
from training.stage2.env_map_store import ENV_MAP_PREFIX, EnvMapStore, packed_env_maps
from training.stage2.model import Stage2ModelConfig

TINY_MODEL = DEMO_STAGE2_MODEL


@pytest.fixture
def stage2_config(tiny_release: dict[str, Path], tmp_path: Path) -> Stage2Config:
    return Stage2Config(
        data_root=str(tiny_release["data_root"]),
        release=tiny_release["release"],
        out_dir=str(tmp_path / "run"),
        model=Stage2ModelConfig.from_dict(TINY_MODEL),
        steps=3,
        batch_size=4,
        lr=2e-3,
        warmup_steps=5,
        data_workers=0,
        val_split="train",
        val_samples=4,
        val_every=1000,
        checkpoint_every=2,
        image_every=2,
    )


def test_the_release_packs_its_environment_maps(stage2_config: Stage2Config) -> None:
    release = Release.open(stage2_config.data_root, stage2_config.release)
    rows = [r for r in release.manifest.to_pylist() if r["role"] == ENV_MAPS]
    assert rows, "the build packed no env maps into the release"
    assert all(r["split"] == "shared" and r["sample_id"].startswith(ENV_MAP_PREFIX) for r in rows)
    assert not {r["sample_id"] for r in rows} & set(release.split("train") + release.split("val"))
    store = EnvMapStore.from_release(release, (16, 32))
    assert len(store) == len({r["source_id"] for r in rows})
    for name, (sample_id, digest) in packed_env_maps(release).items():
        rgb = release.read(sample_id, ENV_MAPS)["rgb"]
        assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.float32
        assert np.isfinite(rgb).all() and rgb.min() >= 0 and rgb.max() > 0
        assert store.digest_of(name) == digest
        assert store.get(digest).shape == (16, 32, 3)


def test_relight_frames_come_with_their_environment_maps(stage2_config: Stage2Config) -> None:
    release = Release.open(stage2_config.data_root, stage2_config.release)
    store = EnvMapStore.from_release(release, (32, 64))
    data = Stage2Data(release, "train", store)
    assert len(data) == 2 * 2 * 2  # assets x views x lightings, every frame env-map lit
    assert {frame.env_map for frame in data.frames} <= store.digests
    assert all(0 <= frame.yaw_rad < 2 * math.pi and frame.strength > 0 for frame in data.frames)
    picked = [0, 1, len(data) - 1]
    inputs, target = data.batch(picked)
    assert inputs.sample_asset.tolist() == [0, 0, 1]  # two samples of the first asset share its decode
    assert inputs.slat.batch_size == 2 and inputs.slat.feats.shape[1] == 8
    assert inputs.env_ldr.shape == inputs.env_dir.shape == (3, 3, 32, 64)
    assert torch.allclose(inputs.env_dir.norm(dim=1), torch.ones(3, 32, 64), atol=1e-5)
    assert target.radiance.shape == (3, 48, 48, 3) and target.shadow.shape == (3, 48, 48, 1)
    assert 0.01 < target.alpha.mean() < 0.99 and torch.isfinite(target.radiance).all()
    # one view under two lightings: same camera, same E_dir up to the yaw, different maps or rotations
    same_view = [
        i
        for i, f in enumerate(data.frames)
        if f.asset == data.frames[0].asset and f.view == data.frames[0].view
    ]
    assert len(same_view) == 2
    first, second = data.batch(same_view)[0].w2c
    assert torch.equal(first, second)
    with_bc = Stage2Data(release, "train", store, with_bc_slat=True).batch(picked)[0]
    assert with_bc.slat.feats.shape == (inputs.slat.feats.shape[0], 16)  # LH-SLAT then BC-SLAT channels
    assert torch.equal(with_bc.slat.feats[:, :8], inputs.slat.feats)


def test_frames_per_asset_draws_runs_of_frames_of_one_asset(stage2_config: Stage2Config, tmp_path: Path) -> None:
    from training.stage2.trainer import Stage2Trainer

    release = Release.open(stage2_config.data_root, stage2_config.release)
    store = EnvMapStore.from_release(release, (32, 64))
    data = Stage2Data(release, "train", store, frames_per_asset=2)
    draws = [0, 5, len(data) - 1, 1]
    assert Stage2Data(release, "train", store).group(draws) == draws  # one frame per asset: the draws as they are
    grouped = data.group(draws)
    frames = [data.frames[i] for i in grouped]
    assert grouped[0::2] == draws[0::2]  # each run keeps its first draw, then other frames of that asset
    assert frames[0].asset == frames[1].asset != frames[2].asset == frames[3].asset
    assert grouped[0] != grouped[1] and grouped[2] != grouped[3]
    assert data.batch(draws)[0].sample_asset.tolist() == [0, 0, 1, 1]  # two assets decoded for four samples
    assert data.read(draws)[0].sample_asset.tolist() == [0, 1, 1, 0]  # evaluation reads the frames it names
    with pytest.raises(ValueError, match="frames_per_asset=2"):
        data.batch([0, 1, 2])
    with pytest.raises(ConfigError, match="frames_per_asset"):
        stage2_config.replace(frames_per_asset=3)  # batch 4 on one worker
    trainer = Stage2Trainer(stage2_config.replace(frames_per_asset=2, out_dir=str(tmp_path / "fpa")),
                            device=torch.device("cpu"))  # fmt: skip
    assert math.isfinite(trainer.train_step()["total"])


def test_training_lowers_the_loss_and_resumes_exactly(stage2_config: Stage2Config) -> None:
    from training.stage2.trainer import Stage2Trainer

    config = stage2_config.replace(steps=30, checkpoint_every=20)
    trainer = Stage2Trainer(config, device=torch.device("cpu"))
    losses = [trainer.train_step()["total"] for _ in range(3)]
    trainer.save_checkpoint()
    step_4 = trainer.train_step()["total"]
    resumed = Stage2Trainer(config, device=torch.device("cpu"))
    assert resumed.step == 3
    assert resumed.train_step()["total"] == step_4
    before = trainer.validate()
    losses += [step_4] + [trainer.train_step()["total"] for _ in range(26)]
    after = trainer.validate()
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"stage 2 loss {first:.4f} -> {last:.4f}; PSNR {before['psnr']:.2f} -> {after['psnr']:.2f} dB")
    assert last < 0.8 * first
    assert after["psnr"] > before["psnr"]
    assert set(after) == {"psnr", "ssim"}  # no LPIPS without VGG weights


def test_near_train_stage2_runs_through_ray_train_without_a_render_env(
    stage2_config: Stage2Config, tmp_path: Path
) -> None:
    """A training node has no Blender: with the render env's python pointing nowhere, Stage 2 still trains,
    its environment maps read from the release."""
    from training.stage2.trainer import MODEL_FILE

    config = stage2_config.to_dict()
    config.update(model=TINY_MODEL, out_dir="run-cli", lr="1e-3", steps=4, val_every=4, checkpoint_every=4)
    assert not stage2_config.env_maps  # no map folders: the release alone
    config_file = tmp_path / "stage2.yaml"
    config_file.write_text(yaml.safe_dump(config))
    no_render_env = {
        **os.environ,
        RENDER_PYTHON_ENV_VAR: "/nonexistent/python",
        "RAY_ADDRESS": "local",  # a fresh local cluster, never one another process left running on this host
    }
    completed = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "train", "stage2", "--release", config["release"],
         "--config", str(config_file)],
        check=False, capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[2],
        env=no_render_env,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "stage2 finished" in completed.stdout
    run = tmp_path / "run-cli"
    latest = run / CHECKPOINTS / (run / CHECKPOINTS / LATEST).read_text().strip()
    assert (latest / MODEL_FILE).is_file()
    meta = json.loads((latest / "checkpoint.json").read_text())
    assert meta["step"] == 4 and meta["release"]["name"] == config["release"]
    packed = packed_env_maps(Release.open(config["data_root"], config["release"]))
    assert meta["config"]["lr"] == 1e-3 and meta[ENV_MAPS]
    assert all(packed[name][1] == digest for digest, name in meta[ENV_MAPS].items())  # sha256 -> file name
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "val_psnr" in metrics[-1]
    assert any((run / "tensorboard").iterdir())
