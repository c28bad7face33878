"""Blender's AgX view transform as a differentiable torch module, equal to `simple-ocio`'s "AgX" view.

Stage 2 compares renders in display space (SSIM and LPIPS on AgX tone-mapped images), so the tone mapper must be
the one the ground truth is judged with and must pass gradients. Blender 4.x's AgX (the OCIO config that
`simple-ocio` bundles, reference training_stages.md section 3.1) is:
1. linear Rec.709 -> linear FilmLight E-Gamut (3x3);
2. log2 allocation over [-12.47393, +12.5260688117] stops onto [0, 1];
3. the 57^3 `AgX_Base_sRGB.cube` LUT, interpolated tetrahedrally (trilinear is off by up to 0.056);
4. decode the LUT's power-2.4 encoding, encode with the sRGB OETF, clip to [0, 1].
The LUT is read from the installed `simple_ocio` package, so both always use the same table.
"""

import importlib.resources

import torch
from jaxtyping import Float
from torch import Tensor, nn

REC709_TO_E_GAMUT = (
    (0.5594630473, 0.304775811, 0.1358129414),
    (0.0762332609, 0.7879523952, 0.1357748488),
    (0.0655375095, 0.1645427299, 0.7697415277),
)
LOG2_MIN, LOG2_MAX = -12.47393, 12.5260688117
LUT_RESOURCE = "ocio_data/luts/AgX_Base_sRGB.cube"


def read_cube_lut(text: str) -> Float[Tensor, "S S S 3"]:
    """A `.cube` 3D LUT as a tensor indexed [blue, green, red] (the file lists red fastest)."""
    size, rows = 0, []
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if fields[0] == "LUT_3D_SIZE":
            size = int(fields[1])
        elif fields[0][0].isdigit() or fields[0][0] in "-.":
            rows.append([float(v) for v in fields])
    if size < 2 or len(rows) != size**3:
        raise ValueError(f"a .cube 3D LUT of size {size} needs {size**3} rows, found {len(rows)}")
    return torch.tensor(rows, dtype=torch.float64).view(size, size, size, 3)


class AgX(nn.Module):
    """Scene-linear Rec.709 RGB (any leading shape, channels last) -> AgX display sRGB in [0, 1]."""

    def __init__(self, lut: Float[Tensor, "S S S 3"]) -> None:
        super().__init__()
        self.size = lut.shape[0]
        self.register_buffer("lut", lut.reshape(-1, 3).float(), persistent=False)  # row (b * S + g) * S + r
        self.register_buffer("matrix", torch.tensor(REC709_TO_E_GAMUT), persistent=False)

    @classmethod
    def from_simple_ocio(cls) -> "AgX":
        return cls(read_cube_lut((importlib.resources.files("simple_ocio") / LUT_RESOURCE).read_text()))

    def forward(self, rgb: Float[Tensor, "... 3"]) -> Float[Tensor, "... 3"]:
        e_gamut = rgb @ self.matrix.to(rgb.dtype).t()
        log = (torch.log2(e_gamut.clamp_min(2.0**LOG2_MIN)) - LOG2_MIN) / (LOG2_MAX - LOG2_MIN)
        encoded = self._tetrahedral(log.clamp(0.0, 1.0))
        linear = encoded.clamp_min(0.0) ** 2.4
        srgb = torch.where(
            linear <= 0.0031308, 12.92 * linear, 1.055 * linear.clamp_min(0.0031308) ** (1 / 2.4) - 0.055
        )
        return srgb.clamp(0.0, 1.0)

    def _tetrahedral(self, x: Float[Tensor, "... 3"]) -> Float[Tensor, "... 3"]:
        """Tetrahedral interpolation: from the cell's low corner, step along the axes in decreasing order of the
        fractional coordinate; out = sum over the 4 visited corners of the weight differences."""
        position = x * (self.size - 1)
        low = position.detach().floor().clamp(max=self.size - 2)
        fraction = position - low  # gradients flow through the fractions
        order = fraction.detach().argsort(dim=-1, descending=True)  # (..., 3) axes, largest fraction first
        sorted_fraction = fraction.gather(-1, order)
        weights = torch.stack(
            [
                1 - sorted_fraction[..., 0],
                sorted_fraction[..., 0] - sorted_fraction[..., 1],
                sorted_fraction[..., 1] - sorted_fraction[..., 2],
                sorted_fraction[..., 2],
            ],
            dim=-1,
        )  # (..., 4)
        strides = torch.tensor([1, self.size, self.size**2], device=x.device)  # r, g, b
        corner = (low.long() * strides).sum(-1)  # the low corner's row
        corners = [corner]
        for step in range(3):
            corner = corner + strides[order[..., step]]
            corners.append(corner)
        values = self.lut.to(x.dtype)[torch.stack(corners, dim=-1)]  # (..., 4, 3)
        return (weights[..., None] * values).sum(-2)
