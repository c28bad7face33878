import itertools

import numpy as np
import pytest
import torch
from jaxtyping import TypeCheckError

from encoders.voxelize import voxel_centers, voxelize_mesh


def reference_voxelize(vertices: np.ndarray, faces: np.ndarray, resolution: int) -> set[tuple[int, int, int]]:
    """Plain Akenine-Moller triangle/box SAT, a triangle at a time, over every voxel near its bounding box."""
    R = resolution
    points = (
        np.clip(vertices.astype(np.float64), -0.5 + 1e-6, 0.5 - 1e-6) + 0.5
    ) * R  # voxel i spans [i, i+1]
    occupied = set()
    for tri in points[faces]:
        lo = np.maximum(np.floor(tri.min(0)).astype(int) - 1, 0)
        hi = np.minimum(np.floor(tri.max(0)).astype(int) + 1, R - 1)
        cells = np.stack(
            np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(lo, hi)], indexing="ij"), -1
        ).reshape(-1, 3)
        v = tri[None] - (cells + 0.5)[:, None]  # (cells, vertex, axis), relative to each box centre
        e = np.roll(v, -1, axis=1) - v
        axes = [np.eye(3)[k] for k in range(3)] + [np.cross(e[:, 0], e[:, 1])]
        axes += [np.cross(e[:, j], np.eye(3)[k]) for j in range(3) for k in range(3)]
        separated = np.zeros(len(cells), dtype=bool)
        for a in axes:
            a = np.broadcast_to(a, (len(cells), 3))
            p = np.einsum("cvd,cd->cv", v, a)
            r = 0.5 * np.abs(a).sum(-1)
            separated |= (p.min(1) > r) | (p.max(1) < -r)
        occupied.update(map(tuple, cells[~separated].tolist()))
    return occupied


def as_set(coords: torch.Tensor) -> set[tuple[int, int, int]]:
    return set(map(tuple, coords.tolist()))


