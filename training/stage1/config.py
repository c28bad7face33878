"""Stage 1 training configuration: YAML or defaults, paper values where the paper gives them."""

import dataclasses
from typing import Any

from encoders.dinov2 import DEFAULT_DINOV2
from encoders.flow_sampler import FlowSamplerConfig
from encoders.shaded_slat import DEFAULT_SLAT_FLOW
from infra.errors import ConfigError
from training.run import TrainingConfig
from training.stage1.model import LoraSettings


@dataclasses.dataclass(frozen=True)
class Stage1Config(TrainingConfig):
    """`precision` auto: bfloat16 autocast with a bfloat16 frozen base on CUDA, float32 on CPU. `val_samples`:
    (asset, view) pairs of the validation split sampled for the LH-SLAT MSE."""

    MODEL_KEYS = ("base_model", "dinov2")

    out_dir: str = "runs/stage1"
    base_model: str = DEFAULT_SLAT_FLOW
    """The pretrained flow model (local safetensors or hub id)."""
    dinov2: str = DEFAULT_DINOV2
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)
    p_uncond: float = 0.1
    """Share of samples whose image condition is replaced by zeros (classifier-free guidance)."""
    t_mean: float = 1.0
    t_std: float = 1.0
    """t ~ sigmoid(N(t_mean, t_std)), TRELLIS's logit-normal time."""
    sigma_min: float = 1e-5
    gradient_checkpointing: bool = False
    sampler: FlowSamplerConfig = dataclasses.field(default_factory=FlowSamplerConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.p_uncond < 1.0:
            raise ConfigError(f"p_uncond must lie in [0, 1), got {self.p_uncond}")

    @classmethod
    def nested(cls, data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        if "lora" in data:
            data["lora"] = LoraSettings.from_dict(data["lora"])
        if "sampler" in data:
            data["sampler"] = FlowSamplerConfig.from_dict(data["sampler"])
        return data
