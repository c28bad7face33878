"""Stage 2 losses with the paper's weights (section 4.3; reference section 4.3).

    L = log-L1(HDR) + 0.2 (1 - SSIM(AgX)) + 0.2 LPIPS(AgX) + 0.3 L1(PBR) + 0.5 L1(shadow)
        + 1e4 mean(prod(scale)) + 1e-3 mean((opacity - 1)^2)

Images are premultiplied on black. The tone-mapped pair is composited on one random background per sample,
black or white (as TRELLIS's Gaussian decoder), so the silhouette is supervised too. The factory's PBR passes
(shader AOVs) come premultiplied by coverage, as the rendered buffers are; its shadow pass is 1 on the
background, so the shadow target is multiplied by alpha; it is defined only for frames a shadow-casting light lit
(`render_jobs.lighting`), and the shadow term averages over those. SSIM and LPIPS weights follow TRELLIS.
"""

import dataclasses

import torch
from jaxtyping import Float
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure

from infra.config import FrozenConfig, NonNegativeFloat
from training.stage2.agx import AgX
from training.stage2.lpips import Lpips
from training.stage2.model import Stage2Render


@dataclasses.dataclass(frozen=True)
class LossWeights(FrozenConfig):
    """Weights of the loss terms; 0 turns a term off."""

    log_l1: NonNegativeFloat = 1.0
    ssim: NonNegativeFloat = 0.2
    lpips: NonNegativeFloat = 0.2
    pbr: NonNegativeFloat = 0.3
    shadow: NonNegativeFloat = 0.5
    volume: NonNegativeFloat = 1e4
    opacity: NonNegativeFloat = 1e-3


@dataclasses.dataclass(frozen=True)
class Stage2Target:
    """What the factory rendered for each sample: HDR beauty, base colour, roughness and metallic (premultiplied
    by coverage), alpha, and shadow (1 where nothing is shadowed, background included)."""

    radiance: Float[Tensor, "S H W 3"]
    alpha: Float[Tensor, "S H W 1"]
    base_color: Float[Tensor, "S H W 3"]
    roughness: Float[Tensor, "S H W 1"]
    metallic: Float[Tensor, "S H W 1"]
    shadow: Float[Tensor, "S H W 1"]
    shadow_valid: Float[Tensor, " S"]
    """1 where a shadow-casting light lit the frame (`frame_shadow_light`): the shadow target is defined only
    there, so the shadow loss is masked by it."""

    def to(self, device: torch.device) -> "Stage2Target":
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)}
        )


def tone_mapped(
    agx: AgX, radiance: Float[Tensor, "S H W 3"], alpha: Float[Tensor, "S H W 1"], background: Float[Tensor, "S 1 1 1"]
) -> Float[Tensor, "S 3 H W"]:  # fmt: skip
    """AgX of the premultiplied radiance, composited on `background` (0 or 1 per sample), channels first.

    AgX maps 0 to 0, so tone mapping premultiplied radiance then adding (1 - alpha) * background composites a
    tone-mapped foreground on the background.
    """
    return (agx(radiance) + (1 - alpha) * background).clamp(0, 1).permute(0, 3, 1, 2)


def masked_mean(values: Float[Tensor, "S ..."], valid: Float[Tensor, " S"]) -> Float[Tensor, ""]:
    """Mean over the samples where `valid` is 1 (0 when none is: the term then trains nothing)."""
    per_sample = values.flatten(1).mean(1)
    return (per_sample * valid).sum() / valid.sum().clamp_min(1)


def stage2_losses(
    render: Stage2Render, target: Stage2Target, *, agx: AgX, lpips: Lpips | None, weights: LossWeights,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:  # fmt: skip
    """Every weighted term and `total`; LPIPS is skipped (weight 0) when `lpips` is None."""
    samples = target.radiance.shape[0]
    background = torch.randint(0, 2, (samples, 1, 1, 1), generator=generator).to(target.radiance)
    predicted = tone_mapped(agx, render.radiance, render.alpha, background)
    expected = tone_mapped(agx, target.radiance, target.alpha, background)
    terms = {
        "log_l1": (torch.log1p(render.radiance.clamp(min=0)) - torch.log1p(target.radiance.clamp(min=0)))
        .abs()
        .mean(),
        "ssim": 1 - structural_similarity_index_measure(predicted, expected, data_range=1.0),
        "pbr": torch.cat(
            [
                (render.base_color - target.base_color).abs(),
                (render.roughness - target.roughness).abs(),
                (render.metallic - target.metallic).abs(),
            ],
            dim=-1,
        ).mean(),
        "shadow": masked_mean((render.shadow - target.shadow * target.alpha).abs(), target.shadow_valid),
        "volume": render.scales.prod(dim=-1).mean(),
        "opacity": ((render.opacities - 1) ** 2).mean(),
    }
    if lpips is not None and weights.lpips > 0:
        terms["lpips"] = lpips(predicted, expected).mean()
    weighted = {name: getattr(weights, name) * value for name, value in terms.items()}
    return {**weighted, "total": sum(weighted.values())}
