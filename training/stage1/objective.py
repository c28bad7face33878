"""TRELLIS's rectified-flow objective (reference 6.4), with Z_s concatenated to the noisy LH-SLAT.

x_t = (1 - t) x0 + (s + (1 - s) t) eps and the target velocity v = (1 - s) eps - x0, with t ~ sigmoid(N(mean,
std)) per sample and s = sigma_min; the model sees 1000 t; a share of samples gets zero image tokens (the
unconditional branch of classifier-free guidance). The loss is the MSE over every voxel channel of the batch,
so larger objects weigh more, as in TRELLIS.
"""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from encoders.sparse import SparseTensor
from training.stage1.model import velocity


def rectified_flow_loss(
    network: nn.Module,
    x0: SparseTensor,
    shaded: Float[Tensor, "N 8"],
    cond: Float[Tensor, "B T C"],
    generator: torch.Generator,
    *,
    t_mean: float = 1.0,
    t_std: float = 1.0,
    sigma_min: float = 1e-5,
    p_uncond: float = 0.1,
    autocast: bool = False,
) -> Tensor:
    """The batch's loss; every random draw comes from `generator` (on the CPU), so a step is reproducible."""
    device, num = x0.device, x0.batch_size
    t = torch.sigmoid(torch.randn(num, generator=generator) * t_std + t_mean).to(device)
    eps = torch.randn(x0.feats.shape, generator=generator).to(device)
    drop = (torch.rand(num, generator=generator) < p_uncond).to(device)
    cond = torch.where(drop[:, None, None], torch.zeros_like(cond), cond)
    t_voxel = t[x0.coords[:, 0].long(), None]
    x_t = (1 - t_voxel) * x0.feats + (sigma_min + (1 - sigma_min) * t_voxel) * eps
    target = (1 - sigma_min) * eps - x0.feats
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        pred = velocity(network, x0.replace(feats=x_t), shaded, 1000 * t, cond)
    return F.mse_loss(pred.feats.float(), target)
