"""DINOv2 ViT-L/14 with registers: the per-view patch features that are back-projected into the voxel grid.

The released SLAT encoder was trained on TRELLIS's features, so everything here follows TRELLIS's extraction
(`trellis_toolkit_and_models.md` section 1.6): a 518^2 input, RGB x alpha on black, ImageNet normalization,
and the last block's patch tokens **before** the final LayerNorm (37 x 37 x 1024, row-major, row 0 at the top).
transformers' `Dinov2WithRegistersModel` loads the weights; `encoders.fused_vit` runs the embeddings and the
block stack from them with fewer memory passes, so the final LayerNorm is never applied and no layer's hidden
states are kept.

Our renders are linear HDR; DINOv2 sees display images. A premultiplied linear view is un-premultiplied,
encoded with Blender's "Standard" view (clip to [0, 1], sRGB OETF) and multiplied by alpha again: the image
TRELLIS builds from a straight-alpha PNG.
"""

import dataclasses
import os
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from encoders.fused_vit import FusedVit
from encoders.weights import WeightsInfo, is_local, is_random_init, mark_random_init, state_dict_digest
from infra.config import FrozenConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_DINOV2 = "facebook/dinov2-with-registers-large"
"""Hub id of ViT-L/14 with 4 registers, the model TRELLIS's `dinov2_vitl14_reg` is."""

VITL14_REG: dict[str, Any] = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "mlp_ratio": 4,
    "patch_size": 14,
    "image_size": 518,
    "num_register_tokens": 4,
    "layerscale_value": 1.0,
    "layer_norm_eps": 1e-6,
    "qkv_bias": True,
    "hidden_act": "gelu",
}
"""The architecture of `facebook/dinov2-with-registers-large` (= torch hub `dinov2_vitl14_reg`)."""

Precision = Literal["auto", "float32", "bfloat16", "float16"]


@dataclasses.dataclass(frozen=True)
class Dinov2Config(FrozenConfig):
    """How patch features are extracted; part of the features step's spec hash."""

    model: str = DEFAULT_DINOV2
    """Local folder (`save_pretrained` layout) or hub id."""
    image_size_px: int = 518
    """Square network input; 518 = 37 patches of 14 px, the size the released encoder saw."""
    batch_size: int = 32
    """Views per forward pass."""
    precision: Precision = "auto"
    """Weights and activations dtype: `auto` is bfloat16 on CUDA and float32 on the CPU. Plain bfloat16 runs
    18 % faster than float32 weights under autocast on an H100 (docs/benchmarks.md)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def srgb_encode(linear: Tensor) -> Tensor:
    """Linear values clipped to [0, 1], sRGB-encoded (Blender's "Standard" view transform)."""
    x = linear.clamp(0.0, 1.0)
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clamp_min(0.0031308).pow(1.0 / 2.4) - 0.055)


def display_image(rgba: Float[Tensor, "B 4 H W"]) -> Float[Tensor, "B 3 H W"]:
    """Premultiplied linear RGBA -> sRGB-encoded RGB x alpha on black, as DINOv2 saw TRELLIS's views."""
    rgb, alpha = rgba[:, :3], rgba[:, 3:4].clamp(0.0, 1.0)
    straight = torch.where(alpha > 0, rgb / alpha.clamp_min(1e-6), torch.zeros_like(rgb))
    return srgb_encode(straight) * alpha


