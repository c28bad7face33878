"""Back-projection: TRELLIS's sampling semantics, bounded chunks, and the camera conventions on real renders."""

import numpy as np
import pytest
import torch

from encoders.backproject import BackprojectConfig, Cameras, backproject, project_points
from encoders.voxelize import voxel_centers, voxelize_mesh
from render_jobs.cameras import look_at_c2w
from render_jobs.render_set import RenderSet

R = 64


def _ring_cameras(num_views: int, fov_deg: float = 40.0) -> Cameras:
    angles = np.linspace(0, 2 * np.pi, num_views, endpoint=False)
    c2w = np.stack([look_at_c2w(2.0 * np.array([np.cos(a), np.sin(a), 0.3])) for a in angles])
    return Cameras.from_blender(c2w, np.full(num_views, np.radians(fov_deg)))


def test_patch_centres_follow_align_corners_false() -> None:
    """Patch (row i, col j) of a G x G map is centred at ((j + 0.5) / G, (i + 0.5) / G) of the image: on the
    ramp value(i, j) = i * G + j bilinear sampling returns exactly (v * G - 0.5) * G + (u * G - 0.5)."""
    grid = 37
    cameras = _ring_cameras(1)
    coords = torch.tensor([[32, 32, 32], [10, 40, 50], [50, 20, 30]], dtype=torch.int32)
    uv, _ = project_points(voxel_centers(coords), cameras)
    ramp = torch.arange(grid * grid, dtype=torch.float32).view(1, 1, grid, grid)
    feats = backproject(ramp, coords, cameras)[:, 0]
    row, col = uv[0, :, 1] * grid - 0.5, uv[0, :, 0] * grid - 0.5
    torch.testing.assert_close(feats, row * grid + col, rtol=0, atol=1e-3)


def test_plain_mean_counts_out_of_frame_views_as_zero() -> None:
    cameras = _ring_cameras(4, fov_deg=5.0)  # narrow: the voxel near the corner leaves most views
    coords = torch.tensor([[32, 32, 32], [1, 1, 62]], dtype=torch.int32)
    ones = torch.ones(4, 2, 8, 8)
    feats = backproject(ones, coords, cameras)
    uv, depth = project_points(voxel_centers(coords), cameras)
    in_frame = ((uv > 0) & (uv < 1)).all(-1) & (depth > 0)
    torch.testing.assert_close(feats[:, 0], in_frame.float().mean(0))
    assert feats[0, 0] == 1.0 and feats[1, 0] < 1.0


def test_chunking_does_not_change_the_result() -> None:
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(20, 64, 37, 37, generator=g)
    coords = torch.randint(0, R, (3000, 3), generator=g, dtype=torch.int32)
    cameras = _ring_cameras(20)
    whole = backproject(maps, coords, cameras, config=BackprojectConfig(chunk_budget_mb=4096))
    chunked = backproject(maps, coords, cameras, config=BackprojectConfig(chunk_budget_mb=1))
    torch.testing.assert_close(whole, chunked, rtol=1e-5, atol=1e-5)


def test_visibility_needs_depth_and_counts_only_seen_views() -> None:
    cameras = _ring_cameras(2)
    coords = torch.tensor([[32, 32, 32]], dtype=torch.int32)
    maps = torch.stack([torch.full((1, 4, 4), 3.0), torch.full((1, 4, 4), 5.0)])
    with pytest.raises(ValueError, match="depth"):
        backproject(maps, coords, cameras, config=BackprojectConfig(use_visibility=True))
    _, z = project_points(voxel_centers(coords), cameras)  # (2, 1)
    depth = torch.stack([torch.full((4, 4), z[0, 0].item()), torch.full((4, 4), z[1, 0].item() - 0.5)])
    seen = backproject(maps, coords, cameras, config=BackprojectConfig(use_visibility=True), depth_maps=depth)
    assert seen.item() == pytest.approx(3.0)
    assert backproject(maps, coords, cameras).item() == pytest.approx(4.0)


# --- conventions on real renders (acceptance 3) ------------------------------------------------------------


def _render_arrays(render_set: RenderSet) -> dict[str, np.ndarray]:
    frames = render_set.frames
    passes = [f.load_passes("beauty", "basecolor", "alpha", "depth") for f in frames]
    arrays = {
        name: np.stack([p[name] for p in passes]) for name in passes[0]
    }  # beauty and basecolor premultiplied
    return {**arrays, "c2w": np.stack([f.c2w for f in frames]), "fov": np.array([f.fov_rad for f in frames])}


