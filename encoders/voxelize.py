"""Surface voxelization of a normalized triangle mesh on TRELLIS's 64^3 grid over [-0.5, 0.5]^3.

TRELLIS voxelizes with Open3D's `VoxelGrid.create_from_triangle_mesh_within_bounds` after clipping the
vertices to +-(0.5 - 1e-6): a voxel is occupied iff some triangle intersects its closed box (Akenine-Moller's
separating-axis test, so touching counts). Open3D <= 0.17 had a `break` that kept only the first voxel along
the third axis per triangle (fixed by Open3D PR #6325), leaving holes under triangles that span several
voxels; that bug is deliberately not reproduced.

Open3D tests one triangle at a time. Here triangles are grouped by the shape of their block of candidate
voxels, and all (triangle, candidate) pairs of a group are tested at once as tensors, in float64 on any
device: the same code serves CPU and CUDA, and 5M triangles take seconds on two CPU cores.
"""

import itertools
import math

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

_CLIP = 0.5 - 1e-6
"""TRELLIS clips vertex coordinates to [-_CLIP, _CLIP] before voxelizing."""
_FLAT = 1e-12
"""A triangle with |normal| <= _FLAT |edge 0| |edge 1| (L1 norms) is taken as a segment: see `_block_hits`."""
_MAX_RESOLUTION = 1024
"""The dense occupancy grid takes R^3 bytes (1 GiB here); linear voxel indices stay within int32."""


def voxelize_mesh(
    vertices: Float[Tensor, "V 3"],
    faces: Int[Tensor, "F 3"],
    *,
    resolution: int = 64,
    max_pairs_per_chunk: int = 1 << 22,
) -> Int[Tensor, "N 3"]:
    """Voxels of the `resolution`^3 grid over [-0.5, 0.5]^3 that some triangle intersects.

    Voxel (i, j, k) is the closed box [i/R - 0.5, (i+1)/R - 0.5] x ... (R = `resolution`); a triangle touching
    it counts. This is a shell: the interior of a closed surface stays empty.

    Args:
        vertices: normalized mesh in Blender world coordinates (Z up), inside [-0.5, 0.5]^3; any float dtype.
            Coordinates are clipped to +-(0.5 - 1e-6) first, as TRELLIS does.
        faces: vertex indices of each triangle.
        resolution: grid side length R, at most 1024.
        max_pairs_per_chunk: bounds memory (about 30 bytes a pair): how many (triangle, candidate voxel) pairs
            are tested at once. A chunk holds at least one triangle, i.e. at most R^3 candidates.

    Returns:
        int32 (x, y, z) indices of the occupied voxels, unique, sorted by x*R*R + y*R + z, on
        `vertices.device`. An empty face list gives an empty (0, 3) result.

    Raises:
        ValueError: wrong shapes or dtypes, non-finite vertices, faces indexing outside `vertices`,
            `resolution` outside [1, 1024], `max_pairs_per_chunk` below 1.

    Examples:
        >>> x = 0.01  # in voxel 2 of 4 along x
        >>> square = torch.tensor([[x, -0.5, -0.5], [x, 0.5, -0.5], [x, 0.5, 0.5], [x, -0.5, 0.5]])
        >>> coords = voxelize_mesh(square, torch.tensor([[0, 1, 2], [0, 2, 3]]), resolution=4)
        >>> coords.shape, coords.dtype, coords[:, 0].unique().tolist()
        (torch.Size([16, 3]), torch.int32, [2])
        >>> voxel_centers(coords[:2], resolution=4)
        tensor([[ 0.1250, -0.3750, -0.3750],
                [ 0.1250, -0.3750, -0.1250]])
    """
    if vertices.ndim != 2 or vertices.shape[1] != 3 or not vertices.is_floating_point():
        raise ValueError(
            f"vertices must be a float (V, 3) tensor, got {vertices.dtype} {tuple(vertices.shape)}"
        )
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.is_floating_point() or faces.dtype == torch.bool:
        raise ValueError(f"faces must be an integer (F, 3) tensor, got {faces.dtype} {tuple(faces.shape)}")
    if not 1 <= resolution <= _MAX_RESOLUTION:
        raise ValueError(f"resolution={resolution} must be in [1, {_MAX_RESOLUTION}]")
    if max_pairs_per_chunk < 1:
        raise ValueError(f"max_pairs_per_chunk={max_pairs_per_chunk} must be >= 1")
    vertices = vertices.detach()
    if not bool(torch.isfinite(vertices).all()):
        bad = (~torch.isfinite(vertices)).any(1).nonzero()[:5, 0].tolist()
        raise ValueError(f"vertices has non-finite coordinates (rows {bad}, first 5 shown)")
    corners = faces.T.to(vertices.device, torch.long).contiguous()  # (corner, triangle)
    if corners.numel() and (int(corners.min()) < 0 or int(corners.max()) >= len(vertices)):
        low, high = int(corners.min()), int(corners.max())
        raise ValueError(f"faces index vertices {low}..{high}, but there are {len(vertices)} vertices")
    # Voxel units: voxel i spans [i, i+1] on each axis. Exact scaling when R is a power of two.
    points = vertices.to(torch.float64).clamp(-_CLIP, _CLIP) * resolution + resolution / 2
    occupied = _occupancy(points, corners, resolution, max_pairs_per_chunk)
    return occupied.view(resolution, resolution, resolution).nonzero().to(torch.int32)


