"""Stage 1 samples from a pinned release: per asset and input view, the view, its Z_s and the LH-SLAT.

Sample order is a function of (manifest, seed, epoch) only: positions in an endless stream map to a seeded
permutation per epoch, so a resumed run, or another rank, computes the same order without shared state.
"""

import dataclasses

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from catalogs.release_reader import Release
from encoders.shaded_slat import input_view_frames
from encoders.sparse import SparseTensor
from pipelines.steps import INPUT, SLAT_LH, SLAT_SHADED
from training.latents import LatentNormalization, latent_statistics, refuse_test_split

ROLES = (SLAT_LH, SLAT_SHADED, INPUT)
"""The release roles Stage 1 reads."""


@dataclasses.dataclass(frozen=True)
class Stage1Batch:
    """Several (asset, view) samples; the rows of every per-voxel tensor follow `lh.coords`."""

    lh: SparseTensor  # normalised LH-SLAT x0 (N, 8), coords (batch, x, y, z)
    shaded: Float[Tensor, "N 8"]  # normalised Z_s of the sample's view
    images: Float[Tensor, "B 4 H W"]  # the input views, premultiplied linear RGBA
    sample_ids: tuple[str, ...]

    def to(self, device: torch.device) -> "Stage1Batch":
        lh = SparseTensor(self.lh.coords.to(device), self.lh.feats.to(device))
        return dataclasses.replace(self, lh=lh, shaded=self.shaded.to(device), images=self.images.to(device))


class Stage1Data:
    """The (asset, view) pairs of one split of a release; views are those the release's Z_s were sampled from."""

    def __init__(
        self, release: Release, split: str, normalization: LatentNormalization | None = None
    ) -> None:
        self.release = release
        refuse_test_split(split)
        assets = release.split(split)
        if not assets:
            raise ValueError(f"release {release.info['name']!r} has no {split!r} samples")
        self.items: list[tuple[str, int]] = []
        for asset in assets:
            views = release.read(asset, SLAT_SHADED)["latent"].shape[1]
            self.items += [(asset, v) for v in range(views)]
        self.normalization = normalization or latent_statistics(release, assets)

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, indices: list[int]) -> Stage1Batch:
        coords, lh, shaded, images = [], [], [], []
        for b, index in enumerate(indices):
            asset, view = self.items[index]
            slat = self.release.read(asset, SLAT_LH)
            zs = self.release.read(asset, SLAT_SHADED)
            if not np.array_equal(slat["coords"], zs["coords"]):
                raise ValueError(f"{asset}: slat_lh and slat_shaded are on different voxels")
            xyz = torch.from_numpy(slat["coords"].astype(np.int32))
            coords.append(torch.cat([torch.full((len(xyz), 1), b, dtype=torch.int32), xyz], dim=1))
            lh.append(torch.from_numpy(slat["latent"].astype(np.float32)))
            shaded.append(torch.from_numpy(zs["latent"][:, view].astype(np.float32)))
            images.append(self._view(asset, view))
        normalize = self.normalization.apply
        return Stage1Batch(
            lh=SparseTensor(torch.cat(coords), normalize(torch.cat(lh))),
            shaded=normalize(torch.cat(shaded)),
            images=torch.stack(images),
            sample_ids=tuple(self.items[i][0] for i in indices),
        )

    def _view(self, asset: str, view: int) -> Float[Tensor, "4 H W"]:
        arrays = self.release.read(asset, INPUT, names=("frame_view", "frame_lighting"))
        frame = input_view_frames(arrays["frame_view"], arrays["frame_lighting"], view + 1)[view]
        beauty = self.release.read_row(asset, INPUT, "beauty", int(frame))  # one chunk, not the whole set
        return torch.from_numpy(beauty.astype(np.float32)).permute(2, 0, 1)