class Dinov2Features:
    """Loaded once per worker; maps batches of views to pre-LayerNorm patch tokens.

    Examples:
        >>> extractor = Dinov2Features(Dinov2Config(model="path/to/dinov2"), device=torch.device("cuda"))
        >>> extractor(views_rgba).shape        # views_rgba: (150, 4, 512, 512) premultiplied linear
        torch.Size([150, 1024, 37, 37])
    """

    def __init__(self, config: Dinov2Config, *, device: torch.device) -> None:
        self.config, self.device = config, device
        self.dtype = _resolve_dtype(config.precision, device)
        model, self.weights = load_dinov2(config.model)
        model = model.to(device, self.dtype)
        if config.image_size_px % model.config.patch_size:
            raise ValueError(
                f"image_size_px {config.image_size_px} is not a multiple of the patch size "
                f"{model.config.patch_size}"
            )
        self.network = FusedVit(model, image_size_px=config.image_size_px)  # copies what it needs of `model`
        self.channels, self.grid_size = self.network.channels, self.network.grid_size
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def preprocess(self, rgba: Float[Tensor, "B 4 H W"]) -> Float[Tensor, "B 3 S S"]:
        """Network input: display RGB x alpha, resized to `image_size_px` (bicubic), ImageNet-normalized."""
        rgb = display_image(rgba.to(self.device, torch.float32))
        size = self.config.image_size_px
        if rgb.shape[-2:] != (size, size):
            rgb = F.interpolate(rgb, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        return ((rgb - self._mean) / self._std).to(self.dtype)

    @torch.inference_mode()
    def __call__(self, rgba: Float[Tensor, "V 4 H W"]) -> Float[Tensor, "V C G G"]:
        """Patch tokens of every view, in batches of `batch_size`, in the model's dtype (G = 37 at 518^2)."""
        chunks = [self.tokens(self.preprocess(batch)) for batch in rgba.split(self.config.batch_size)]
        return (
            torch.cat(chunks)
            if chunks
            else rgba.new_zeros((0, self.channels, self.grid_size, self.grid_size))
        )

    def tokens(self, pixels: Float[Tensor, "B 3 S S"]) -> Float[Tensor, "B C G G"]:
        """The network alone, on preprocessed pixels: the patch tokens as a grid."""
        patches = self.network(pixels)[:, self.network.num_prefix_tokens :]  # (B, G*G, C), row * G + col
        return patches.transpose(1, 2).unflatten(2, (self.grid_size, self.grid_size))

    @torch.inference_mode()
    def condition(self, rgba: Float[Tensor, "B 4 H W"]) -> Float[Tensor, "B T C"]:
        """The image condition of TRELLIS's flow models (reference 6.6): each view cropped to a square 1.2
        times its alpha bounding box, then every token (cls, registers, patches; T = 1374 at 518^2) through a
        LayerNorm without affine, in float32."""
        cropped = torch.stack([square_crop(view, size_px=self.config.image_size_px) for view in rgba])
        tokens = torch.cat([self.network(self.preprocess(b)) for b in cropped.split(self.config.batch_size)])
        return F.layer_norm(tokens.float(), tokens.shape[-1:], eps=1e-5)


def square_crop(rgba: Float[Tensor, "4 H W"], *, size_px: int, margin: float = 1.2) -> Float[Tensor, "4 S S"]:
    """The square of side `margin` x the longer side of the alpha > 0 box, centred on it, zero outside the
    image, resized to `size_px` (bicubic, antialiased); an empty alpha keeps the whole view."""
    rows, cols = torch.nonzero(rgba[3] > 0, as_tuple=True)
    if len(rows):
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        side = int(margin * max(int(bottom - top), int(right - left)))
        y0, x0 = int(top + bottom - side) // 2, int(left + right - side) // 2
        h, w = rgba.shape[1:]
        padded = F.pad(rgba, (max(0, -x0), max(0, x0 + side - w), max(0, -y0), max(0, y0 + side - h)))
        rgba = padded[:, max(0, y0) : max(0, y0) + side, max(0, x0) : max(0, x0) + side]
    resized = F.interpolate(rgba[None].float(), size=(size_px, size_px), mode="bicubic", antialias=True)
    return resized[0].clamp_min(0.0)


def load_dinov2(reference: str) -> tuple[torch.nn.Module, WeightsInfo]:
    """transformers' model on the CPU in its stored dtype, and its weights' identity: the digest is of the stored
    weights, so it is the same whatever device and dtype the model then runs in (cache keys depend on it)."""
    from transformers import Dinov2WithRegistersModel  # heavy import, only where a model is built

    model = Dinov2WithRegistersModel.from_pretrained(reference, dtype="auto").eval().requires_grad_(False)
    info = WeightsInfo(
        reference=reference,
        digest=state_dict_digest(model.state_dict()),
        is_random_init=is_local(reference) and is_random_init(reference),
    )
    return model, info


def _resolve_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, precision)


def save_random_dinov2(path: str | os.PathLike[str], *, seed: int, **architecture: Any) -> None:
    """A randomly initialised model in `save_pretrained` layout, marked random; ViT-L/14-reg unless overridden.

    For tests, benchmarks and the demo, which cannot download the real weights.
    """
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(seed)
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**{**VITL14_REG, **architecture}))
    model.save_pretrained(path)
    mark_random_init(path, seed=seed)
