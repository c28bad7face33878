"""The encoding preview: nearest voxel per pixel along each view axis, principal-component colours."""

import numpy as np
from PIL import Image

from encoders.preview import BACKGROUND, orthographic_views, principal_colors, write_preview


def test_each_view_shows_the_voxel_nearest_to_its_viewer() -> None:
    coords = np.array([[10, 5, 20], [10, 50, 20], [40, 30, 60]])  # two voxels on one front line of sight
    colors = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    image = orthographic_views(coords, colors)
    front, side, top = image[:, :64], image[:, 64:128], image[:, 128:]
    assert front[63 - 20, 10].argmax() == 0  # the front view looks from -y: y = 5 hides y = 50
    assert top[63 - 5, 10].argmax() == 0 and top[63 - 50, 10].argmax() == 1
    assert side[63 - 60, 30].argmax() == 2
    covered = (np.abs(image - BACKGROUND) > 1e-9).any(-1)
    assert covered.sum() == 2 + 3 + 3  # front: two pixels (the hidden voxel is behind); side and top: three


def test_principal_colours_spread_over_the_unit_cube() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(500, 16)) * np.linspace(5, 0.1, 16)
    colors = principal_colors(feats)
    assert colors.shape == (500, 3) and colors.min() >= 0 and colors.max() <= 1
    assert (colors.std(axis=0) > 0.15).all()
    assert principal_colors(rng.normal(size=(10, 2))).shape == (10, 3)  # fewer than three channels


def test_write_preview_stacks_one_labelled_row_per_layer(tmp_path) -> None:
    coords = np.random.default_rng(1).integers(0, 64, size=(200, 3))
    layers = {"features lh": np.random.default_rng(2).normal(size=(200, 32)), "slat lh": np.ones((200, 8))}
    write_preview(tmp_path / "p.png", coords, layers, scale=2)
    assert Image.open(tmp_path / "p.png").size == (3 * 64 * 2, 2 * 64 * 2)
