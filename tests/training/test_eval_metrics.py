"""Evaluation metrics: agreement with torchmetrics and `Lpips`, the masking conventions, missing values and
the bootstrap over assets. Images are synthetic; LPIPS uses a random trunk (no weights can be downloaded
here)."""

import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from training.eval.metrics import (
    PSNR_CAP_DB,
    EvalBuffers,
    average_per_asset,
    bootstrap_interval,
    measure_frames,
    summarize,
    tone_map,
)
from training.stage2.agx import AgX
from training.stage2.losses import tone_mapped
from training.stage2.lpips import Lpips

SIZE = 64
BOX = (24, 40, 24, 40)  # rows, then columns: the object's square, far (> 5 px SSIM reach) from the corners
IMAGE_KEYS = {"psnr", "ssim", "lpips", "psnr_masked", "ssim_masked", "lpips_masked"}


@pytest.fixture(scope="module")
def agx() -> AgX:
    return AgX.from_simple_ocio()


@pytest.fixture(scope="module")
def lpips() -> Lpips:
    return Lpips.random(seed=0)


def _object(frames: int = 1, box: tuple[int, int, int, int] = BOX, seed: int = 0) -> EvalBuffers:
    """A textured square of HDR radiance (premultiplied) with alpha 1, on black."""
    generator = torch.Generator().manual_seed(seed)
    radiance = torch.zeros(frames, SIZE, SIZE, 3)
    alpha = torch.zeros(frames, SIZE, SIZE, 1)
    r0, r1, c0, c1 = box
    radiance[:, r0:r1, c0:c1] = torch.rand(frames, r1 - r0, c1 - c0, 3, generator=generator) * 4
    alpha[:, r0:r1, c0:c1] = 1
    return EvalBuffers(radiance, alpha)


def _random_pair(frames: int = 3) -> tuple[EvalBuffers, EvalBuffers]:
    generator = torch.Generator().manual_seed(1)
    radiance = torch.rand(frames, SIZE, SIZE, 3, generator=generator) * 3
    truth = EvalBuffers(radiance, torch.rand(frames, SIZE, SIZE, 1, generator=generator))
    noise = torch.randn(frames, SIZE, SIZE, 3, generator=generator) * 0.3
    predicted = EvalBuffers((truth.radiance + noise).clamp(min=0), truth.alpha.flip(1))
    return predicted, truth


def _black(frames: int) -> torch.Tensor:
    return torch.zeros(frames, 1, 1, 1)


def test_full_frame_psnr_and_ssim_equal_torchmetrics(agx: AgX) -> None:
    predicted, truth = _random_pair()
    measured = measure_frames(predicted, truth, agx=agx, lpips=None)
    a = tone_mapped(agx, predicted.radiance, predicted.alpha, _black(3))
    b = tone_mapped(agx, truth.radiance, truth.alpha, _black(3))
    psnr = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
    for s, frame in enumerate(measured):
        by_hand = 10 * math.log10(1 / float(((a[s] - b[s]) ** 2).mean()))
        assert frame["psnr"] == pytest.approx(float(psnr[s]), rel=1e-6)
        assert frame["psnr"] == pytest.approx(by_hand, rel=1e-5)
        assert frame["ssim"] == pytest.approx(float(ssim[s]), rel=1e-6)
        assert "lpips" not in frame and "lpips_masked" not in frame  # no LPIPS given: absent, not made up


def test_full_mask_makes_masked_metrics_the_full_frame_ones(agx: AgX, lpips: Lpips) -> None:
    predicted, truth = _random_pair(frames=2)
    predicted = EvalBuffers(predicted.radiance, torch.ones_like(predicted.alpha))
    (first, _) = measure_frames(predicted, truth, agx=agx, lpips=lpips)
    for name in ("psnr", "ssim", "lpips"):
        assert first[f"{name}_masked"] == pytest.approx(first[name], rel=1e-5)


def test_lpips_equals_lpips_applied_directly(agx: AgX, lpips: Lpips) -> None:
    predicted, truth = _object(2, seed=1), _object(2, seed=2)
    measured = measure_frames(predicted, truth, agx=agx, lpips=lpips)
    a, b = tone_map(agx, predicted), tone_map(agx, truth)
    direct = lpips(a, b)
    r0, r1, c0, c1 = (
        BOX  # a 16 px square, grown about its centre to the 32 px minimum crop, outside blacked out
    )
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., r0:r1, c0:c1] = 1
    window = slice(16, 48)
    cropped = lpips((a * mask)[..., window, window], (b * mask)[..., window, window])
    for s, frame in enumerate(measured):
        assert frame["lpips"] == pytest.approx(float(direct[s]), rel=1e-5)
        assert frame["lpips_masked"] == pytest.approx(float(cropped[s]), rel=1e-5)
        assert frame["lpips_masked"] > 0


