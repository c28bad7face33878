"""The Stage 1 network: the pretrained SLAT flow model with its input widened to take Z_s, and LoRA adapters.

f_theta(x_t (+) Z_s, t, image tokens) predicts the velocity of the LH-SLAT. The input layer grows from 8 to 16
columns; the new ones (Z_s) start at zero, so at step 0 the widened model is the pretrained one. `peft` wraps
the attention projections (`to_qkv`, `to_q`, `to_kv`, `to_out`) with rank-r rsLoRA adapters (B = 0 at the
start) and trains the widened input layer fully (`modules_to_save`); everything else stays frozen.
"""

import dataclasses

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from encoders.slat_flow import SlatFlowModel
from encoders.sparse import SparseTensor
from infra.config import FrozenConfig, PositiveFloat, PositiveInt

LORA_TARGETS = ("to_qkv", "to_q", "to_kv", "to_out")


@dataclasses.dataclass(frozen=True)
class LoraSettings(FrozenConfig):
    rank: PositiveInt = 512
    alpha: PositiveFloat = 512.0
    """rsLoRA scales the update by alpha / sqrt(rank)."""
    targets: tuple[str, ...] = LORA_TARGETS


def widen_input_layer(flow: SlatFlowModel, extra_channels: int) -> SlatFlowModel:
    """Append `extra_channels` zero columns to the input layer, in place: the output is unchanged at first."""
    old = flow.input_layer
    new = nn.Linear(old.in_features + extra_channels, old.out_features, device=old.weight.device)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_features] = old.weight
        new.bias.copy_(old.bias)
    flow.input_layer = new.to(old.weight.dtype)
    return flow


def lora_config(settings: LoraSettings) -> LoraConfig:
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        use_rslora=True,
        lora_dropout=0.0,
        bias="none",
        target_modules=list(settings.targets),
        modules_to_save=["input_layer"],
    )


def stage1_model(flow: SlatFlowModel, settings: LoraSettings) -> PeftModel:
    """Widen the (frozen, loaded) flow model and wrap it with trainable adapters; adapters are float32."""
    flow.requires_grad_(False)
    widen_input_layer(flow, flow.config.out_channels)
    return get_peft_model(flow, lora_config(settings))


def expected_trainable_parameters(flow: SlatFlowModel, settings: LoraSettings) -> int:
    """sum over adapted Linears of rank (in + out), plus the widened input layer: the count to check against."""
    total = 0
    for name, module in flow.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in settings.targets:
            total += settings.rank * (module.in_features + module.out_features)
    widened = flow.input_layer.in_features + flow.config.out_channels
    return total + widened * flow.input_layer.out_features + flow.input_layer.out_features


def velocity(
    model: nn.Module, x_t: SparseTensor, shaded: torch.Tensor, t: torch.Tensor, cond: torch.Tensor
) -> SparseTensor:
    """The widened model's velocity on x_t (N, 8) with Z_s (N, 8) concatenated (never noised)."""
    return model(x_t.replace(feats=torch.cat([x_t.feats, shaded.to(x_t.feats.dtype)], dim=1)), t, cond)
