"""The torch AgX against simple-ocio's AgX view, and its gradients."""

import numpy as np
import pytest
import simple_ocio
import torch

from training.stage2.agx import AgX, read_cube_lut


@pytest.fixture(scope="module")
def agx() -> AgX:
    return AgX.from_simple_ocio()


def test_matches_simple_ocio_over_the_hdr_range(agx: AgX) -> None:
    """Log-uniform values from 1e-4 to 1e3 per channel (coloured, not only grey), plus black and negatives."""
    generator = np.random.default_rng(0)
    hdr = 10.0 ** generator.uniform(-4, 3, size=(50_000, 3))
    hdr = np.concatenate([hdr, [[0, 0, 0], [0.18, 0.18, 0.18], [1, 1, 1], [-0.5, 0.2, 3.0]]]).astype(
        np.float32
    )
    expected = simple_ocio.ToneMapper(view="AgX").hdr_to_ldr(hdr.copy(), clip=True)
    actual = agx(torch.from_numpy(hdr)).numpy()
    assert np.abs(actual - expected).max() < 1e-4
    assert actual[-3] == pytest.approx([0.4614] * 3, abs=1e-3)  # mid grey


def test_is_differentiable(agx: AgX) -> None:
    """gradcheck in float64 at points inside the clamps (the map is smooth there except on LUT cell faces)."""
    x = torch.tensor(
        [[0.3, 0.5, 0.7], [2.0, 1.0, 0.5], [0.05, 0.08, 0.02]], dtype=torch.float64, requires_grad=True
    )
    assert torch.autograd.gradcheck(agx, (x,), eps=1e-7, atol=1e-5)
    identity = "LUT_3D_SIZE 2\n" + "\n".join(f"{r} {g} {b}" for b in (0, 1) for g in (0, 1) for r in (0, 1))
    assert torch.equal(read_cube_lut(identity)[1, 0, 1], torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))


def test_real_lut_gradients_are_finite_and_nonzero(agx: AgX) -> None:
    hdr = (torch.rand(4, 16, 16, 3, generator=torch.Generator().manual_seed(1)) * 5).requires_grad_(True)
    agx(hdr).mean().backward()
    assert torch.isfinite(hdr.grad).all() and hdr.grad.abs().sum() > 0
