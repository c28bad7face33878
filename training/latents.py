"""Per-channel latent normalisation from a release's training split, shared by both stages (and pinned in
their checkpoints), and the rule both stages' readers follow: the test split is never read for training."""

import dataclasses

import numpy as np
from jaxtyping import Float
from torch import Tensor

from catalogs.release_reader import Release
from catalogs.splits import TEST
from infra.errors import ConfigError
from pipelines.steps import SLAT_LH


@dataclasses.dataclass(frozen=True)
class LatentNormalization:
    """Per-channel statistics; the models see (latent - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def apply(self, latent: Float[Tensor, "N C"]) -> Float[Tensor, "N C"]:
        return (latent - latent.new_tensor(self.mean)) / latent.new_tensor(self.std)

    def invert(self, normalized: Float[Tensor, "N C"]) -> Float[Tensor, "N C"]:
        return normalized * normalized.new_tensor(self.std) + normalized.new_tensor(self.mean)


def latent_statistics(release: Release, assets: list[str], role: str = SLAT_LH) -> LatentNormalization:
    """Per-channel mean and std of a latent role over every voxel of `assets` (the training split)."""
    latents = np.concatenate([release.read(a, role)["latent"].astype(np.float64) for a in assets])
    return LatentNormalization(
        tuple(latents.mean(0).tolist()), tuple(np.maximum(latents.std(0), 1e-6).tolist())
    )


def refuse_test_split(split: str) -> None:
    """Training and validation never read the `test` split: it is fixed by source_id before any training
    (`catalogs.splits`) and only `near eval` reads it."""
    if split == TEST:
        raise ConfigError(f"training never reads the {TEST!r} split (it is for `near eval`); validate on 'val' or 'train'")
