"""DINOv2's forward pass, rewritten to spend its time in matrix products and attention.

transformers' `Dinov2WithRegistersModel` computes the right function but, on an H100, a fifth of its time goes
to memory-bound passes between the products, and its patch embedding is a convolution that runs far below the
GPU's peak. This module computes the same function from the same weights with fewer passes:

- the patch embedding is one GEMM over unfolded 14 x 14 patches;
- query, key and value are one GEMM (their weights concatenated); attention reads them in place;
- layer scale is folded into the weights of the two output projections;
- the residual adds happen inside those GEMMs (cuBLAS's `C += A @ B`), so their biases cannot be added there.
  The residual stream is instead kept minus a per-block constant vector (the sum of the biases so far), which
  is added back inside the next LayerNorm and once at the end;
- on CUDA, each LayerNorm (with its shift) is one fused kernel and GELU runs in the fc1 GEMM's epilogue. That
  GELU is cuBLASLt's tanh form, which differs from the exact erf form by at most 4.7e-4 (near x = 2.7, where
  the bfloat16 activation it is written to has a spacing of 1.6e-2): the network's output differs from a
  float32 reference as much as transformers' bfloat16 output does (tests/encoders/test_dinov2.py on the GPU).
  On the CPU GELU is exact, and the whole pass matches transformers' to float32 rounding.

Measured on an H100 at batch 64 (docs/benchmarks.md): 533 img/s against 397 for transformers' module.
"""

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from infra.errors import ConfigError


class _ShiftedNorm(NamedTuple):
    """A LayerNorm applied to the stored residual stream plus the biases deferred so far."""

    shift: Float[Tensor, " C"]  # float32
    weight: Float[Tensor, " C"]
    bias: Float[Tensor, " C"]