def _surface_points(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """World points (P, 3) of fully covered pixels and their base colour (P, 3), unprojected from the depth
    pass with the Blender cameras directly (x right, y up, looking down -z): independent of the projection
    code under test."""
    points, colours = [], []
    for alpha, depth, basecolor, c2w, fov in zip(
        *(arrays[k] for k in ("alpha", "depth", "basecolor", "c2w", "fov"))
    ):
        rows, cols = np.nonzero(alpha > 0.99)
        height, width = alpha.shape
        half = np.tan(fov / 2)
        d = depth[rows, cols]
        x = (2 * (cols + 0.5) / width - 1) * half * d
        y = -(2 * (rows + 0.5) / height - 1) * half * d
        cam = np.stack([x, y, -d, np.ones_like(d)], axis=1)
        points.append((cam @ c2w.T)[:, :3])
        colours.append(basecolor[rows, cols] / alpha[rows, cols, None])
    return np.concatenate(points), np.concatenate(colours)


@pytest.fixture(scope="module")
def real_asset(vertex_colors_lh) -> dict:
    render_set = RenderSet.open(vertex_colors_lh)
    vertices, faces = render_set.mesh()
    coords = voxelize_mesh(torch.from_numpy(vertices), torch.from_numpy(faces))
    arrays = _render_arrays(render_set)
    points, colours = _surface_points(arrays)
    return {"coords": coords, "points": points, "colours": colours, **arrays}


def _linear(idx: np.ndarray) -> np.ndarray:
    return idx[..., 0] * R * R + idx[..., 1] * R + idx[..., 2]


def _base_colour_error(asset: dict, c2w: np.ndarray) -> np.ndarray:
    """Per voxel: |back-projected lh RGB - base colour at that surface point|, mean over channels."""
    idx = np.clip(np.floor((asset["points"] + 0.5) * R).astype(int), 0, R - 1)
    sums, counts = np.zeros((R**3, 3)), np.zeros(R**3)
    np.add.at(sums, _linear(idx), asset["colours"])
    np.add.at(counts, _linear(idx), 1)
    voxels = _linear(asset["coords"].numpy())
    has_reference = counts[voxels] >= 3
    reference = sums[voxels][has_reference] / counts[voxels][has_reference, None]

    cameras = Cameras.from_blender(c2w, asset["fov"])
    rgba = torch.from_numpy(asset["beauty"]).permute(0, 3, 1, 2)
    config = BackprojectConfig(use_visibility=True)
    gathered = backproject(
        rgba, asset["coords"], cameras, config=config, depth_maps=torch.from_numpy(asset["depth"])
    )
    gathered = gathered.numpy()[has_reference]
    rgb = gathered[:, :3] / np.maximum(gathered[:, 3:], 1e-6)  # alpha-weighted mean of the straight colour
    assert has_reference.sum() > 400  # voxels whose surface is seen in at least 3 fully covered pixels
    return np.abs(rgb - reference).mean(axis=1)


@pytest.mark.blender
@pytest.mark.real_assets
def test_backprojected_lh_colour_is_the_base_colour_at_each_voxel(real_asset) -> None:
    error = _base_colour_error(real_asset, real_asset["c2w"])
    assert np.median(error) < 0.06 and error.mean() < 0.1, (np.median(error), error.mean())


@pytest.mark.blender
@pytest.mark.real_assets
@pytest.mark.parametrize("broken", ["transposed rotation", "image upside down", "image mirrored"])
def test_a_wrong_camera_convention_fails_the_same_check(real_asset, broken: str) -> None:
    c2w = real_asset["c2w"].copy()
    if broken == "transposed rotation":
        c2w[:, :3, :3] = np.transpose(c2w[:, :3, :3], (0, 2, 1))
    elif broken == "image upside down":
        c2w[:, :3, 1] *= -1
    else:
        c2w[:, :3, 0] *= -1
    assert _base_colour_error(real_asset, c2w).mean() > 0.12


@pytest.mark.blender
@pytest.mark.real_assets
def test_every_occupied_voxel_is_seen_and_nothing_outside_them(real_asset) -> None:
    coords = real_asset["coords"]
    occupied = np.zeros((R, R, R), bool)
    occupied[tuple(coords.numpy().T)] = True
    near = occupied.copy()  # occupied or a face neighbour: a surface point can sit on a voxel boundary
    for axis in range(3):
        for step in (-1, 1):
            near |= np.roll(occupied, step, axis)
    points = real_asset["points"]
    assert (np.abs(points) < 0.5 + 1 / R).all(), "a rendered surface point lies outside [-0.5, 0.5]^3"
    idx = np.clip(np.floor((points + 0.5) * R).astype(int), 0, R - 1)  # depth noise at the faces of the cube
    assert near[tuple(idx.T)].all(), "rendered surface outside the voxels of the normalized mesh"

    alpha = torch.from_numpy(real_asset["alpha"])
    size = alpha.shape[-1]
    covered = torch.nn.functional.max_pool2d(alpha[:, None], 5, stride=1, padding=2)[:, 0] > 0  # +-2 px
    uv, depth = project_points(
        voxel_centers(coords), Cameras.from_blender(real_asset["c2w"], real_asset["fov"])
    )
    px = torch.floor(uv * size).long()
    in_frame = ((px >= 0) & (px < size)).all(-1) & (depth > 0)
    views, voxels = torch.nonzero(in_frame, as_tuple=True)
    on_object = covered[views, px[views, voxels, 1], px[views, voxels, 0]]
    assert in_frame.any(0).all(), "an occupied voxel is outside every view"
    assert on_object.all(), f"{(~on_object).sum()} voxel projections fall on background"
