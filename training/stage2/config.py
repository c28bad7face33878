"""Stage 2 training configuration: YAML or defaults, the paper's values where it gives them (section 4.3:
AdamW, 5K-step linear warmup to 1e-4 then cosine, batch 48, bf16)."""

import dataclasses

from infra.config import ConfigFieldError, LocalPath, NonNegativeInt, PositiveFloat, PositiveInt
from training.run import TrainingConfig
from training.stage2.losses import LossWeights
from training.stage2.model import Stage2ModelConfig


@dataclasses.dataclass(frozen=True)
class Stage2Config(TrainingConfig):
    """`precision` auto: bfloat16 autocast of the decoders on CUDA (rasterization stays float32), float32 on CPU."""

    out_dir: LocalPath = "runs/stage2"
    steps: PositiveInt = 500_000
    batch_size: PositiveInt = 48
    frames_per_asset: PositiveInt = 1
    """Samples of one asset in a training batch: each worker's batch is batch_size / num_workers / frames_per_asset
    assets, each in that many (view, lighting) frames that share its intrinsic pass. 1: every sample drawn alone."""
    val_every: PositiveInt = 1000
    checkpoint_every: PositiveInt = 1000
    model: Stage2ModelConfig = dataclasses.field(default_factory=Stage2ModelConfig)
    env_maps: tuple[LocalPath, ...] = ()
    """Leave empty: the release is the source of the environment maps (role `env_maps`, packed by the build).
    Only for a release made before the build packed them: folders of the .exr maps it was rendered with, found
    by content (sha256). Ignored, with a warning, when the release packs its maps."""
    held_out_env_maps: tuple[str, ...] = ()
    """Map file names (as the release's `env_map:<file name>` rows name them) never trained on, besides those the
    release holds out for evaluation (release.json `held_out_env_maps`, always excluded); validation reports
    PSNR under them separately."""
    lpips_vgg: LocalPath | None = None
    """torchvision's vgg16-397923af.pth; without it the LPIPS term is off (weight 0), and training says so."""
    losses: LossWeights = dataclasses.field(default_factory=LossWeights)
    warmup_steps: NonNegativeInt = 5000
    grad_clip: PositiveFloat = 1.0
    image_every: PositiveInt = 1000
    """TensorBoard image grids (prediction, truth, PBR maps, shadow) every this many steps."""

    def __post_init__(self) -> None:
        super().__post_init__()
        per_worker = self.batch_size // self.num_workers
        if per_worker % self.frames_per_asset:
            raise ConfigFieldError(
                "frames_per_asset",
                f"{self.frames_per_asset} does not divide the per-worker batch {per_worker} "
                f"(batch_size {self.batch_size} over {self.num_workers} workers)",
            )