_ATTENTION_PRIORITY = [
    SDPBackend.CUDNN_ATTENTION,  # 393 TFLOP/s at head dim 64 and 1374 tokens on an H100; FlashAttention-2: 270
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


@dataclasses.dataclass(frozen=True)
class _Block:
    """One transformer block's weights, folded for the fused pass. Matrices are (out, in), as in `nn.Linear`."""

    norm1: _ShiftedNorm
    qkv_weight: Float[Tensor, "QKV C"]
    qkv_bias: Float[Tensor, " QKV"]
    proj_weight: Float[Tensor, "C C"]  # x layer scale 1
    norm2: _ShiftedNorm
    fc1_weight: Float[Tensor, "M C"]
    fc1_bias: Float[Tensor, " M"]
    fc2_weight: Float[Tensor, "C M"]  # x layer scale 2


class FusedVit:
    """The last block's tokens (before the final LayerNorm) of a `Dinov2WithRegistersModel` at one input size.

    Built once from a loaded model, whose weights it copies in folded form: the model itself can be freed.
    """

    def __init__(self, model: torch.nn.Module, *, image_size_px: int) -> None:
        config = model.config
        if getattr(config, "use_swiglu_ffn", False):
            raise ConfigError("the fused DINOv2 pass supports the GELU MLP (ViT-S/B/L), not SwiGLU (ViT-g)")
        self.channels, self.heads = config.hidden_size, config.num_attention_heads
        self.patch_size, self.eps = config.patch_size, config.layer_norm_eps
        self.num_prefix_tokens = 1 + config.num_register_tokens  # cls + registers
        self.grid_size = image_size_px // self.patch_size
        self.device, self.dtype = model.embeddings.cls_token.device, model.embeddings.cls_token.dtype
        with torch.no_grad():
            self._fold_embeddings(model.embeddings, image_size_px)
            self.blocks, self.final_shift = self._fold_blocks(model.encoder.layer)
        is_cuda = self.device.type == "cuda"
        self._norm = torch.compile(_shifted_layer_norm, dynamic=False) if is_cuda else _shifted_layer_norm
        self._fc1 = _fc1_gelu_epilogue if is_cuda else _fc1_gelu

    @torch.inference_mode()
    def __call__(self, pixels: Float[Tensor, "B 3 S S"]) -> Float[Tensor, "B T C"]:
        """Every token in the model's dtype: cls, the registers, then the patches in row-major order
        (T = num_prefix_tokens + G * G, patch token = row * G + col)."""
        batch = pixels.shape[0]
        stream = self._embed(pixels)  # (B * T, C), the residual stream minus the deferred biases
        tokens = stream.shape[0] // batch
        with sdpa_kernel(_ATTENTION_PRIORITY, set_priority=True):
            self._blocks(stream, batch, tokens)
        return (stream.view(batch, tokens, self.channels).float() + self.final_shift).to(self.dtype)

    def _blocks(self, stream: Float[Tensor, "BT C"], batch: int, tokens: int) -> None:
        """Runs every block on the residual stream in place."""
        for block in self.blocks:
            normed = self._norm(stream, *block.norm1, self.eps)
            qkv = torch.addmm(block.qkv_bias, normed, block.qkv_weight.t())  # (B * T, 3 * C)
            qkv = qkv.view(batch, tokens, 3, self.heads, -1)  # (B, T, 3, H, D)
            q, k, v = qkv.transpose(1, 3).unbind(2)  # (B, H, T, D) each, read in place
            attended = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D)
            stream.addmm_(attended.transpose(1, 2).reshape(stream.shape), block.proj_weight.t())
            hidden = self._fc1(self._norm(stream, *block.norm2, self.eps), block)  # (B * T, M)
            stream.addmm_(hidden, block.fc2_weight.t())

    def _embed(self, pixels: Float[Tensor, "B 3 S S"]) -> Float[Tensor, "BT C"]:
        batch, g, p = pixels.shape[0], self.grid_size, self.patch_size
        patches = (
            pixels.to(self.dtype)
            .view(batch, 3, g, p, g, p)
            .permute(0, 2, 4, 1, 3, 5)  # (B, row, col, channel, y, x): the convolution's weight order
            .reshape(batch * g * g, 3 * p * p)
        )
        stream = torch.empty(
            batch, self.num_prefix_tokens + g * g, self.channels, device=self.device, dtype=self.dtype
        )
        stream[:, : self.num_prefix_tokens] = self._prefix_tokens
        torch.add(
            torch.mm(patches, self._patch_weight).view(batch, g * g, self.channels),
            self._patch_offset,
            out=stream[:, self.num_prefix_tokens :],
        )
        return stream.view(-1, self.channels)

    def _fold_embeddings(self, embeddings: torch.nn.Module, image_size_px: int) -> None:
        projection = embeddings.patch_embeddings.projection  # Conv2d(3, C, P, stride=P)
        grid_tokens = embeddings.cls_token.new_empty(1, 1 + self.grid_size**2, self.channels)
        position = embeddings.interpolate_pos_encoding(grid_tokens, image_size_px, image_size_px)[0]
        self._patch_weight = projection.weight.reshape(self.channels, -1).t().contiguous()  # (3 P P, C)
        self._patch_offset = (position[1:].float() + projection.bias.float()).to(self.dtype)  # (G G, C)
        cls = embeddings.cls_token[0] + position[:1]  # registers carry no position
        self._prefix_tokens = torch.cat([cls, embeddings.register_tokens[0]])  # (1 + R, C)

    def _fold_blocks(self, layers: torch.nn.ModuleList) -> tuple[list[_Block], Float[Tensor, " C"]]:
        deferred = torch.zeros(self.channels, device=self.device)
        blocks = []
        for layer in layers:
            attention, mlp = layer.attention, layer.mlp
            scale1, scale2 = layer.layer_scale1.lambda1.float(), layer.layer_scale2.lambda1.float()
            norm1 = _ShiftedNorm(deferred.clone(), layer.norm1.weight, layer.norm1.bias)
            deferred += attention.o_proj.bias.float() * scale1
            norm2 = _ShiftedNorm(deferred.clone(), layer.norm2.weight, layer.norm2.bias)
            deferred += mlp.fc2.bias.float() * scale2
            projections = (attention.q_proj, attention.k_proj, attention.v_proj)
            blocks.append(
                _Block(
                    norm1=norm1,
                    qkv_weight=torch.cat([m.weight for m in projections]),
                    qkv_bias=torch.cat([m.bias for m in projections]),
                    proj_weight=self._scaled(attention.o_proj.weight, scale1),
                    norm2=norm2,
                    fc1_weight=mlp.fc1.weight,
                    fc1_bias=mlp.fc1.bias,
                    fc2_weight=self._scaled(mlp.fc2.weight, scale2),
                )
            )
        return blocks, deferred

    def _scaled(
        self, weight: Float[Tensor, "out in"], scale: Float[Tensor, " out"]
    ) -> Float[Tensor, "out in"]:
        return (weight.float() * scale[:, None]).to(self.dtype)


def _shifted_layer_norm(stream: Tensor, shift: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm of the true residual stream (stored stream (N, C) + deferred biases (C,)), in float32.

    Compiled on CUDA, where a runtime shape check inside the traced function would see dynamo's fake tensors:
    hence plain `Tensor` hints.
    """
    normed = F.layer_norm(stream.float() + shift, shift.shape, weight.float(), bias.float(), eps)
    return normed.to(stream.dtype)


def _fc1_gelu_epilogue(x: Float[Tensor, "N C"], block: _Block) -> Float[Tensor, "N M"]:
    return torch._addmm_activation(block.fc1_bias, x, block.fc1_weight.t(), use_gelu=True)


def _fc1_gelu(x: Float[Tensor, "N C"], block: _Block) -> Float[Tensor, "N M"]:
    return F.gelu(torch.addmm(block.fc1_bias, x, block.fc1_weight.t()))
