"""Helpers shared by the encoder tests."""

import torch


def random_coords(sizes: list[int], *, grid: int, seed: int) -> torch.Tensor:
    """(sum(sizes), 4) int32: per batch element, `size` distinct voxels of a grid^3 in random order."""
    generator = torch.Generator().manual_seed(seed)
    coords = []
    for b, size in enumerate(sizes):
        flat = torch.randperm(grid**3, generator=generator)[:size]
        xyz = torch.stack([flat // grid**2, flat // grid % grid, flat % grid], dim=1)
        coords.append(torch.cat([torch.full((size, 1), b), xyz], dim=1))
    return torch.cat(coords).to(torch.int32)


def shell_coords(radii: list[float], *, grid: int) -> torch.Tensor:
    """(N, 4) int32: per batch element a one-voxel-thick sphere shell of the given radius about the grid
    centre, sorted by (x, y, z): a surface, so most voxels have active neighbours (unlike random voxels)."""
    axis = torch.arange(grid)
    xyz = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    distance = (xyz.float() - grid / 2 + 0.5).norm(dim=1)
    coords = []
    for b, radius in enumerate(radii):
        shell = xyz[(distance > radius - 1) & (distance <= radius)]
        coords.append(torch.cat([torch.full((len(shell), 1), b), shell], dim=1))
    return torch.cat(coords).to(torch.int32)
