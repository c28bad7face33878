"""The per-asset entry point and `near encode`, on real demo renders with tiny models saved to disk."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders.asset_encoder import AssetEncoder, AssetEncoderConfig, AssetEncoding
from encoders.dinov2 import Dinov2Config, save_random_dinov2
from encoders.slat_encoder import SlatEncoderConfig, build_random_slat_encoder, save_slat_encoder
from infra.errors import AssetRejected, Reason

pytestmark = pytest.mark.blender

DINOV2_WIDTH = 32


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    save_random_dinov2(
        root / "dinov2", seed=0, hidden_size=DINOV2_WIDTH, num_hidden_layers=2, num_attention_heads=2
    )
    slat = SlatEncoderConfig(
        in_channels=DINOV2_WIDTH, model_channels=48, num_blocks=2, num_heads=3, use_fp16=False
    )
    save_slat_encoder(build_random_slat_encoder(slat, seed=0), root / "slat_enc_tiny.safetensors")
    return {"dinov2": str(root / "dinov2"), "slat_encoder": str(root / "slat_enc_tiny.safetensors")}


@pytest.fixture(scope="module")
def encoder(tiny_models) -> AssetEncoder:
    config = AssetEncoderConfig(
        dinov2=Dinov2Config(model=tiny_models["dinov2"]), slat_encoder=tiny_models["slat_encoder"]
    )
    return AssetEncoder(config, device=torch.device("cpu"))


def test_encodes_a_render_set_into_voxels_features_and_both_slats(encoder, demo_lh_renders, tmp_path) -> None:
    render_dir = demo_lh_renders["textured_cube"].result.out_dir
    encoding = encoder.encode(render_dir)
    coords = encoding.coords
    n = len(coords)
    assert n > 100 and coords.dtype == np.uint8 and coords.max() < 64
    linear = coords[:, 0].astype(int) * 4096 + coords[:, 1].astype(int) * 64 + coords[:, 2]
    assert (np.diff(linear) > 0).all()
    for role in ("lh", "bc"):
        assert (
            encoding.features[role].shape == (n, DINOV2_WIDTH) and encoding.features[role].dtype == np.float16
        )
        assert encoding.latents[role].shape == (n, 8) and encoding.latents[role].dtype == np.float32
    assert not np.array_equal(encoding.features["lh"], encoding.features["bc"])  # shaded vs base colour
    assert encoding.is_random_weights and encoding.meta["num_views"] == 2

    again = AssetEncoding.load(encoding.save(tmp_path / "enc"))
    assert np.array_equal(again.coords, coords) and again.meta == encoding.meta
    for role in ("lh", "bc"):
        assert np.array_equal(again.features[role], encoding.features[role])
        assert np.array_equal(again.latents[role], encoding.latents[role])


def test_latents_are_the_encoder_of_the_stored_features(encoder, demo_lh_renders) -> None:
    """What is stored reproduces itself: encoding the saved float16 features gives the saved latents."""
    from encoders.sparse import SparseTensor

    encoding = encoder.encode(demo_lh_renders["open_box"].result.out_dir)
    coords = torch.nn.functional.pad(torch.from_numpy(encoding.coords.astype(np.int32)), (1, 0))
    with torch.inference_mode():
        latent = encoder.slat_encoder(
            SparseTensor(coords, torch.from_numpy(encoding.features["lh"]).float())
        ).feats
    np.testing.assert_array_equal(latent.numpy(), encoding.latents["lh"])


def test_a_folder_that_is_not_a_render_set_is_rejected_with_a_reason(encoder, tmp_path) -> None:
    with pytest.raises(AssetRejected) as err:
        encoder.encode(tmp_path)
    assert err.value.reason == Reason.INVALID_RENDER_SET


def test_near_encode_writes_the_files_and_says_the_weights_are_random(
    tiny_models, demo_lh_renders, tmp_path
) -> None:
    render_dir = demo_lh_renders["diffuse_sphere"].result.out_dir
    out = tmp_path / "encoded"
    cmd = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "encode",
        render_dir,
        "--dinov2",
        tiny_models["dinov2"],
        "--slat-encoder",
        tiny_models["slat_encoder"],
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, check=False, env={**os.environ, "COLUMNS": "200"}, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "random weights" in done.stderr
    names = {p.name for p in out.iterdir()}
    assert names == {
        "encoding.json",
        "features_lh.npz",
        "features_bc.npz",
        "slat_lh.npz",
        "slat_bc.npz",
        "preview.png",
    }
    meta = json.loads((out / "encoding.json").read_text())
    assert meta["random_weights"] is True and meta["source_id"] and meta["num_voxels"] > 0
    with np.load(out / "slat_lh.npz") as slat:
        assert slat["coords"].shape == (meta["num_voxels"], 3) and slat["feats"].shape == (
            meta["num_voxels"],
            8,
        )

    missing = subprocess.run(
        [*cmd[:4], str(Path(render_dir).parent), *cmd[5:]],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert missing.returncode != 0 and "invalid_render_set" in missing.stderr
