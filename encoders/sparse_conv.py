"""Sub-manifold 3x3x3 convolution on active voxels, and 2x average-pool down/up-sampling between grids.

A sub-manifold convolution computes outputs only at the active voxels, from the active voxels among their 26
neighbours and themselves (TRELLIS's `SparseConv3d` over spconv's `SubMConv3d`). The kernel has spconv's
layout, (C_out, 3, 3, 3, C_in): `weight[:, 1 + dx, 1 + dy, 1 + dz]` multiplies the neighbour at offset
(dx, dy, dz), so released weights load unchanged into either backend:
- `spconv`: spconv's own kernel (the CPU wheel here; a CUDA wheel on GPUs where one is installed). Its CPU
  build has no backward pass (spconv 2.3.8 asks torch for a CUDA stream there), so on the CPU it serves
  inference only, and it races when torch runs several threads (results change from call to call), so it
  runs there with torch pinned to one thread;
- `torch`: 27 gathers and GEMMs over a neighbour table built by coordinate hashing; any device and dtype;
- `auto`: `spconv` when spconv can run on the tensor given, else `torch`.
"""

import contextlib
import dataclasses
import functools
import importlib.util
from collections.abc import Iterator
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from infra.errors import ConfigError

ConvBackend = Literal["auto", "spconv", "torch"]

_OFFSETS = torch.tensor(
    [(dx, dy, dz) for dx in (-1, 0, 1) for dy in (-1, 0, 1) for dz in (-1, 0, 1)], dtype=torch.int64
)  # (27, 3), in the order of the kernel's flattened (3, 3, 3) axes
_CENTRE = 13


@dataclasses.dataclass(frozen=True, eq=False)
class VoxelGrid:
    """The active voxels of a batch at one resolution; convolution structures are built once and cached."""

    coords: Int[Tensor, "N 4"]  # int32 (batch index, x, y, z), batch index non-decreasing
    resolution: int

    @functools.cached_property
    def batch_size(self) -> int:
        return int(self.coords[-1, 0]) + 1 if len(self.coords) else 0

    @functools.cached_property
    def neighbor_index(self) -> Int[Tensor, "N 27"]:
        """Row of each voxel's neighbour at every kernel offset, or N (a zero row) where it is inactive."""
        coords = self.coords.long()
        keys = self._keys(coords)
        sorted_keys, order = keys.sort()
        neighbour = coords[:, None, 1:] + _OFFSETS.to(coords.device)  # (N, 27, 3)
        inside = ((neighbour >= 0) & (neighbour < self.resolution)).all(dim=2)
        query = self._keys(torch.cat([coords[:, None, :1].expand(-1, 27, 1), neighbour], dim=2))
        position = torch.searchsorted(sorted_keys, query).clamp(max=max(len(keys) - 1, 0))
        found = inside & (sorted_keys[position] == query) if len(keys) else inside
        return torch.where(found, order[position], len(keys))

    @functools.cached_property
    def spconv_tensor(self) -> Any:
        """An spconv tensor of these voxels; the convolutions' index pairs are cached in its `indice_dict`."""
        import spconv.pytorch as spconv

        features = torch.empty(len(self.coords), 0, device=self.coords.device)
        return spconv.SparseConvTensor(features, self.coords, [self.resolution] * 3, self.batch_size)

    def _keys(self, coords: Int[Tensor, "... 4"]) -> Int[Tensor, "..."]:
        r = self.resolution
        return ((coords[..., 0] * r + coords[..., 1]) * r + coords[..., 2]) * r + coords[..., 3]


@dataclasses.dataclass(frozen=True, eq=False)
class Pooling:
    """Each voxel of a fine grid and its parent (coords // 2) in the coarse grid, sorted by (b, x, y, z)."""

    fine: VoxelGrid
    coarse: VoxelGrid
    parent: Int[Tensor, " N_fine"]  # int64 row of the coarse grid

    @classmethod
    def of(cls, fine: VoxelGrid) -> "Pooling":
        if fine.resolution % 2:
            raise ValueError(f"cannot halve a grid of odd resolution {fine.resolution}")
        r = fine.resolution // 2
        b, xyz = fine.coords[:, 0].long(), fine.coords[:, 1:].long() // 2
        keys = ((b * r + xyz[:, 0]) * r + xyz[:, 1]) * r + xyz[:, 2]  # ordered as (b, x, y, z)
        unique_keys, parent = torch.unique(keys, return_inverse=True)  # sorted; far faster than unique(dim=0)
        digits = [unique_keys // r**3, unique_keys // r**2 % r, unique_keys // r % r, unique_keys % r]
        return cls(fine, VoxelGrid(torch.stack(digits, dim=1).to(torch.int32), r), parent)

    def downsample(self, feats: Float[Tensor, "N_fine C"]) -> Float[Tensor, "N_coarse C"]:
        """The mean of each coarse voxel's children."""
        num_coarse = len(self.coarse.coords)
        sums = feats.new_zeros(num_coarse, feats.shape[1]).index_add_(0, self.parent, feats)
        counts = torch.bincount(self.parent, minlength=num_coarse).clamp_min(1)
        return sums / counts[:, None].to(feats.dtype)

    def upsample(self, feats: Float[Tensor, "N_coarse C"]) -> Float[Tensor, "N_fine C"]:
        """Each fine voxel takes its parent's features."""
        return feats[self.parent]


class _Kernel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, 3, 3, 3, in_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels))


