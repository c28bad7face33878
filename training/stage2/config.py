"""Stage 2 training configuration: YAML or defaults, the paper's values where it gives them (section 4.3:
AdamW, 5K-step linear warmup to 1e-4 then cosine, batch 48, bf16)."""

import dataclasses
from typing import Any

from infra.errors import ConfigError
from training.run import TrainingConfig, coerce_floats
from training.stage2.losses import LossWeights
from training.stage2.model import Stage2ModelConfig


@dataclasses.dataclass(frozen=True)
class Stage2Config(TrainingConfig):
    """`precision` auto: bfloat16 autocast of the decoders on CUDA (rasterization stays float32), float32 on CPU."""

    PATH_KEYS = ("data_root", "out_dir", "env_maps")
    MODEL_KEYS = ("lpips_vgg",)

    out_dir: str = "runs/stage2"
    steps: int = 500_000
    batch_size: int = 48
    val_every: int = 1000
    checkpoint_every: int = 1000
    model: Stage2ModelConfig = dataclasses.field(default_factory=Stage2ModelConfig)
    env_maps: tuple[str, ...] = ()
    """Folders of the environment maps the release was rendered with; empty: the maps bpy ships."""
    held_out_env_maps: tuple[str, ...] = ()
    """Map file names never trained on; validation reports PSNR under them separately."""
    lpips_vgg: str | None = None
    """torchvision's vgg16-397923af.pth; without it the LPIPS term is off (weight 0), and training says so."""
    losses: LossWeights = dataclasses.field(default_factory=LossWeights)
    warmup_steps: int = 5000
    grad_clip: float = 1.0
    image_every: int = 1000
    """TensorBoard image grids (prediction, truth, PBR maps, shadow) every this many steps."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    @classmethod
    def nested(cls, data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        if isinstance(data.get("model"), dict):
            data["model"] = Stage2ModelConfig.from_dict(data["model"])
        if isinstance(data.get("losses"), dict):
            data["losses"] = LossWeights.from_dict(coerce_floats(LossWeights, data["losses"]))
        for key in ("env_maps", "held_out_env_maps"):
            if key in data:
                data[key] = tuple(data[key])
        return data
