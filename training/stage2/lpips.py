"""LPIPS (VGG variant, v0.1) without torchvision: the trunk is torchvision's VGG16 `features` layout, so its
ImageNet checkpoint (`vgg16-397923af.pth`) loads from a local file; the linear calibration heads are the ones
torchmetrics ships inside its wheel (reference section 7.4).

Nothing is downloaded. Without a trunk checkpoint there is no meaningful LPIPS: `Lpips.from_files` says so
and training then sets the LPIPS weight to 0. `Lpips.random` builds a random trunk for shape and gradient
tests only.
"""

import importlib.resources
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from infra.errors import NotFound

VGG16_LAYERS = (64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool", 512, 512, 512, "pool", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)
"""Indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3."""
TAP_CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def torchmetrics_vgg_heads() -> Path:
    """The LPIPS v0.1 VGG linear heads bundled with torchmetrics (7,289 bytes)."""
    return Path(str(importlib.resources.files("torchmetrics") / "functional/image/lpips_models/vgg.pth"))


class Lpips(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in VGG16_LAYERS:
            if item == "pool":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers[: TAPS[-1] + 1])
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    @classmethod
    def from_files(
        cls, vgg_weights: str | os.PathLike[str], heads: str | os.PathLike[str] | None = None
    ) -> "Lpips":  # fmt: skip
        """`vgg_weights`: torchvision's VGG16 ImageNet checkpoint; `heads`: LPIPS's `vgg.pth` (default: torchmetrics')."""
        path = Path(vgg_weights)
        if not path.is_file():
            raise NotFound(
                f"no VGG16 weights at {path}: place torchvision's vgg16-397923af.pth there to use LPIPS"
            )
        model = cls()
        trunk = torch.load(path, map_location="cpu", weights_only=True)
        features = {k.removeprefix("features."): v for k, v in trunk.items() if k.startswith("features.")}
        wanted = model.features.state_dict()
        missing = sorted(set(wanted) - set(features))
        if missing:
            raise ValueError(f"{path} is not a torchvision VGG16 checkpoint: it lacks features.{missing[0]}")
        model.features.load_state_dict({k: features[k] for k in wanted})
        return model._load_heads(heads or torchmetrics_vgg_heads())

    @classmethod
    def random(cls, seed: int = 0) -> "Lpips":
        """A random trunk with the real heads: for testing shapes and gradients, never for a metric."""
        torch.manual_seed(seed)
        return cls()._load_heads(torchmetrics_vgg_heads())

    def _load_heads(self, path: str | os.PathLike[str]) -> "Lpips":
        weights = torch.load(path, map_location="cpu", weights_only=True)
        for i, head in enumerate(self.heads):
            head.weight.copy_(weights[f"lin{i}.model.1.weight"])
        return self.eval()

    def forward(self, x: Float[Tensor, "B 3 H W"], y: Float[Tensor, "B 3 H W"]) -> Float[Tensor, " B"]:
        """Distance between images in [0, 1]."""
        batch = x.shape[0]
        h = (torch.cat([x, y]) * 2 - 1 - self.shift) / self.scale
        distance = h.new_zeros(batch)
        tap = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == TAPS[tap]:
                a, b = F.normalize(h, dim=1, eps=1e-10).split(batch)
                distance = distance + self.heads[tap]((a - b) ** 2).mean(dim=(1, 2, 3))
                tap += 1
        return distance
