"""Sparse 3-D window self-attention (TRELLIS's "swin" mode, reference section 5.1).

Tokens are grouped into cubic windows of `window_size` voxels per side, after adding `shift` to every
spatial coordinate (no wrap-around); each window attends only to itself. A window is a set of existing
tokens, so there is no mask between shifted regions and the order of tokens inside a window is irrelevant.

Backends run the same variable-length attention:
- `sdpa`: `scaled_dot_product_attention` on any device and dtype. Windows are padded into a few buckets of
  equal length (powers of two, at least 16), one batched call per bucket with a key-padding mask; windows of
  more than 1024 tokens (whole objects, in the flow model) are attended one by one, unpadded and unmasked,
  which lets SDPA use its memory-efficient kernels instead of materialising a padded score matrix.
- `flash_attn`: `flash_attn.flash_attn_varlen_qkvpacked_func` (the `flash_attn` package; CUDA, fp16/bf16),
  the kernel the released TRELLIS models ran with.
- `torch_varlen`: `torch.nn.attention.varlen.varlen_attn`, PyTorch's own FlashAttention varlen kernel
  (CUDA, fp16/bf16; absent from older PyTorch releases).
- `auto`: `flash_attn`, else `torch_varlen`, else `sdpa`, whichever first can run on the tensor given.
"""

import dataclasses
from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from infra.errors import ConfigError

AttentionBackend = Literal["auto", "sdpa", "torch_varlen", "flash_attn"]

# (qkv (M, 3, H, D) sorted by window, cu_seqlens, max_len) -> (M, H, D)
_VarlenKernel = Callable[[Tensor, Tensor, int], Tensor]
_MIN_BUCKET_LEN = 16
_MAX_BUCKET_LEN = 1024


@dataclasses.dataclass(frozen=True)
class WindowPartition:
    """Tokens sorted by window: window w holds `order[cu_seqlens[w]:cu_seqlens[w + 1]]`."""

    order: Int[Tensor, " N"]  # int64 token indices
    cu_seqlens: Int[Tensor, " windows_plus_1"]  # int32, starts at 0; empty windows are dropped
    max_len: int
    """Tokens in the fullest window (at most window_size ** 3)."""


def window_partition(coords: Int[Tensor, "N 4"], window_size: int, shift: int) -> WindowPartition:
    """Group tokens by (batch index, floor((x + shift) / window_size), same for y and z).

    Args:
        coords: (batch index, x, y, z) of each token, non-negative.
        window_size: window side W in voxels.
        shift: added to x, y and z before windowing (0 or W // 2 in the encoder).
    """
    if window_size < 1 or shift < 0:
        raise ValueError(f"need window_size >= 1 and shift >= 0, got {window_size} and {shift}")
    device = coords.device
    if coords.shape[0] == 0:
        return WindowPartition(
            torch.zeros(0, dtype=torch.long, device=device),
            torch.zeros(1, dtype=torch.int32, device=device),
            0,
        )
    window = (coords[:, 1:].long() + shift) // window_size  # (N, 3)
    num = window.amax(dim=0) + 1  # windows per axis = ceil((max(c + shift) + 1) / W)
    window_id = coords[:, 0].long()  # b * nx * ny * nz + wx * ny * nz + wy * nz + wz
    for axis in range(3):
        window_id = window_id * num[axis] + window[:, axis]
    order = torch.argsort(window_id, stable=True)
    counts = torch.unique_consecutive(window_id[order], return_counts=True)[1]
    cu_seqlens = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    return WindowPartition(order, cu_seqlens, int(counts.max()))


