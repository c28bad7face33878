"""The SLAT encoder: release state dict and file size, strict loading from files and hub ids, invariances."""

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from encoders.layers import position_embedding
from encoders.slat_encoder import (
    SlatEncoder,
    SlatEncoderConfig,
    build_random_slat_encoder,
    load_slat_encoder,
    save_slat_encoder,
)
from encoders.sparse import SparseTensor
from encoders.weights import is_random_init, state_dict_digest
from infra.errors import ConfigError
from tests.encoders.helpers import random_coords

REFERENCE = (
    Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "trellis_encoder_state_dict.txt"
)
TINY = SlatEncoderConfig(resolution=32, in_channels=32, model_channels=48, num_blocks=2, num_heads=3)
RELEASE_JSON = {
    "name": "SLatEncoder",
    "args": {
        "resolution": 64,
        "in_channels": 1024,
        "model_channels": 768,
        "latent_channels": 8,
        "num_blocks": 12,
        "num_heads": 12,
        "mlp_ratio": 4,
        "attn_mode": "swin",
        "window_size": 8,
        "use_fp16": True,
    },
}


def random_input(sizes: list[int], config: SlatEncoderConfig, *, seed: int) -> SparseTensor:
    coords = random_coords(sizes, grid=config.resolution, seed=seed)
    feats = torch.randn(len(coords), config.in_channels, generator=torch.Generator().manual_seed(seed))
    return SparseTensor(coords, feats)


def encode(model: SlatEncoder, x: SparseTensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x).feats


@pytest.fixture(scope="module")
def release_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("release") / "slat_enc_swin8_B_64l8_fp16.safetensors"
    save_slat_encoder(build_random_slat_encoder(SlatEncoderConfig(), seed=0), path)
    return path


@pytest.fixture
def tiny_file(tmp_path: Path) -> Path:
    path = tmp_path / "ckpts" / "tiny.safetensors"
    save_slat_encoder(build_random_slat_encoder(TINY, seed=1), path)
    return path


def test_state_dict_matches_the_release() -> None:
    if not REFERENCE.exists():
        pytest.skip(f"no reference list at {REFERENCE}")
    expected = [line.split("\t") for line in REFERENCE.read_text().splitlines() if line.strip()]
    state_dict = SlatEncoder(SlatEncoderConfig()).state_dict()
    actual = [
        [name, str(tuple(t.shape)), str(t.dtype).removeprefix("torch.")] for name, t in state_dict.items()
    ]
    assert actual == expected
    assert sum(t.numel() for t in state_dict.values()) == 85_817_104


def test_release_files_have_the_published_sizes(release_file: Path) -> None:
    assert release_file.stat().st_size == 173_242_816
    config_file = release_file.with_suffix(".json")
    assert json.loads(config_file.read_text()) == RELEASE_JSON
    assert config_file.stat().st_size == 321


def test_release_file_loads_back_with_identical_outputs(release_file: Path) -> None:
    model, info = load_slat_encoder(str(release_file))
    assert model.config == SlatEncoderConfig() and next(model.blocks.parameters()).dtype == torch.float32
    assert info.digest == state_dict_digest(safetensors.torch.load_file(release_file))
    assert info.is_random_init and info.reference == str(release_file)
    original = build_random_slat_encoder(SlatEncoderConfig(), seed=0)
    original.blocks.float()  # the fp16 weights, computed in fp32 as the CPU load does
    x = random_input([120, 80], SlatEncoderConfig(), seed=2)
    latent = encode(model, x)
    assert latent.shape == (200, 8) and latent.dtype == torch.float32 and latent.std() > 0.1
    assert torch.equal(latent, encode(original, x))


def test_hub_id_loads_offline_from_the_cache(tiny_file: Path, hub_cache) -> None:
    hub_cache.publish("owner/repo", tiny_file.parent, path_in_repo="ckpts")
    model, info = load_slat_encoder("owner/repo/ckpts/tiny")
    _, local_info = load_slat_encoder(str(tiny_file))
    assert model.config == TINY and info.reference == "owner/repo/ckpts/tiny"
    assert info.digest == local_info.digest and info.is_random_init