def test_identical_images_score_the_capped_psnr(agx: AgX, lpips: Lpips) -> None:
    truth = _object()
    (frame,) = measure_frames(truth, truth, agx=agx, lpips=lpips)
    assert frame["psnr"] == frame["psnr_masked"] == PSNR_CAP_DB
    assert frame["ssim"] == pytest.approx(1.0) and frame["ssim_masked"] == pytest.approx(1.0)
    assert frame["lpips"] == pytest.approx(0.0, abs=1e-7) and frame["lpips_masked"] == pytest.approx(
        0.0, abs=1e-7
    )
    assert all(math.isfinite(v) for v in frame.values())


def test_an_error_outside_the_union_mask_lowers_only_the_full_frame_metrics(agx: AgX, lpips: Lpips) -> None:
    truth = _object()
    radiance, alpha = truth.radiance.clone(), truth.alpha.clone()
    radiance[:, :10, :10] = 0.3  # a faint halo in a corner, alpha 0.3: outside either mask
    alpha[:, :10, :10] = 0.3
    (frame,) = measure_frames(EvalBuffers(radiance, alpha), truth, agx=agx, lpips=lpips)
    assert frame["psnr_masked"] == PSNR_CAP_DB
    assert frame["ssim_masked"] == pytest.approx(1.0, abs=1e-6)
    assert frame["lpips_masked"] == pytest.approx(0.0, abs=1e-7)
    assert frame["psnr"] < 40 and frame["ssim"] < 0.99 and frame["lpips"] > 1e-4


def test_an_error_inside_the_mask_lowers_both(agx: AgX, lpips: Lpips) -> None:
    truth = _object()
    radiance = truth.radiance.clone()
    radiance[:, 28:36, 28:36] *= 3
    (frame,) = measure_frames(EvalBuffers(radiance, truth.alpha), truth, agx=agx, lpips=lpips)
    assert frame["psnr_masked"] < 40 and frame["ssim_masked"] < 0.99 and frame["lpips_masked"] > 1e-4
    assert frame["psnr"] < 40 and frame["ssim"] < 0.999 and frame["lpips"] > 1e-4
    assert (
        frame["psnr_masked"] < frame["psnr"] and frame["ssim_masked"] < frame["ssim"]
    )  # the same error, over fewer pixels


def test_the_union_includes_pixels_only_the_prediction_covers(agx: AgX) -> None:
    truth = _object()
    spilled = _object(box=(24, 40, 24, 48))  # the truth's square and 8 more columns, on truth's texture
    spilled.radiance[:, 24:40, 24:40] = truth.radiance[:, 24:40, 24:40]
    (frame,) = measure_frames(spilled, truth, agx=agx, lpips=None)
    a, b = tone_map(agx, spilled), tone_map(agx, truth)
    union = (a - b)[
        ..., 24:40, 24:48
    ]  # every differing pixel is in the union, so MSE over it is the masked one
    assert frame["psnr_masked"] == pytest.approx(-10 * math.log10(float((union**2).mean())), rel=1e-5)
    faint = EvalBuffers(spilled.radiance, spilled.alpha.where(truth.alpha > 0, torch.tensor(0.5)))
    faint.alpha[:, :24] = 0
    faint.alpha[:, 40:] = 0
    (frame,) = measure_frames(faint, truth, agx=agx, lpips=None)
    assert frame["psnr_masked"] == PSNR_CAP_DB  # alpha 0.5 is not above the threshold: outside the union
    assert frame["psnr"] < 40


def test_an_empty_mask_leaves_the_masked_metrics_missing(agx: AgX, lpips: Lpips) -> None:
    empty = EvalBuffers(torch.zeros(1, SIZE, SIZE, 3), torch.zeros(1, SIZE, SIZE, 1))
    (frame,) = measure_frames(empty, empty, agx=agx, lpips=lpips)
    assert set(frame) == {"psnr", "ssim", "lpips"}
    keys = {"task": "task1", "input": "gt", "asset": "a", "split": "test"}
    rows = [
        {**keys, "frame": 0, **frame, "psnr_masked": None},
        {**keys, "frame": 1, "psnr_masked": math.nan, "psnr": 20.0},
    ]
    entry = summarize(rows)["task1"]["gt"]
    assert "psnr_masked" not in entry
    assert entry["psnr"]["frames"] == 2


