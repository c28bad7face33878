"""Stage 1 training configuration: YAML or defaults, paper values where the paper gives them."""

import dataclasses
from pathlib import Path
from typing import Any, Literal

import yaml

from encoders.dinov2 import DEFAULT_DINOV2
from encoders.flow_sampler import FlowSamplerConfig
from encoders.shaded_slat import DEFAULT_SLAT_FLOW
from infra.config import FrozenConfig
from infra.errors import ConfigError
from training.stage1.model import LoraSettings

Precision = Literal["auto", "float32", "bfloat16"]


@dataclasses.dataclass(frozen=True)
class Stage1Config(FrozenConfig):
    data_root: str = "near-demo/data"
    release: str = ""
    release_sha256: str | None = None
    """Pin of the release manifest; None pins whatever the release holds now (recorded in checkpoints)."""
    out_dir: str = "runs/stage1"
    base_model: str = DEFAULT_SLAT_FLOW
    """The pretrained flow model (local safetensors or hub id)."""
    dinov2: str = DEFAULT_DINOV2
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)
    steps: int = 1000
    batch_size: int = 8
    """Global batch (samples per step over all workers)."""
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    p_uncond: float = 0.1
    """Share of samples whose image condition is replaced by zeros (classifier-free guidance)."""
    t_mean: float = 1.0
    t_std: float = 1.0
    """t ~ sigmoid(N(t_mean, t_std)), TRELLIS's logit-normal time."""
    sigma_min: float = 1e-5
    precision: Precision = "auto"
    """auto: bfloat16 autocast with a bfloat16 frozen base on CUDA, float32 on CPU."""
    gradient_checkpointing: bool = False
    data_workers: int = 2
    """DataLoader processes reading the next steps' batches from the release while this one trains."""
    seed: int = 0
    log_every: int = 10
    val_every: int = 500
    checkpoint_every: int = 500
    val_samples: int = 8
    """(asset, view) pairs of the validation split sampled for the LH-SLAT MSE."""
    val_split: str = "val"
    sampler: FlowSamplerConfig = dataclasses.field(default_factory=FlowSamplerConfig)
    num_workers: int = 1
    use_gpu: bool = False
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.num_workers < 1:
            raise ConfigError(f"steps, batch_size and num_workers must be >= 1: {self!r}")
        if self.batch_size % self.num_workers:
            raise ConfigError(
                f"batch_size {self.batch_size} is not divisible by num_workers {self.num_workers}"
            )
        if not 0.0 <= self.p_uncond < 1.0:
            raise ConfigError(f"p_uncond must lie in [0, 1), got {self.p_uncond}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Stage1Config":
        data = dict(data)
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown stage 1 config keys {unknown}")
        for field in dataclasses.fields(cls):  # YAML reads `1e-4` (no dot) as a string
            if field.type is float and isinstance(data.get(field.name), str):
                try:
                    data[field.name] = float(data[field.name])
                except ValueError:
                    raise ConfigError(f"{field.name} must be a number, got {data[field.name]!r}") from None
        try:
            if "lora" in data:
                data["lora"] = LoraSettings.from_dict(data["lora"])
            if "sampler" in data:
                data["sampler"] = FlowSamplerConfig.from_dict(data["sampler"])
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"invalid stage 1 config: {err}") from err

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "Stage1Config":
        """Relative folders in the file are relative to its folder; so are model references naming a file."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read stage 1 config {path}: {err}") from err
        base = path.parent
        for key in ("data_root", "out_dir"):
            if key in data:
                data[key] = str((base / data[key]).resolve())
        for key in ("base_model", "dinov2"):
            local = base / str(data.get(key, ""))
            if key in data and (local.exists() or local.with_suffix(".safetensors").exists()):
                data[key] = str(local.resolve())
        return cls.from_dict({**data, **{k: v for k, v in overrides.items() if v is not None}})
