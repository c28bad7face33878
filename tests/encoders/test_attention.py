"""Sparse window attention against plain dense attention with a same-window mask."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from encoders.attention import sparse_window_attention, window_partition
from infra.errors import ConfigError
from tests.encoders.helpers import random_coords

W = 8


def window_keys(coords: torch.Tensor, shift: int) -> torch.Tensor:
    """(N, 4): the batch index and the window of each token, per the reference formula."""
    return torch.cat([coords[:, :1], (coords[:, 1:] + shift) // W], dim=1)


def dense_window_attention(qkv: torch.Tensor, coords: torch.Tensor, shift: int) -> torch.Tensor:
    """Full N x N attention, masked to pairs in the same batch element and the same window."""
    q, k, v = qkv.float().unbind(1)  # (N, H, D) each
    keys = window_keys(coords, shift)
    same_window = (keys[:, None, :] == keys[None, :, :]).all(dim=2)  # (N, N)
    scores = torch.einsum("nhd,mhd->hnm", q, k) / math.sqrt(q.shape[-1])
    weights = scores.masked_fill(~same_window, float("-inf")).softmax(dim=-1)
    return torch.einsum("hnm,mhd->nhd", weights, v)


def random_qkv(num_tokens: int, *, heads: int = 2, head_dim: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_tokens, 3, heads, head_dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shift", [0, 4])
def test_matches_dense_masked_attention(shift: int) -> None:
    # Sparse batch elements plus a solid 8^3 block, so windows range from 1 token to a full 512.
    coords = random_coords([300, 700, 512], grid=24, seed=1)
    block = torch.stack(torch.meshgrid(*[torch.arange(8, 16)] * 3, indexing="ij"), dim=-1).reshape(-1, 3)
    coords[-512:, 1:] = block.to(torch.int32)
    qkv = random_qkv(len(coords), seed=2)
    out = sparse_window_attention(qkv, window_partition(coords, W, shift), backend="sdpa")
    torch.testing.assert_close(out, dense_window_attention(qkv, coords, shift), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shift", [0, 4])
def test_partition_groups_exactly_the_tokens_of_each_window(shift: int) -> None:
    coords = random_coords([200, 50, 400], grid=20, seed=3)
    partition = window_partition(coords, W, shift)
    assert torch.equal(partition.order.sort().values, torch.arange(len(coords)))
    keys = window_keys(coords, shift)[partition.order]
    bounds = partition.cu_seqlens.tolist()
    window_of = [tuple(keys[start].tolist()) for start in bounds[:-1]]
    for window, (start, end) in zip(window_of, itertools.pairwise(bounds), strict=True):
        assert end > start and (keys[start:end] == torch.tensor(window)).all()
    assert len(set(window_of)) == len(window_of) == len(torch.unique(keys, dim=0))
    assert partition.max_len == max(end - start for start, end in itertools.pairwise(bounds))


@pytest.mark.parametrize("shift", [0, 4])
def test_windows_hold_at_most_w_cubed_tokens(shift: int) -> None:
    coords = random_coords([16**3, 16**3], grid=16, seed=4)  # two fully occupied 16^3 grids
    partition = window_partition(coords, W, shift)
    assert partition.cu_seqlens.diff().max() == partition.max_len == W**3  # full windows, none larger


def test_sdpa_runs_once_per_bucket_not_per_window(monkeypatch: pytest.MonkeyPatch) -> None:
    coords = random_coords([3000, 3000], grid=40, seed=5)
    num_windows = len(window_partition(coords, W, 0).cu_seqlens) - 1
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    sparse_window_attention(random_qkv(len(coords)), window_partition(coords, W, 0), backend="sdpa")
    assert num_windows > 100 and 1 <= len(calls) <= 6


def test_empty_input() -> None:
    coords = torch.zeros(0, 4, dtype=torch.int32)
    partition = window_partition(coords, W, 4)
    assert partition.order.shape == (0,) and partition.cu_seqlens.tolist() == [0] and partition.max_len == 0
    out = sparse_window_attention(random_qkv(0), window_partition(coords, W, 4), backend="sdpa")
    assert out.shape == (0, 2, 8)


def test_auto_falls_back_to_sdpa_on_cpu() -> None:
    coords = random_coords([100], grid=16, seed=6)
    qkv = random_qkv(len(coords))
    auto = sparse_window_attention(qkv, window_partition(coords, W, 0))
    assert torch.equal(auto, sparse_window_attention(qkv, window_partition(coords, W, 0), backend="sdpa"))


@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_unavailable_backend_says_why(backend: str) -> None:
    coords = random_coords([10], grid=8, seed=7)
    with pytest.raises(ConfigError, match=f"{backend}.*unavailable.*CUDA tensor"):
        sparse_window_attention(random_qkv(10), window_partition(coords, W, 0), backend=backend)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["sdpa", "torch_varlen", "flash_attn"])
def test_cuda_backends_agree(backend: str, dtype: torch.dtype) -> None:
    coords = random_coords([3000, 5000, 512], grid=32, seed=8).cuda()
    qkv = random_qkv(len(coords), heads=4, head_dim=64, seed=9).to("cuda", dtype)
    try:
        out = sparse_window_attention(qkv, window_partition(coords, W, 4), backend=backend)
    except ConfigError as err:
        pytest.skip(str(err))
    expected = dense_window_attention(qkv, coords, shift=4)
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)