def random_mesh(seed: int, *, resolution: int, num_huge: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Triangle soup of the hard cases: small, medium and huge triangles, slivers, degenerate triangles
    (points, segments), clipped vertices, and vertices on voxel faces, edges and corners.

    Exact ties (a triangle touching a voxel) only come from grids of quarter and whole voxels, where float64
    is exact, so both implementations decide them alike; elsewhere ties have probability zero.
    """
    R, rng = resolution, np.random.default_rng(seed)

    def near(n: int, spread: float) -> np.ndarray:  # n triangles inside the cube, about `spread` voxels wide
        half = min(spread / R, 0.2)
        return rng.uniform(-0.5 + half, 0.5 - half, (n, 1, 3)) + rng.uniform(-half, half, (n, 3, 3))

    def on_grid(n: int, step: int, spread: int) -> np.ndarray:  # quarter-voxel units, strictly inside
        center = rng.integers(-2 * R // step + spread + 1, 2 * R // step - spread, (n, 1, 3))
        return (center + rng.integers(-spread, spread + 1, (n, 3, 3))) * step / (4 * R)

    a, b = near(12, 6)[:, 0], near(12, 6)[:, 1]
    sliver = np.stack([a, b, a + 0.37 * (b - a) + 1e-9 * rng.normal(size=a.shape)], 1)
    degenerate = np.concatenate([np.stack([a[:4]] * 3, 1), np.stack([a[4:8], b[4:8], a[4:8]], 1)])
    clipped = near(num_huge, R)
    clipped[:, 0, 0] = rng.uniform(0.5, 0.6, num_huge)  # one coordinate of two vertices outside the cube
    clipped[:, 1, 2] = rng.uniform(-0.6, -0.5, num_huge)
    axis_aligned = on_grid(16, 1, 8)
    axis_aligned[:, :, 0] = axis_aligned[:, :1, 0]  # in a plane x = const ...
    axis_aligned[:8, :, 0] = np.round(axis_aligned[:8, :, 0] * R) / R  # ... half of them a voxel boundary
    tris = np.concatenate(
        [
            *(near(n, spread) for n, spread in ((30, 2), (10, 8), (num_huge, R))),
            *(
                on_grid(n, step, spread)
                for n, step, spread in ((40, 1, 8), (20, 4, 2), (num_huge, 1, 2 * R - 2))
            ),
            sliver,
            degenerate,
            clipped,
            axis_aligned,
        ]
    )
    return tris.reshape(-1, 3), np.arange(3 * len(tris)).reshape(-1, 3)


def icosphere(subdivisions: int, *, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Closed triangle soup: shared edges get bit-identical midpoints, so the surface has no cracks."""
    t = (1 + 5**0.5) / 2
    corners = np.array([(-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0), (0, -1, t), (0, 1, t), (0, -1, -t)])
    corners = np.concatenate([corners, [(0, 1, -t), (t, 0, -1), (t, 0, 1), (-t, 0, -1), (-t, 0, 1)]])
    faces = [(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4), (11, 10, 2)]
    faces += [(10, 7, 6), (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9), (4, 9, 5)]
    faces += [(2, 4, 11), (6, 2, 10), (8, 6, 7), (9, 8, 1)]
    tris = corners[np.array(faces)] / np.linalg.norm(corners[0])
    for _ in range(subdivisions):
        a, b, c = tris[:, 0], tris[:, 1], tris[:, 2]
        ab, bc, ca = (a + b) / 2, (b + c) / 2, (c + a) / 2
        tris = np.concatenate([np.stack(t, 1) for t in ((a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca))])
        tris /= np.linalg.norm(tris, axis=-1, keepdims=True)
    return radius * tris.reshape(-1, 3), np.arange(tris.size // 3).reshape(-1, 3)


def quad(corners: list[tuple[float, float, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(corners, dtype=torch.float64), torch.tensor([[0, 1, 2], [0, 2, 3]])


@pytest.mark.parametrize("seed, resolution, num_huge", [(0, 8, 6), (1, 16, 6), (2, 32, 3), (3, 64, 1)])
def test_matches_brute_force_sat(seed: int, resolution: int, num_huge: int) -> None:
    vertices, faces = random_mesh(seed, resolution=resolution, num_huge=num_huge)
    coords = voxelize_mesh(torch.from_numpy(vertices), torch.from_numpy(faces), resolution=resolution)
    assert as_set(coords) == reference_voxelize(vertices, faces, resolution)


def test_float32_indexed_mesh_matches_brute_force() -> None:
    rng = np.random.default_rng(7)
    vertices = rng.uniform(-0.5, 0.5, (30, 3)).astype(np.float32)  # shared by several triangles
    faces = rng.integers(0, 30, (10, 3))
    coords = voxelize_mesh(torch.from_numpy(vertices), torch.from_numpy(faces).int(), resolution=32)
    assert as_set(coords) == reference_voxelize(vertices, faces, 32)


@pytest.mark.parametrize("seed", [0, 1])
def test_points_on_triangles_land_in_occupied_voxels(seed: int) -> None:
    R = 64
    vertices, faces = random_mesh(seed, resolution=R)
    occupied = torch.zeros(R, R, R, dtype=torch.bool)
    occupied[tuple(voxelize_mesh(torch.from_numpy(vertices), torch.from_numpy(faces)).long().T)] = True
    rng = np.random.default_rng(seed)
    bary = rng.dirichlet(np.ones(3), 2000)  # (samples, 3)
    tris = np.clip(vertices, -0.5 + 1e-6, 0.5 - 1e-6)[faces]  # (F, 3, 3)
    samples = np.einsum("sv,fvd->fsd", bary, tris).reshape(-1, 3)
    cells = np.clip(np.floor((samples + 0.5) * R).astype(int), 0, R - 1)
    assert occupied[tuple(torch.from_numpy(cells).T)].all()


def test_collinear_triangles_have_no_holes() -> None:
    # Vertices collinear up to rounding: a plain SAT takes the plane of a rounding-noise normal, drops voxels.
    rng = np.random.default_rng(0)
    a = rng.uniform(-0.4, 0.4, (500, 3))
    b = a + rng.uniform(-0.09, 0.09, (500, 3))
    tris = np.stack([a, b, a + rng.uniform(0.1, 0.9, (500, 1)) * (b - a)], 1)
    coords = voxelize_mesh(torch.from_numpy(tris.reshape(-1, 3)), torch.arange(1500).reshape(-1, 3))
    occupied = torch.zeros(64, 64, 64, dtype=torch.bool)
    occupied[tuple(coords.long().T)] = True
    samples = (a[:, None] + np.linspace(0, 1, 100)[None, :, None] * (b - a)[:, None]).reshape(-1, 3)
    assert occupied[tuple(torch.from_numpy(np.floor((samples + 0.5) * 64).astype(int)).T)].all()


def test_triangle_spanning_many_z_voxels_marks_all_of_them() -> None:
    # Open3D <= 0.17 kept only the first z-voxel of each (x, y) column per triangle. Two triangles: clipping
    # would cut a single one spanning the whole square to half of it.
    vertices, faces = quad([(0.01, -0.5, -0.5), (0.01, 0.5, -0.5), (0.01, 0.5, 0.5), (0.01, -0.5, 0.5)])
    coords = voxelize_mesh(vertices, faces)
    assert as_set(coords) == {(32, j, k) for j in range(64) for k in range(64)}  # 0.01 lies in x-voxel 32
    tilted = voxelize_mesh(
        torch.tensor([[0.0, -0.3, -0.45], [0.1, 0.3, -0.45], [0.05, 0.0, 0.45]]), faces[:1]
    )
    for x, y in {(x, y) for x, y, _ in tilted.tolist()}:
        column = tilted[(tilted[:, 0] == x) & (tilted[:, 1] == y), 2]
        assert len(column) == int(column.max() - column.min()) + 1, (x, y, column)
    assert int(tilted[:, 2].min()) == 3 and int(tilted[:, 2].max()) == 60


def test_cube_surface_is_a_shell() -> None:
    a, b = -0.3, 0.3  # not on voxel boundaries: voxels 12 and 51 hold the faces
    corners = np.array(list(itertools.product([a, b], repeat=3)))
    faces = []
    for axis in range(3):
        for side in (a, b):
            quad_ids = [i for i, c in enumerate(corners) if c[axis] == side]  # 4 corners, bit order
            faces += [(quad_ids[0], quad_ids[1], quad_ids[3]), (quad_ids[0], quad_ids[3], quad_ids[2])]
    coords = voxelize_mesh(torch.from_numpy(corners), torch.tensor(faces))
    expected = {c for c in itertools.product(range(12, 52), repeat=3) if {12, 51} & set(c)}
    assert as_set(coords) == expected


def test_sphere_is_a_shell_without_holes() -> None:
    vertices, faces = icosphere(4, radius=0.4)
    coords = voxelize_mesh(torch.from_numpy(vertices), torch.from_numpy(faces))
    half_diagonal = 3**0.5 / 2 / 64
    distance = voxel_centers(coords).double().norm(dim=1)
    assert ((distance - 0.4).abs() <= half_diagonal + 1e-3).all()  # only voxels meeting the surface
    # Watertight: flood the empty voxels from outside the grid; none well inside the sphere is reached.
    occupied = torch.zeros(66, 66, 66, dtype=torch.bool)
    occupied[tuple((coords.long() + 1).T)] = True
    outside = torch.zeros_like(occupied)
    outside[0] = True
    while not torch.equal(outside, grown := outside | _neighbours(outside) & ~occupied):
        outside = grown
    grid = torch.stack(torch.meshgrid(*[torch.arange(64)] * 3, indexing="ij"), -1).reshape(-1, 3)
    inside = grid[voxel_centers(grid).double().norm(dim=1) < 0.4 - half_diagonal - 1e-3]
    assert len(inside) > 50_000 and not outside[tuple((inside + 1).T)].any()


def _neighbours(mask: torch.Tensor) -> torch.Tensor:
    return (
        mask.roll(1, 0)
        | mask.roll(-1, 0)
        | mask.roll(1, 1)
        | mask.roll(-1, 1)
        | mask.roll(1, 2)
        | mask.roll(-1, 2)
    )


def test_face_on_voxel_boundary_marks_both_sides() -> None:
    vertices, faces = quad([(0.0, -0.25, -0.25), (0.0, 0.25, -0.25), (0.0, 0.25, 0.25), (0.0, -0.25, 0.25)])
    coords = voxelize_mesh(vertices, faces)
    # x = 0 is the boundary of voxels 31 and 32; y, z = +-0.25 are the boundaries at 16 and 48.
    assert as_set(coords) == set(itertools.product([31, 32], range(15, 49), range(15, 49)))


def test_output_is_sorted_unique_int32_and_independent_of_chunking() -> None:
    vertices, faces = map(torch.from_numpy, random_mesh(4, resolution=32))
    coords = voxelize_mesh(vertices, faces, resolution=32)
    assert coords.dtype == torch.int32 and coords.device == vertices.device and coords.shape[1] == 3
    linear = (coords.long() * torch.tensor([32 * 32, 32, 1])).sum(1)
    assert (linear.diff() > 0).all()
    for max_pairs in (1, 7, 1000):
        assert torch.equal(
            voxelize_mesh(vertices, faces, resolution=32, max_pairs_per_chunk=max_pairs), coords
        )


def test_empty_faces_give_no_voxels() -> None:
    coords = voxelize_mesh(torch.zeros(4, 3), torch.zeros(0, 3, dtype=torch.long))
    assert coords.shape == (0, 3) and coords.dtype == torch.int32


def test_voxel_centers() -> None:
    centers = voxel_centers(torch.tensor([[0, 31, 63]], dtype=torch.int32))
    assert centers.dtype == torch.float32
    assert torch.equal(centers, torch.tensor([[-0.5 + 0.5 / 64, -0.5 / 64, 0.5 - 0.5 / 64]]))


@pytest.mark.parametrize(
    "vertices, faces, match",
    [
        (torch.zeros(3, 3), torch.tensor([[0, 1, 3]]), "faces index"),
        (torch.zeros(3, 3), torch.tensor([[0, -1, 2]]), "faces index"),
        (
            torch.tensor([[0.0, 0, 0], [float("nan"), 0, 0], [0, 0, float("inf")]]),
            torch.tensor([[0, 1, 2]]),
            "non-finite",
        ),
    ],
)
def test_bad_inputs_raise(vertices: torch.Tensor, faces: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        voxelize_mesh(vertices, faces)


def test_bad_shapes_and_options_raise() -> None:
    # Under the tests' jaxtyping import hook, shapes are rejected before the function's own ValueError.
    with pytest.raises((ValueError, TypeCheckError), match="vertices"):
        voxelize_mesh(torch.zeros(3, 2), torch.tensor([[0, 1, 2]]))
    with pytest.raises((ValueError, TypeCheckError), match="faces"):
        voxelize_mesh(torch.zeros(3, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="resolution=0"):
        voxelize_mesh(torch.zeros(3, 3), torch.tensor([[0, 1, 2]]), resolution=0)
    with pytest.raises(ValueError, match="max_pairs_per_chunk=0"):
        voxelize_mesh(torch.zeros(3, 3), torch.tensor([[0, 1, 2]]), max_pairs_per_chunk=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu() -> None:
    vertices, faces = map(torch.from_numpy, random_mesh(5, resolution=64))
    coords = voxelize_mesh(vertices.cuda(), faces.cuda())
    assert coords.device.type == "cuda"
    assert torch.equal(coords.cpu(), voxelize_mesh(vertices, faces))