def voxel_centers(coords: Int[Tensor, "N 3"], *, resolution: int = 64) -> Float[Tensor, "N 3"]:
    """float32 centres (i + 0.5)/R - 0.5 of voxels (x, y, z): the points TRELLIS writes to its voxel PLY."""
    return (coords.to(torch.float32) + 0.5) / resolution - 0.5


def _occupancy(
    points: Float[Tensor, "V 3"], corners: Int[Tensor, "3 F"], resolution: int, max_pairs: int
) -> Bool[Tensor, " R3"]:
    """Flat x-major occupancy grid: True where a triangle (`points` in voxel units) meets the voxel's box."""
    R = resolution
    strides = torch.tensor([R * R, R, 1], dtype=torch.int32, device=points.device)
    # Candidates per axis: voxels i with i <= max and i + 1 >= min over the triangle, i.e. exactly those that
    # pass the 3 box-axis tests of the SAT. Clipping keeps 0 < points < R, so the block lies inside the grid.
    # Gathered per corner as int16 (lowest and highest voxel of each vertex): the gather dominates big meshes.
    cells = torch.cat([torch.ceil(points) - 1, torch.floor(points)], 1).to(torch.int16)
    cells = cells.index_select(0, corners.flatten()).view(3, -1, 6)
    lo = cells[..., :3].amin(0).int()
    extent = cells[..., 3:].amax(0) - lo + 1
    first = (lo * strides).sum(1, dtype=torch.int32)  # linear index of each triangle's first candidate
    occupied = torch.zeros(R**3, dtype=torch.bool, device=points.device)
    # Most triangles of a dense mesh lie inside one voxel's box, which they therefore intersect.
    inside = (extent == 1).all(1)
    occupied[first[inside]] = True

    # The others are tested in blocks of candidates, grouped by block shape. A triangle's extent is rounded up
    # to a block size from 1, 2, 3, 4, 6, 8, 12, ... so that a mesh of varied triangles makes few groups (each
    # costs a few torch calls); the box-axis tests drop the padding.
    rest = (~inside).nonzero()[:, 0]
    blocks = torch.tensor(_block_sizes(R), device=points.device)[extent[rest]]
    shape_keys, order = torch.sort(((blocks - 1) * strides).sum(1))
    keys, counts = torch.unique_consecutive(shape_keys, return_counts=True)
    points_by_axis = points.T.contiguous()
    for key, members in zip(keys.tolist(), torch.split(rest[order], counts.tolist()), strict=True):
        shape = (key // (R * R) + 1, key // R % R + 1, key % R + 1)
        i, j, k = (torch.arange(n, device=points.device) for n in shape)
        offsets = (i[:, None, None] * R * R + j[:, None] * R + k)[..., None]  # (ex, ey, ez, 1), from `first`
        step = max(1, max_pairs // math.prod(shape))
        for start in range(0, len(members), step):
            chunk = members[start : start + step]
            triangles = points_by_axis[:, corners[:, chunk]]  # (axis, vertex, triangle): long contiguous rows
            hits = _block_hits(triangles, lo[chunk].T, extent[chunk].T, shape)
            occupied[(first[chunk] + offsets)[hits]] = True
    return occupied


def _block_sizes(resolution: int) -> list[int]:
    """Block side for each extent 0..R: the smallest of 1, 2, 3, 4, 6, 8, 12, ... (<= 1.5x) that holds it."""
    ladder = sorted(m << k for m in (1, 3) for k in range(resolution.bit_length() + 1))
    return [min(resolution, next(size for size in ladder if size >= e)) for e in range(resolution + 1)]


def _block_hits(
    triangles: Float[Tensor, "3 3 T"],
    lo: Int[Tensor, "3 T"],
    extent: Int[Tensor, "3 T"],
    shape: tuple[int, int, int],
) -> Bool[Tensor, "ex ey ez T"]:
    """SAT test of each triangle (axis, vertex, triangle) against each voxel of the block `lo + [0, shape)`.

    The 3 box-axis tests keep the triangle's own `extent` of the block, then come the triangle normal and the
    9 edge x box-axis axes. A zero axis (degenerate triangle) never separates, as in Open3D. Triangles are the
    innermost dimension, so every elementwise kernel runs over long contiguous rows.
    """
    # Vertices relative to the centre of the block's first voxel; voxel (i, j, k) of the block: that shifted.
    rel = triangles - (lo.to(triangles.dtype) + 0.5)[:, None]
    edges = triangles.roll(-1, dims=1) - triangles  # edge e runs from vertex e to e + 1; exact when short
    offsets = [
        torch.arange(n, dtype=rel.dtype, device=rel.device).view((n,) + (1,) * (3 - c))
        for c, n in enumerate(shape)
    ]
    # Along each axis, a voxel is kept iff the offset of its centre lies in [lowest, highest] projection of
    # the triangle, each widened by the projection radius of the half-unit box.
    normal = torch.linalg.cross(edges[:, 0], edges[:, 1], dim=0)
    # Collinear vertices (up to rounding, or a fused multiply-add in `cross`) leave a normal of rounding
    # noise, whose plane would cut holes along the segment they form: drop it, as for a degenerate triangle.
    is_flat = normal.abs().sum(0) <= _FLAT * edges[:, 0].abs().sum(0) * edges[:, 1].abs().sum(0)
    normal = torch.where(is_flat, 0.0, normal)
    plane = (normal * rel[:, 0]).sum(0)
    radius = 0.5 * normal.abs().sum(0)
    dot = offsets[0] * normal[0] + offsets[1] * normal[1] + offsets[2] * normal[2]
    hits = (dot >= plane - radius) & (dot <= plane + radius)
    for c in range(3):
        hits &= offsets[c] < extent[c]

    # Edge e x unit axis k has components edge[c2] along c1 and -edge[c1] along c2 (c1, c2 = k + 1, k + 2).
    c1, c2 = [1, 2, 0], [2, 0, 1]
    a1, a2 = edges[c2], -edges[c1]  # (axis k, edge e, T)
    on_edge = a1 * rel[c1] + a2 * rel[c2]  # both ends of edge e project here
    opposite = rel.roll(1, dims=1)  # the vertex off edge e
    off_edge = a1 * opposite[c1] + a2 * opposite[c2]
    radius = 0.5 * (a1.abs() + a2.abs())
    low, high = torch.minimum(on_edge, off_edge) - radius, torch.maximum(on_edge, off_edge) + radius
    for k, e in itertools.product(range(3), range(3)):
        dot = offsets[c1[k]] * a1[k, e] + offsets[c2[k]] * a2[k, e]  # spans two block axes only: cheap
        hits &= (dot >= low[k, e]) & (dot <= high[k, e])
    return hits
