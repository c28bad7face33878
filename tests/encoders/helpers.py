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
