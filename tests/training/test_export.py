"""The 3DGS PLY export: the INRIA layout read back with plyfile, the activations inverted, the SH DC colours
equal to the AgX-tone-mapped radiance, and the explicit up-axis turn."""

import math
from pathlib import Path

import numpy as np
import plyfile
import pytest
import torch

from infra.errors import ConfigError, StepFailed
from render_jobs.cameras import look_at_c2w, opencv_w2c
from training.stage2.agx import AgX
from training.stage2.export import SH_C0, ply_property_names, splat_records, write_3dgs_ply
from training.stage2.gaussians import (
    GaussianHeadsConfig,
    IntrinsicHead,
    LightingHead,
    RadianceMlp,
    splats_for_view,
)
from training.stage2.rasterizer import Splats, quaternion_to_matrix

INRIA_DEGREE_0 = [
    "x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
    "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3",
]  # fmt: skip


@pytest.fixture(scope="module")
def agx() -> AgX:
    return AgX.from_simple_ocio()


@pytest.fixture(scope="module")
def head_splats() -> Splats:
    """One view's splats from randomly initialised Gaussian heads, as `Stage2Model.render` makes them."""
    torch.manual_seed(0)
    config = GaussianHeadsConfig(gaussians_per_voxel=4, color_feature_channels=8, radiance_hidden=16)
    intrinsic, lighting, mlp = IntrinsicHead(16, config), LightingHead(16, config), RadianceMlp(config)
    for layer in (intrinsic.out_layer, lighting.out_layer):  # zero-initialised: make the Gaussians differ
        torch.nn.init.normal_(layer.weight, std=0.5)
    coords = torch.tensor([[10, 20, 30], [32, 32, 32], [50, 5, 40]])
    h = torch.randn(3, 16)
    w2c = torch.from_numpy(opencv_w2c(look_at_c2w(np.array([0.0, -2.0, 0.5])))).float()
    with torch.no_grad():
        return splats_for_view(intrinsic(h, coords), lighting(h), mlp, w2c)


def _read(path: Path) -> plyfile.PlyElement:
    data = plyfile.PlyData.read(str(path))
    assert [e.name for e in data.elements] == ["vertex"]
    assert not data.text and data.byte_order == "<"
    return data["vertex"]


def _column(vertex: plyfile.PlyElement, *names: str) -> np.ndarray:
    return np.stack([np.asarray(vertex[name], dtype=np.float64) for name in names], axis=-1)


def test_writes_the_inria_layout_and_inverts_every_activation(
    head_splats: Splats, agx: AgX, tmp_path: Path
) -> None:  # fmt: skip
    count = write_3dgs_ply(tmp_path / "out" / "sample.ply", head_splats, agx, min_opacity=0.0)
    vertex = _read(tmp_path / "out" / "sample.ply")
    assert count == len(vertex.data) == head_splats.means.shape[0] == 12
    assert [p.name for p in vertex.properties] == INRIA_DEGREE_0
    assert all(p.val_dtype in ("f4", "float32", "<f4") for p in vertex.properties), vertex.properties

    assert np.allclose(_column(vertex, "x", "y", "z"), head_splats.means.numpy(), atol=1e-7)
    scales = np.exp(_column(vertex, "scale_0", "scale_1", "scale_2"))
    assert np.allclose(scales, head_splats.scales.numpy(), rtol=1e-5)
    sigmoid = 1 / (1 + np.exp(-np.asarray(vertex["opacity"], dtype=np.float64)))
    assert np.allclose(sigmoid, head_splats.opacities.numpy(), atol=1e-6)
    quats = _column(vertex, "rot_0", "rot_1", "rot_2", "rot_3")
    assert np.allclose(np.linalg.norm(quats, axis=1), 1.0, atol=1e-6)
    unit = torch.nn.functional.normalize(head_splats.quats, dim=-1).numpy()
    assert np.allclose(quats, unit, atol=1e-6)
    assert np.all(_column(vertex, "nx", "ny", "nz") == 0)

    rgb = 0.5 + SH_C0 * _column(vertex, "f_dc_0", "f_dc_1", "f_dc_2")  # what a viewer's SH0 evaluation shows
    with torch.no_grad():
        tone_mapped = agx(head_splats.features[:, :3]).numpy()
    assert np.allclose(rgb, tone_mapped, atol=1e-6)
    assert tone_mapped.std() > 0.01  # the check above compares varied colours, not one grey


def test_degree_3_pads_the_45_zero_coefficients_sibr_expects(
    head_splats: Splats, agx: AgX, tmp_path: Path
) -> None:  # fmt: skip
    write_3dgs_ply(tmp_path / "sibr.ply", head_splats, agx, sh_degree=3)
    vertex = _read(tmp_path / "sibr.ply")
    names = [p.name for p in vertex.properties]
    assert names == ply_property_names(3)
    assert names == INRIA_DEGREE_0[:9] + [f"f_rest_{i}" for i in range(45)] + INRIA_DEGREE_0[9:]
    assert np.all(_column(vertex, *(f"f_rest_{i}" for i in range(45))) == 0)


