"""The DINOv2 extractor: TRELLIS's pre-LayerNorm patch tokens, row-major, through the user's loading path."""

from pathlib import Path

import pytest
import torch
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from encoders.dinov2 import (
    VITL14_REG,
    Dinov2Config,
    Dinov2Features,
    display_image,
    save_random_dinov2,
    srgb_encode,
)
from encoders.fused_vit import FusedVit
from infra.errors import ConfigError

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 2}


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory) -> str:
    """Random weights with random biases and layer scales: a fresh model has zero biases and unit scales,
    which would hide a mistake in how the fused pass folds them."""
    path = tmp_path_factory.mktemp("dinov2") / "tiny-vit14-reg"
    save_random_dinov2(path, seed=0, **TINY)
    model = Dinov2WithRegistersModel.from_pretrained(path)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith((".bias", "lambda1")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    model.save_pretrained(path)
    return str(path)


def _transformers_hidden_states(model_path: str, pixels: torch.Tensor, **config) -> tuple[torch.Tensor, ...]:
    model = Dinov2WithRegistersModel.from_pretrained(model_path, **config).eval()
    with torch.inference_mode():
        return model(pixels.to(model.dtype), output_hidden_states=True).hidden_states


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
    model = Dinov2WithRegistersModel.from_pretrained(extractor.config.model).eval()
    with torch.inference_mode():
        out = model(extractor.preprocess(views), output_hidden_states=True)
    prenorm = out.hidden_states[-1][:, 5:]  # drop cls + 4 registers
    postnorm = out.last_hidden_state[:, 5:]
    row_major = tokens.flatten(2).transpose(1, 2)  # (B, 37 * 37, C), token = row * 37 + col
    torch.testing.assert_close(row_major, prenorm, rtol=1e-5, atol=1e-5)
    assert (row_major - postnorm).abs().max() > 0.1


def test_fused_pass_interpolates_positions_as_transformers_does(tiny_dinov2: str) -> None:
    """At an input size other than the model's 518, position embeddings are resampled (bicubic)."""
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    model = Dinov2WithRegistersModel.from_pretrained(tiny_dinov2).eval()
    fused = FusedVit(model, image_size_px=224)
    expected = _transformers_hidden_states(tiny_dinov2, pixels)[-1]  # cls, 4 registers, 16 x 16 patches
    assert fused.grid_size == 16
    torch.testing.assert_close(fused(pixels), expected, rtol=1e-5, atol=1e-5)


def test_fused_pass_rejects_swiglu_models(tmp_path: Path) -> None:
    config = Dinov2WithRegistersConfig(**{**VITL14_REG, **TINY, "use_swiglu_ffn": True})
    with pytest.raises(ConfigError, match="SwiGLU"):
        FusedVit(Dinov2WithRegistersModel(config).eval(), image_size_px=518)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bfloat16_fused_pass_is_as_accurate_as_transformers(tmp_path: Path) -> None:
    """On the GPU the fused pass runs GELU in the GEMM epilogue (tanh form) and defers biases; against a
    float32 reference of the real architecture it must be as close as transformers' own bfloat16 forward."""
    path = str(tmp_path / "vitl14-reg")
    save_random_dinov2(path, seed=4)
    pixels = torch.randn(4, 3, 518, 518, generator=torch.Generator().manual_seed(5)).cuda()
    reference = _transformers_hidden_states(path, pixels.cpu())  # float32 on the CPU: the ground truth
    reference = reference[-1].double()
    model = Dinov2WithRegistersModel.from_pretrained(path, dtype=torch.bfloat16).eval().cuda()
    with torch.inference_mode():
        plain = model(pixels.bfloat16(), output_hidden_states=True).hidden_states[-1]
    fused = FusedVit(model, image_size_px=518)(pixels.bfloat16())

    def relative_error(tokens: torch.Tensor) -> float:
        return ((tokens.double().cpu() - reference).norm() / reference.norm()).item()

    assert fused.dtype == torch.bfloat16 and torch.isfinite(fused).all()
    assert relative_error(fused) < 1.1 * relative_error(plain) < 0.05


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
