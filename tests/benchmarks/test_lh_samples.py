"""The error measures of `benchmarks/lh_samples.py` on inputs whose errors are known (no rendering)."""

import math

import numpy as np
import pytest
import torch

from benchmarks.lh_samples import image_errors, row_errors
from encoders.dinov2 import IMAGENET_STD


def test_image_psnr_is_in_display_units_and_mae_in_normalized_units() -> None:
    reference = torch.randn(2, 3, 8, 8)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    shifted = reference + 0.01 / std  # 0.01 in display units on every pixel of every channel
    errors = image_errors(shifted, reference)
    assert errors["psnr_db"] == pytest.approx(40.0, abs=1e-6)
    assert errors["mae"] == pytest.approx(float((0.01 / std).mean()), rel=1e-6)


def test_identical_images_have_no_psnr_and_zero_mae() -> None:
    reference = torch.randn(1, 3, 4, 4).bfloat16()
    assert image_errors(reference, reference.clone()) == {"psnr_db": None, "mae": 0.0}


def test_row_errors_of_a_scaled_and_a_flipped_row() -> None:
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((100, 8)).astype(np.float16)
    x = reference.astype(np.float64)
    x[0] = -x[0]  # one voxel points the other way: cosine -1 there, 1 elsewhere
    errors = row_errors(x, reference)
    norm = np.linalg.norm(reference.astype(np.float64))
    assert errors["rel_l2"] == pytest.approx(2 * np.linalg.norm(reference[0].astype(np.float64)) / norm)
    assert errors["cos_mean"] == pytest.approx(0.98)
    assert errors["cos_p01"] < errors["cos_mean"]
    scaled = row_errors(3 * reference.astype(np.float64), reference)
    assert scaled["rel_l2"] == pytest.approx(2.0) and scaled["cos_mean"] == pytest.approx(1.0)
    assert math.isclose(row_errors(reference, reference)["rel_l2"], 0.0)