def test_random_init_marker_follows_the_weights(tiny_file: Path, tmp_path: Path) -> None:
    assert is_random_init(tiny_file)
    model, _ = load_slat_encoder(str(tiny_file))
    resaved = tmp_path / "resaved.safetensors"
    save_slat_encoder(model, resaved)
    assert load_slat_encoder(str(resaved))[1].is_random_init
    model.random_init_seed = None  # as if trained: real weights
    save_slat_encoder(model, resaved)
    assert not load_slat_encoder(str(resaved))[1].is_random_init


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda sd: sd.pop("blocks.1.mlp.mlp.0.bias"), "missing.*blocks.1.mlp.mlp.0.bias"),
        (
            lambda sd: sd.update({"out_layer.weight": torch.zeros(8, 48)}),
            r"mis-shaped.*out_layer.weight \(8, 48\)",
        ),
        (
            lambda sd: sd.update({"blocks.0.norm1.weight": torch.ones(48)}),
            "unexpected.*blocks.0.norm1.weight",
        ),
    ],
)
def test_mismatched_checkpoint_names_the_key(tiny_file: Path, change, named: str) -> None:
    state_dict = safetensors.torch.load_file(tiny_file)
    change(state_dict)
    safetensors.torch.save_file(state_dict, tiny_file)
    with pytest.raises(ConfigError, match=named):
        load_slat_encoder(str(tiny_file))


def test_tiny_config_round_trips_through_its_json(tmp_path: Path) -> None:
    config = TINY.replace(mlp_ratio=2.5, window_size=4, latent_channels=4, use_fp16=False)
    save_slat_encoder(build_random_slat_encoder(config, seed=3), tmp_path / "t.safetensors")
    model, info = load_slat_encoder(
        str(tmp_path / "t"), attention_backend="sdpa"
    )  # TRELLIS's suffix-less path
    assert model.config == config.replace(attention_backend="sdpa")
    assert info.digest == load_slat_encoder(str(tmp_path / "t.safetensors"))[1].digest
    trellis = json.loads((tmp_path / "t.json").read_text())
    (tmp_path / "t.json").write_text(
        json.dumps({**trellis, "args": {**trellis["args"], "attn_mode": "full"}})
    )
    with pytest.raises(ConfigError, match="attn_mode='swin'"):
        load_slat_encoder(str(tmp_path / "t"))


def test_position_embedding_is_sinusoidal_per_axis_and_zero_padded() -> None:
    xyz = torch.tensor([[0, 1, 63], [5, 0, 2]], dtype=torch.int32)
    embedding = position_embedding(xyz, 64)  # freq_dim 10: 60 channels, 4 of padding
    omega = torch.tensor([10000 ** (-k / 10) for k in range(10)])
    for axis in range(3):
        angles = xyz[:, axis, None].float() * omega
        torch.testing.assert_close(
            embedding[:, 20 * axis : 20 * axis + 20], torch.cat([angles.sin(), angles.cos()], 1)
        )
    assert torch.equal(embedding[:, 60:], torch.zeros(2, 4))


@pytest.fixture(scope="module")
def tiny_fp32() -> SlatEncoder:
    return build_random_slat_encoder(TINY.replace(use_fp16=False, attention_backend="sdpa"), seed=4)


def test_permuting_one_batch_element_permutes_its_latents(tiny_fp32: SlatEncoder) -> None:
    x = random_input([200, 300], TINY, seed=5)
    permutation = torch.cat(
        [torch.arange(200), 200 + torch.randperm(300, generator=torch.Generator().manual_seed(6))]
    )
    permuted = SparseTensor(x.coords[permutation], x.feats[permutation])
    torch.testing.assert_close(
        encode(tiny_fp32, permuted), encode(tiny_fp32, x)[permutation], atol=1e-5, rtol=1e-5
    )


def test_batch_elements_are_encoded_independently(tiny_fp32: SlatEncoder) -> None:
    x = random_input([200, 300], TINY, seed=7)
    together = encode(tiny_fp32, x)
    first = SparseTensor(x.coords[:200], x.feats[:200])
    second = SparseTensor(x.coords[200:] - torch.tensor([1, 0, 0, 0], dtype=torch.int32), x.feats[200:])
    alone = torch.cat([encode(tiny_fp32, first), encode(tiny_fp32, second)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_invalid_inputs_are_rejected(tiny_fp32: SlatEncoder) -> None:
    x = random_input([10], TINY, seed=8)
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        tiny_fp32(SparseTensor(x.coords * 4, x.feats))
    unsorted = x.coords.clone()
    unsorted[0, 0] = 1
    with pytest.raises(ValueError, match="non-decreasing"):
        SparseTensor(unsorted, x.feats)
    with pytest.raises(ConfigError, match="no file"):
        load_slat_encoder("/nonexistent/ckpts/encoder")