def test_drops_gaussians_below_the_opacity_threshold_and_keeps_extremes_finite(
    agx: AgX, tmp_path: Path
) -> None:  # fmt: skip
    opacities = torch.tensor([0.0, 1e-3, 1.0 / 255.0, 0.5, 1.0])
    splats = Splats(
        means=torch.arange(15, dtype=torch.float32).view(5, 3),
        quats=torch.tensor([[2.0, 0.0, 0.0, 0.0]] * 5),  # not unit: normalised on the way out
        scales=torch.full((5, 3), 0.01),
        opacities=opacities,
        features=torch.rand(5, 9),
    )
    assert write_3dgs_ply(tmp_path / "default.ply", splats, agx) == 3  # 1/255 and above
    vertex = _read(tmp_path / "default.ply")
    assert np.allclose(np.asarray(vertex["x"]), [6.0, 9.0, 12.0])
    assert np.isfinite(np.asarray(vertex["opacity"])).all()
    sigmoid = 1 / (1 + np.exp(-np.asarray(vertex["opacity"], dtype=np.float64)))
    assert np.allclose(sigmoid, [1 / 255, 0.5, 1.0], atol=1e-6)
    assert np.allclose(_column(vertex, "rot_0", "rot_1", "rot_2", "rot_3"), [[1.0, 0.0, 0.0, 0.0]] * 3)
    assert write_3dgs_ply(tmp_path / "all.ply", splats, agx, min_opacity=0.0) == 5


@pytest.mark.parametrize(
    ("up_axis", "world_up", "front"),
    [("+z", (0, 0, 1), (0, -1, 0)), ("+y", (0, 1, 0), (0, 0, 1)), ("-y", (0, -1, 0), (0, 0, -1))],
)
def test_up_axis_turns_centres_and_rotations_together(
    head_splats: Splats, agx: AgX, up_axis: str, world_up: tuple, front: tuple
) -> None:  # fmt: skip
    records = splat_records(head_splats, agx, min_opacity=0.0, up_axis=up_axis)
    base = splat_records(head_splats, agx, min_opacity=0.0)
    # the rotation R that maps the factory's +Z to the file's up, from where the up and front points land
    probe = Splats(
        means=torch.tensor([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]),
        quats=torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 3),
        scales=torch.full((3, 3), 0.01),
        opacities=torch.full((3,), 0.5),
        features=torch.ones(3, 9),
    )
    landed = splat_records(probe, agx, up_axis=up_axis)
    points = np.stack([landed[n] for n in ("x", "y", "z")], axis=-1)
    assert np.allclose(points[0], world_up) and np.allclose(points[1], front)
    rotation = points.T  # columns: images of +Z, -Y, +X
    rotation = np.stack([rotation[:, 2], -rotation[:, 1], rotation[:, 0]], axis=1)
    assert np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-6)
    assert np.isclose(np.linalg.det(rotation), 1.0)

    def column(recs: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
        return np.stack([recs[n].astype(np.float64) for n in names], axis=-1)

    xyz = ("x", "y", "z")
    assert np.allclose(column(records, xyz), column(base, xyz) @ rotation.T, atol=1e-6)
    rot = ("rot_0", "rot_1", "rot_2", "rot_3")
    turned = quaternion_to_matrix(torch.from_numpy(column(records, rot))).numpy()
    original = quaternion_to_matrix(torch.from_numpy(column(base, rot))).numpy()
    assert np.allclose(turned, rotation @ original, atol=1e-5)  # each Gaussian's axes turn with the cloud
    for name in ("opacity", "scale_0", "f_dc_0"):
        assert np.array_equal(records[name], base[name])


def test_rejects_bad_options_and_non_finite_splats(head_splats: Splats, agx: AgX) -> None:
    with pytest.raises(ConfigError, match="up_axis"):
        splat_records(head_splats, agx, up_axis="z")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="sh_degree"):
        splat_records(head_splats, agx, sh_degree=4)
    with pytest.raises(ConfigError, match="min_opacity"):
        splat_records(head_splats, agx, min_opacity=1.0)
    batched = Splats(head_splats.means[None], head_splats.quats, head_splats.scales, head_splats.opacities,
                     head_splats.features)  # fmt: skip
    with pytest.raises(ConfigError, match="means"):
        splat_records(batched, agx)
    no_radiance = Splats(head_splats.means, head_splats.quats, head_splats.scales, head_splats.opacities,
                         head_splats.features[:, :2])  # fmt: skip
    with pytest.raises(ConfigError, match="features"):
        splat_records(no_radiance, agx)
    broken = head_splats.means.clone()
    broken[0, 0] = math.nan
    with pytest.raises(StepFailed, match="non_finite"):
        splat_records(Splats(broken, head_splats.quats, head_splats.scales, head_splats.opacities,
                             head_splats.features), agx, min_opacity=0.0)  # fmt: skip
    nan_opacity = head_splats.opacities.clone()
    nan_opacity[1] = math.nan
    with pytest.raises(StepFailed, match="opacities"):
        splat_records(Splats(head_splats.means, head_splats.quats, head_splats.scales, nan_opacity,
                             head_splats.features), agx)  # fmt: skip