def sparse_window_attention(
    qkv: Float[Tensor, "N 3 H D"],
    partition: WindowPartition,
    *,
    backend: AttentionBackend = "auto",
) -> Float[Tensor, "N H D"]:
    """Self-attention of each token with the tokens of its window, scale 1 / sqrt(D).

    Args:
        qkv: queries, keys and values of each token, heads contiguous.
        partition: the tokens' windows (`window_partition`); a model computes it once per shift, not per block.
        backend: which kernel runs the attention (module docstring).

    Returns:
        The attention output of each token, in the order of `qkv`.

    Raises:
        ConfigError: `backend` cannot run here (not installed, not on CUDA, or not fp16/bf16); says why.
    """
    if qkv.shape[0] != partition.order.shape[0]:
        raise ValueError(
            f"qkv has {qkv.shape[0]} rows but the partition has {partition.order.shape[0]} tokens"
        )
    kernel = _select_kernel(backend, qkv)
    out_sorted = kernel(qkv[partition.order], partition.cu_seqlens, partition.max_len)
    out = torch.empty_like(out_sorted)
    out[partition.order] = out_sorted
    return out


def _select_kernel(backend: str, qkv: Tensor) -> _VarlenKernel:
    if backend not in get_args(AttentionBackend):
        raise ConfigError(
            f"unknown attention backend {backend!r}; choose one of {get_args(AttentionBackend)}"
        )
    if backend == "auto":
        kernels = (_find_kernel(name, qkv) for name in ("flash_attn", "torch_varlen"))
        return next((k for k in kernels if not isinstance(k, str)), _sdpa_buckets)
    kernel = _find_kernel(backend, qkv)
    if isinstance(kernel, str):
        raise ConfigError(f"attention backend {backend!r} is unavailable: {kernel}")
    return kernel


def _find_kernel(backend: str, qkv: Tensor) -> _VarlenKernel | str:
    """The kernel of `backend` for this tensor, or the reason it cannot run."""
    if backend == "sdpa":
        return _sdpa_buckets
    if not qkv.is_cuda:
        return f"it needs a CUDA tensor, got one on {qkv.device}"
    if qkv.dtype not in (torch.float16, torch.bfloat16):
        return f"it needs float16 or bfloat16, got {qkv.dtype}"
    if backend == "flash_attn":
        try:
            from flash_attn import flash_attn_varlen_qkvpacked_func
        except ImportError as err:
            return f"the flash_attn package cannot be imported ({err})"
        return flash_attn_varlen_qkvpacked_func
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as err:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn ({err})"
    return lambda qkv, cu, max_len: varlen_attn(*qkv.unbind(1), cu, cu, max_len, max_len)


def _sdpa_buckets(
    qkv: Float[Tensor, "M 3 H D"], cu_seqlens: Int[Tensor, " windows_plus_1"], max_len: int
) -> Float[Tensor, "M H D"]:
    """Varlen attention through SDPA: one padded batch per bucket of windows of similar length.

    Bucket lengths are powers of two, so a window wastes less than half its padded rows and the number of
    buckets (SDPA calls) is about log2(max_len / 16) + 1, whatever the number of windows.
    """
    out = torch.empty(qkv.shape[0], *qkv.shape[2:], dtype=qkv.dtype, device=qkv.device)
    if qkv.shape[0] == 0:
        return out
    starts, lengths = cu_seqlens[:-1].long(), cu_seqlens.diff().long()
    is_long = lengths > _MAX_BUCKET_LEN
    for start, length in zip(starts[is_long].tolist(), lengths[is_long].tolist()):
        q, k, v = qkv[start : start + length].permute(1, 2, 0, 3)[:, None]  # 3 x (1, H, L, D): fused kernels
        out[start : start + length] = F.scaled_dot_product_attention(q, k, v)[0].transpose(0, 1)
    bucket_len = torch.clamp(lengths, min=_MIN_BUCKET_LEN)
    bucket_len = 2 ** torch.ceil(torch.log2(bucket_len.double())).long()
    for padded_len in bucket_len[~is_long].unique().tolist():
        windows = torch.nonzero((bucket_len == padded_len) & ~is_long).squeeze(1)
        rows = starts[windows, None] + torch.arange(padded_len, device=qkv.device)  # (w, L)
        is_valid = rows < (starts + lengths)[windows, None]
        q, k, v = qkv[rows.clamp(max=qkv.shape[0] - 1)].permute(2, 0, 3, 1, 4)  # 3 x (w, H, L, D)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=is_valid[:, None, None, :])
        out[rows[is_valid]] = o.transpose(1, 2)[is_valid]
    return out
