"""Stage 1 training configuration: YAML or defaults, paper values where the paper gives them."""

import dataclasses
from typing import Annotated

from encoders.dinov2 import DEFAULT_DINOV2
from encoders.flow_sampler import FlowSamplerConfig
from encoders.shaded_slat import DEFAULT_SLAT_FLOW
from infra.config import LocalPath, ModelReference, NonNegativeFloat, PositiveFloat, Range
from training.run import TrainingConfig
from training.stage1.model import LoraSettings


@dataclasses.dataclass(frozen=True)
class Stage1Config(TrainingConfig):
    """`precision` auto: bfloat16 autocast with a bfloat16 frozen base on CUDA, float32 on CPU. `val_samples`:
    (asset, view) pairs of the validation split sampled for the LH-SLAT MSE."""

    out_dir: LocalPath = "runs/stage1"
    base_model: ModelReference = DEFAULT_SLAT_FLOW
    """The pretrained flow model (local safetensors or hub id)."""
    dinov2: ModelReference = DEFAULT_DINOV2
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)
    p_uncond: Annotated[float, Range(ge=0, lt=1)] = 0.1
    """Share of samples whose image condition is replaced by zeros (classifier-free guidance)."""
    t_mean: float = 1.0
    t_std: PositiveFloat = 1.0
    """t ~ sigmoid(N(t_mean, t_std)), TRELLIS's logit-normal time."""
    sigma_min: NonNegativeFloat = 1e-5
    gradient_checkpointing: bool = False
    sampler: FlowSamplerConfig = dataclasses.field(default_factory=FlowSamplerConfig)
