"""Sparse voxel tensors: the features of a batch of assets' active voxels and where those voxels are.

TRELLIS wraps an spconv tensor even for attention-only models; only the coordinates and features matter,
so this is a plain pair of tensors.
"""

import dataclasses

import torch
from jaxtyping import Float, Int
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class SparseTensor:
    """Features on the active voxels of a batch; the tokens of one batch element are contiguous rows."""

    coords: Int[Tensor, "N 4"]  # int32 (batch index, x, y, z), batch index non-decreasing
    feats: Float[Tensor, "N C"]

    def __post_init__(self) -> None:
        if self.coords.ndim != 2 or self.coords.shape[1] != 4 or self.coords.dtype != torch.int32:
            raise ValueError(
                f"coords must be int32 of shape (N, 4), got {self.coords.dtype} {tuple(self.coords.shape)}"
            )
        if self.feats.ndim != 2 or self.feats.shape[0] != self.coords.shape[0]:
            raise ValueError(
                f"feats must be (N, C) with N = {self.coords.shape[0]} rows of coords, got {tuple(self.feats.shape)}"
            )
        if self.feats.device != self.coords.device:
            raise ValueError(f"coords are on {self.coords.device} but feats are on {self.feats.device}")
        if bool((self.coords < 0).any()):
            raise ValueError("coords must be non-negative")
        if bool((self.coords[1:, 0] < self.coords[:-1, 0]).any()):
            raise ValueError(
                "batch indices (coords[:, 0]) must be non-decreasing: one batch element's rows contiguous"
            )

    @property
    def batch_size(self) -> int:
        return int(self.coords[-1, 0]) + 1 if len(self.coords) else 0

    @property
    def device(self) -> torch.device:
        return self.coords.device

    def replace(self, *, feats: Float[Tensor, "N D"]) -> "SparseTensor":
        """The same voxels with other features."""
        return dataclasses.replace(self, feats=feats)