def test_pbr_metrics_in_the_union_mask_and_the_full_frame(agx: AgX) -> None:
    truth = _object()
    base = truth.alpha.expand(-1, -1, -1, 3) * 0.5
    rough = truth.alpha * 0.2
    truth = EvalBuffers(truth.radiance, truth.alpha, base, rough, rough.clone())
    predicted = EvalBuffers(truth.radiance, truth.alpha, base + 0.1 * truth.alpha, rough, rough.clone())
    (frame,) = measure_frames(predicted, truth, agx=agx, lpips=None)
    covered = 16 * 16 / SIZE**2
    assert frame["base_color_l1_masked"] == pytest.approx(0.1, rel=1e-5)
    assert frame["base_color_psnr_masked"] == pytest.approx(20.0, rel=1e-5)
    assert frame["base_color_l1"] == pytest.approx(0.1 * covered, rel=1e-5)
    assert frame["base_color_psnr"] == pytest.approx(-10 * math.log10(0.01 * covered), rel=1e-5)
    assert frame["roughness_l1"] == 0 and frame["roughness_psnr"] == PSNR_CAP_DB
    assert "shadow_l1" not in frame


def test_shadow_is_scored_only_on_valid_frames_against_shadow_times_alpha(agx: AgX) -> None:
    truth = _object(2)
    truth = EvalBuffers(
        truth.radiance, truth.alpha, shadow=torch.ones_like(truth.alpha)
    )  # 1 on the background
    predicted = EvalBuffers(truth.radiance, truth.alpha, shadow=truth.alpha * 0.75)  # premultiplied on black
    valid, invalid = measure_frames(
        predicted, truth, agx=agx, lpips=None, shadow_valid=torch.tensor([True, False])
    )
    assert valid["shadow_l1_masked"] == pytest.approx(0.25)
    assert valid["shadow_l1"] == pytest.approx(0.25 * 16 * 16 / SIZE**2)
    assert "shadow_l1" not in invalid and "shadow_l1_masked" not in invalid
    with pytest.raises(ValueError, match="shadow_valid"):
        measure_frames(predicted, truth, agx=agx, lpips=None)


def test_mismatched_shapes_and_mixed_batches_are_refused(agx: AgX) -> None:
    truth = _object(2)
    with pytest.raises(
        (ValueError, TypeError), match=r"predicted\.radiance|Type-check"
    ):  # TypeError: jaxtyping
        measure_frames(EvalBuffers(truth.radiance[:1], truth.alpha), truth, agx=agx, lpips=None)

    class Frame:
        def __init__(self, shadow: torch.Tensor | None) -> None:
            self.radiance, self.alpha, self.shadow = truth.radiance[0], truth.alpha[0], shadow

    assert EvalBuffers.stack([Frame(None), Frame(None)]).radiance.shape == (2, SIZE, SIZE, 3)
    with pytest.raises(ValueError, match="1 of 2 frames have shadow"):
        EvalBuffers.stack([Frame(truth.alpha[0]), Frame(None)])


def test_summary_weighs_assets_equally_and_counts_frames() -> None:
    def row(asset: str, frame: int, psnr: float) -> dict:
        return {
            "task": "task2",
            "input": "predicted",
            "asset": asset,
            "split": "test",
            "frame": frame,
            "psnr": psnr,
        }

    rows = [row("a", 0, 10.0), row("a", 1, 10.0), row("a", 2, 10.0), row("b", 0, 20.0)]
    entry = summarize(rows, seed=3)["task2"]["predicted"]["psnr"]
    assert entry["mean"] == 15.0 and entry["assets"] == 2 and entry["frames"] == 4
    assert entry["low"] <= entry["mean"] <= entry["high"]
    table = average_per_asset(rows)
    assert [(r["asset"], r["frames"], r["psnr"]) for r in table] == [("a", 3, 10.0), ("b", 1, 20.0)]
    single = summarize(rows[:3])["task2"]["predicted"]["psnr"]
    assert single["low"] == single["mean"] == single["high"] == 10.0  # one asset: a degenerate interval


def test_bootstrap_interval_contains_the_mean_narrows_and_is_seeded() -> None:
    generator = np.random.default_rng(7)
    few, many = generator.normal(25, 3, size=8), generator.normal(25, 3, size=400)
    mean, low, high = bootstrap_interval(few, seed=0)
    assert low < mean < high and mean == pytest.approx(float(few.mean()))
    _, many_low, many_high = bootstrap_interval(many, seed=0)
    assert many_low < float(many.mean()) < many_high
    assert many_high - many_low < (high - low) / 3
    assert bootstrap_interval(few, seed=0) == (mean, low, high)
    assert bootstrap_interval(few, seed=1) != (mean, low, high)
    assert bootstrap_interval([4.0]) == (4.0, 4.0, 4.0)
    with pytest.raises(ValueError):
        bootstrap_interval([])
