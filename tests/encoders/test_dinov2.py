"""The DINOv2 extractor: TRELLIS's pre-LayerNorm patch tokens, row-major, through the user's loading path."""

import pytest
import torch

from encoders.dinov2 import Dinov2Config, Dinov2Features, display_image, save_random_dinov2, srgb_encode

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 2}


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("dinov2") / "tiny-vit14-reg"
    save_random_dinov2(path, seed=0, **TINY)
    return str(path)


@pytest.fixture(scope="module")
def extractor(tiny_dinov2: str) -> Dinov2Features:
    return Dinov2Features(Dinov2Config(model=tiny_dinov2, batch_size=2), device=torch.device("cpu"))


def _views(num_views: int, size_px: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    alpha = (torch.rand(num_views, 1, size_px, size_px, generator=g) > 0.3).float()
    return torch.cat([torch.rand(num_views, 3, size_px, size_px, generator=g) * alpha, alpha], dim=1)


def test_tokens_are_the_last_block_before_the_final_layernorm(extractor: Dinov2Features) -> None:
    views = _views(3)
    tokens = extractor(views)
    assert tokens.shape == (3, 32, 37, 37) and tokens.dtype == torch.float32
    with torch.inference_mode():
        out = extractor.model(extractor.preprocess(views), output_hidden_states=True)
    prenorm = out.hidden_states[-1][:, 5:]  # drop cls + 4 registers
    postnorm = out.last_hidden_state[:, 5:]
    row_major = tokens.flatten(2).transpose(1, 2)  # (B, 37 * 37, C), token = row * 37 + col
    torch.testing.assert_close(row_major, prenorm, rtol=1e-5, atol=1e-5)
    assert (row_major - postnorm).abs().max() > 0.1


def test_patch_grid_is_row_major_with_row_zero_at_the_top(tmp_path) -> None:
    """With no transformer block a token sees only its own patch: changing the pixels of patch (row 3, col 5)
    must change token [3, 5] and nothing else."""
    path = tmp_path / "embeddings-only"
    save_random_dinov2(path, seed=1, **{**TINY, "num_hidden_layers": 0})
    features = Dinov2Features(Dinov2Config(model=str(path)), device=torch.device("cpu"))
    views = torch.zeros(1, 4, 518, 518)
    views[:, 3] = 1.0
    changed = views.clone()
    changed[:, :3, 3 * 14 : 4 * 14, 5 * 14 : 6 * 14] = 1.0
    diff = (features(changed) - features(views)).abs().sum(1)[0]  # (37, 37)
    assert diff[3, 5] > 0 and diff.sum() == diff[3, 5]


def test_batching_does_not_change_tokens(tiny_dinov2: str, extractor: Dinov2Features) -> None:
    views = _views(5, seed=2)
    one_batch = Dinov2Features(Dinov2Config(model=tiny_dinov2, batch_size=8), device=torch.device("cpu"))
    torch.testing.assert_close(extractor(views), one_batch(views), rtol=1e-5, atol=1e-5)


def test_loaded_weights_are_reported_random_with_a_stable_digest(
    tiny_dinov2: str, extractor: Dinov2Features
) -> None:
    again = Dinov2Features(Dinov2Config(model=tiny_dinov2), device=torch.device("cpu"))
    assert extractor.weights.is_random_init and extractor.weights.reference == tiny_dinov2
    assert again.weights.digest == extractor.weights.digest and len(again.weights.digest) == 64


def test_loads_from_a_hub_id_offline(tiny_dinov2: str, hub_cache) -> None:
    hub_cache.publish("near-test/dinov2-tiny", tiny_dinov2)
    features = Dinov2Features(Dinov2Config(model="near-test/dinov2-tiny"), device=torch.device("cpu"))
    assert features.weights.is_random_init is False  # a hub model is taken as real: no marker travels with it
    local = Dinov2Features(Dinov2Config(model=tiny_dinov2), device=torch.device("cpu"))
    assert features.weights.digest == local.weights.digest


def test_display_image_is_srgb_of_straight_colour_times_alpha() -> None:
    rgba = torch.tensor([0.1, 0.2, 0.4, 0.5]).view(1, 4, 1, 1)  # premultiplied: straight colour 0.2, 0.4, 0.8
    expected = srgb_encode(torch.tensor([0.2, 0.4, 0.8])) * 0.5
    torch.testing.assert_close(display_image(rgba).flatten(), expected)
    assert display_image(torch.zeros(1, 4, 2, 2)).abs().max() == 0  # background is black
    torch.testing.assert_close(
        srgb_encode(torch.tensor([0.0, 0.0031308, 0.5, 1.0, 7.0])),
        torch.tensor([0.0, 0.04045, 0.735357, 1.0, 1.0]),
        rtol=1e-4,
        atol=1e-5,
    )