class SubmanifoldConv3d(nn.Module):
    """3x3x3 sub-manifold convolution; its parameters are `conv.weight` and `conv.bias`, TRELLIS's names."""

    def __init__(self, in_channels: int, out_channels: int, *, backend: ConvBackend = "auto") -> None:
        super().__init__()
        if backend not in get_args(ConvBackend):
            raise ConfigError(
                f"unknown convolution backend {backend!r}; choose one of {get_args(ConvBackend)}"
            )
        self.backend = backend
        self.conv = _Kernel(in_channels, out_channels)

    def forward(self, feats: Float[Tensor, "N C_in"], grid: VoxelGrid) -> Float[Tensor, "N C_out"]:
        weight, bias = self.conv.weight, self.conv.bias
        needs_grad = torch.is_grad_enabled() and (feats.requires_grad or weight.requires_grad)
        if _use_spconv(self.backend, feats, needs_grad=needs_grad):
            return _spconv_conv(feats, weight, bias, grid)
        return _GatherConv.apply(feats, weight, bias, grid.neighbor_index)


def _use_spconv(backend: ConvBackend, feats: Tensor, *, needs_grad: bool) -> bool:
    if backend == "torch":
        return False
    reason = _spconv_unavailable(feats, needs_grad=needs_grad)
    if backend == "spconv" and reason:
        raise ConfigError(f"convolution backend 'spconv' is unavailable: {reason}")
    return not reason


def _spconv_unavailable(feats: Tensor, *, needs_grad: bool) -> str:
    """Why spconv cannot convolve this tensor, or '' when it can."""
    if importlib.util.find_spec("spconv") is None:
        return "the spconv package is not installed"
    if feats.is_cuda:
        from spconv.cppconstants import CPU_ONLY_BUILD

        if CPU_ONLY_BUILD:
            return "the installed spconv wheel is CPU-only"
    elif feats.dtype != torch.float32:
        return f"spconv's CPU kernels need float32, got {feats.dtype}"
    elif needs_grad:
        return "spconv's CPU build has no backward pass"
    return ""


def _spconv_conv(
    feats: Float[Tensor, "N C_in"], weight: Tensor, bias: Tensor, grid: VoxelGrid
) -> Float[Tensor, "N C_out"]:
    import spconv.pytorch as spconv

    module = _spconv_module(weight.shape[-1], weight.shape[0])
    with _one_torch_thread_on_cpu(feats.device):
        out = torch.func.functional_call(
            module,
            {"weight": weight, "bias": bias},
            (grid.spconv_tensor.replace_feature(feats.contiguous()),),
        )
    assert isinstance(out, spconv.SparseConvTensor)
    return out.features


@contextlib.contextmanager
def _one_torch_thread_on_cpu(device: torch.device) -> Iterator[None]:
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.cache
def _spconv_module(in_channels: int, out_channels: int) -> nn.Module:
    """A parameter-less spconv layer: `functional_call` supplies the weights; the key names the cached pairs."""
    import spconv.pytorch as spconv

    with torch.device("meta"):
        return spconv.SubMConv3d(in_channels, out_channels, 3, indice_key="submanifold_3x3x3")


class _GatherConv(torch.autograd.Function):
    """The gather convolution with a gather-only backward pass: autograd's backward of 27 row gathers is 27
    scatter-adds with colliding rows (sorted, slow on GPUs); here the input gradient is itself a gather
    convolution, with the mirrored kernel, since sub-manifold neighbourhoods are symmetric: j is i's neighbour at
    offset d exactly when i is j's at -d. Only the input features are kept for the backward pass."""

    @staticmethod
    def forward(
        ctx: Any, feats: Tensor, weight: Tensor, bias: Tensor | None, neighbor_index: Tensor
    ) -> Tensor:  # fmt: skip
        ctx.save_for_backward(feats, weight, neighbor_index)
        ctx.has_bias = bias is not None
        return _gather_conv(feats, weight, bias, neighbor_index)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        feats, weight, neighbor_index = ctx.saved_tensors
        grad_feats = grad_weight = grad_bias = None
        grad_out = grad_out.contiguous()
        if ctx.needs_input_grad[0]:
            mirrored = weight.flip(1, 2, 3).transpose(0, 4)  # (C_in, 3, 3, 3, C_out)
            grad_feats = _gather_conv(grad_out.to(weight.dtype), mirrored, None, neighbor_index).to(
                feats.dtype
            )
        if ctx.needs_input_grad[1]:
            padded = torch.cat([feats, feats.new_zeros(1, feats.shape[1])]).to(grad_out.dtype)
            per_offset = [
                grad_out.t() @ padded[neighbor_index[:, k]] for k in range(27)
            ]  # 27 x (C_out, C_in)
            grad_weight = torch.stack(per_offset, dim=1).unflatten(1, (3, 3, 3)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(0)
        return grad_feats, grad_weight, grad_bias, None


def _gather_conv(
    feats: Float[Tensor, "N C_in"],
    weight: Float[Tensor, "C_out 3 3 3 C_in"],
    bias: Float[Tensor, " C_out"] | None,
    neighbor_index: Int[Tensor, "N 27"],
) -> Float[Tensor, "N C_out"]:
    """sum over offsets k of W_k @ feats[neighbour k], one gather and GEMM per offset (no (N, 27 C) buffer)."""
    kernels = weight.flatten(1, 3).transpose(0, 1)  # (27, C_out, C_in)
    padded = torch.cat([feats, feats.new_zeros(1, feats.shape[1])])  # row N: the absent neighbour
    out = feats @ kernels[_CENTRE].t()
    if bias is not None:
        out = out + bias.to(out.dtype)
    for k in range(27):
        if k != _CENTRE:
            out = torch.addmm(out, padded[neighbor_index[:, k]], kernels[k].t())
    return out
