"""Per-frame metrics of Stage 2 renders against the factory's renders, and their aggregation over assets.

Conventions (the report repeats them):

* **Images.** Radiance is compared in display space: the same `AgX` as training applied to the premultiplied
  HDR radiance, composited on black (`tone_mapped(agx, radiance, alpha, background=0)`), in [0, 1], data range
  1, exactly as the trainer's validation does.
* **Mask.** "Masked" metrics are measured inside the union of the predicted and the true coverage, a pixel
  counting when either alpha exceeds `MASK_THRESHOLD` = 0.5 (half covered). The union penalises a missing part
  of the silhouette and a spilled one alike, so a prediction cannot gain by shrinking or growing its
  silhouette, and the empty background (which every method gets right for free) does not dilute the score.
* **Empty mask.** A frame where neither alpha exceeds the threshold has no `*_masked` keys: the masked metrics
  are undefined there (NaN), counted as missing, never as 0 or infinity. Aggregation skips missing and NaN
  values.
* **PSNR.** `10 log10(1 / MSE)`, capped at `PSNR_CAP_DB` = 100 dB (MSE <= 1e-10): identical images score 100
  dB, a finite number that JSON can hold, and far above any real render (8-bit quantisation alone is ~59 dB).
* **SSIM.** torchmetrics' Gaussian SSIM (11 x 11, sigma 1.5, reflect padded), full frame per image; masked:
  the mean of its SSIM map over the masked pixels and the three channels. The map has the image's size, so
  with a full mask the masked SSIM equals the full-frame one. Its window reaches 5 pixels past the mask, so
  the silhouette's edge is judged too.
* **LPIPS.** The `Lpips` instance passed in (the training one, VGG v0.1); None omits every LPIPS key (absent,
  never a stand-in number). Full frame: LPIPS of the two images. Masked: both images with every pixel outside
  the mask set to black, cropped to the mask's bounding box (grown, centred, to at least `LPIPS_MIN_CROP_PX` a
  side where the frame allows, so the VGG trunk's four poolings keep a spatial extent). Why: LPIPS is a
  spatial mean of deep-feature distances, so a full-frame score is diluted by the object's screen fraction and
  a per-pixel mask cannot be applied to features at 1/16 resolution. Blacking out the outside makes an error
  there count for nothing (as for masked PSNR and SSIM); cropping makes the score a mean over the object's
  region, comparable between small and large objects.
* **PBR buffers.** Base colour, roughness and metallic as rendered (premultiplied by coverage, like the
  truth): L1 and PSNR (data range 1), full frame (`base_color_l1`, `base_color_psnr`) and inside the same
  union mask (`base_color_l1_masked`, `base_color_psnr_masked`); means run over pixels and channels.
* **Shadow.** The true shadow pass is 1 where unshadowed, background included, so the prediction is compared
  with `true_shadow * true_alpha`, as the loss does; L1 full frame (`shadow_l1`) and masked
  (`shadow_l1_masked`), and only on frames whose `shadow_valid` is true (the frame had a shadow-casting
  light).

Aggregation: `average_per_asset` means each metric over an asset's frames (per task and decoder input);
`summarize` means those over assets, with a seeded percentile-bootstrap interval over assets.
"""

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from training.stage2.agx import AgX
from training.stage2.losses import Stage2Target, tone_mapped
from training.stage2.lpips import Lpips
from training.stage2.model import Stage2Render

__all__ = [
    "IMAGE_METRICS",
    "LPIPS_MIN_CROP_PX",
    "MASK_THRESHOLD",
    "METRICS",
    "PBR_BUFFERS",
    "PSNR_CAP_DB",
    "RECORD_KEYS",
    "EvalBuffers",
    "average_per_asset",
    "bootstrap_interval",
    "is_higher_better",
    "measure_frames",
    "summarize",
    "tone_map",
]

logger = logging.getLogger(__name__)

MASK_THRESHOLD = 0.5
"""A pixel is inside an object's mask where its alpha exceeds this."""
PSNR_CAP_DB = 100.0
"""PSNR of identical images (MSE 0) and of anything closer than MSE 1e-10."""
LPIPS_MIN_CROP_PX = 32
"""Smallest side of the masked LPIPS crop (or the frame's side, when smaller)."""
PBR_BUFFERS = ("base_color", "roughness", "metallic")
IMAGE_METRICS = ("psnr_masked", "ssim_masked", "lpips_masked", "psnr", "ssim", "lpips")
METRICS = (
    IMAGE_METRICS
    + tuple(f"{b}_{m}{s}" for b in PBR_BUFFERS for m in ("l1", "psnr") for s in ("_masked", ""))
    + ("shadow_l1_masked", "shadow_l1")
)
"""Every key `measure_frames` can return, in report order."""
RECORD_KEYS = ("task", "input", "asset", "split", "frame")
"""The identifying fields of a per-frame record; every other numeric field of a record is a metric."""


@dataclasses.dataclass(frozen=True)
class EvalBuffers:
    """What is compared for S frames: premultiplied HDR radiance and alpha, and optionally the PBR buffers
    (premultiplied by coverage, as rendered) and the shadow pass (the truth's is 1 where unshadowed,
    background included; a prediction's is premultiplied on black)."""

    radiance: Float[Tensor, "S H W 3"]
    alpha: Float[Tensor, "S H W 1"]
    base_color: Float[Tensor, "S H W 3"] | None = None
    roughness: Float[Tensor, "S H W 1"] | None = None
    metallic: Float[Tensor, "S H W 1"] | None = None
    shadow: Float[Tensor, "S H W 1"] | None = None

    @classmethod
    def of(cls, buffers: Stage2Render | Stage2Target) -> "EvalBuffers":
        """The buffers of a Stage 2 render (prediction) or a Stage 2 target (truth)."""
        return cls(**{f.name: getattr(buffers, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def stack(cls, frames: Sequence[Any]) -> "EvalBuffers":
        """S per-frame objects with (H, W, C) fields of these names (e.g. `tasks.TruthFrame`) stacked into one
        batch; an optional buffer is kept when every frame has it and dropped (None) when none has it.

        Raises:
            ValueError: no frames, or a buffer some frames have and others lack (batch those apart).
        """
        if not frames:
            raise ValueError("EvalBuffers.stack needs at least one frame")
        fields = {}
        for field in dataclasses.fields(cls):
            tensors = [getattr(frame, field.name, None) for frame in frames]
            present = sum(t is not None for t in tensors)
            if 0 < present < len(tensors):
                raise ValueError(f"{present} of {len(tensors)} frames have {field.name}: batch them apart")
            fields[field.name] = torch.stack(tensors) if present else None
        return cls(**fields)

    def to(self, device: torch.device) -> "EvalBuffers":
        return self._map(lambda t: t.to(device))

    def take(self, frames: slice | Sequence[int]) -> "EvalBuffers":
        """The same buffers for a subset of the frames."""
        return self._map(lambda t: t[frames])

    def _map(self, function: Callable[[Tensor], Tensor]) -> "EvalBuffers":
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return EvalBuffers(**{name: None if t is None else function(t) for name, t in fields.items()})


def is_higher_better(metric: str) -> bool:
    """PSNR and SSIM grow with quality; LPIPS and L1 shrink."""
    return "psnr" in metric or "ssim" in metric


def tone_map(agx: AgX, buffers: EvalBuffers) -> Float[Tensor, "S 3 H W"]:
    """The AgX image on black in [0, 1], channels first: what every image metric compares."""
    radiance, alpha = buffers.radiance.float(), buffers.alpha.float()
    return tone_mapped(agx, radiance, alpha, radiance.new_zeros(radiance.shape[0], 1, 1, 1))


@torch.inference_mode()
def measure_frames(
    predicted: EvalBuffers,
    truth: EvalBuffers,
    *,
    agx: AgX,
    lpips: Lpips | None,
    shadow_valid: Bool[Tensor, " S"] | Sequence[bool] | None = None,
) -> list[dict[str, float]]:
    """Image, PBR and shadow metrics of S predicted frames against the truth (module docstring: conventions).

    Args:
        predicted: Stage 2's buffers, (S, H, W, C); bf16 is fine (compared in float32).
        truth: the factory's buffers of the same frames and size (moved to the prediction's device).
        agx: the training tone mapper, on the prediction's device.
        lpips: the training LPIPS (`Lpips.from_files`) on the prediction's device; None omits the LPIPS keys.
        shadow_valid: (S,) whether each frame's shadow target is defined; required when both sides have a
            shadow pass, ignored otherwise.

    Returns:
        One flat dict per frame, keys from `METRICS` (those that apply), plain floats, never NaN or infinite.

    Raises:
        ValueError: shapes that do not match, or shadows without `shadow_valid`.

    Examples:
        >>> agx = AgX.from_simple_ocio()
        >>> image = EvalBuffers(torch.rand(2, 32, 32, 3), torch.ones(2, 32, 32, 1))
        >>> [round(m["psnr"]) for m in measure_frames(image, image, agx=agx, lpips=None)]
        [100, 100]
    """
    valid = _check(predicted, truth, shadow_valid)
    return _measure(predicted, truth.to(predicted.radiance.device), agx, lpips, valid)


def _check(
    predicted: EvalBuffers, truth: EvalBuffers, shadow_valid: Tensor | Sequence[bool] | None
) -> Tensor | None:
    frames, height, width = truth.radiance.shape[:3]
    for side, buffers in (("predicted", predicted), ("truth", truth)):
        for field in dataclasses.fields(EvalBuffers):
            tensor = getattr(buffers, field.name)
            if tensor is None:
                continue
            channels = 3 if field.name in ("radiance", "base_color") else 1
            if tuple(tensor.shape) != (frames, height, width, channels):
                raise ValueError(
                    f"{side}.{field.name} has shape {tuple(tensor.shape)}, expected "
                    f"{(frames, height, width, channels)} (S, H, W, C) like truth.radiance"
                )
    if predicted.shadow is None or truth.shadow is None:
        return None
    if shadow_valid is None:
        raise ValueError(
            "both sides have a shadow pass: pass shadow_valid, (S,) bool, to say where it is defined"
        )
    valid = torch.as_tensor(shadow_valid, dtype=torch.bool).cpu()
    if tuple(valid.shape) != (frames,):
        raise ValueError(f"shadow_valid has shape {tuple(valid.shape)}, expected ({frames},)")
    return valid


def _psnr_from_mse(mse: Tensor) -> Tensor:
    """PSNR for data range 1, capped at PSNR_CAP_DB (so MSE 0 gives the cap, not infinity)."""
    return (-10 * torch.log10(mse)).clamp(max=PSNR_CAP_DB)


def _masked_lpips(
    lpips: Lpips, predicted: Float[Tensor, "3 H W"], truth: Float[Tensor, "3 H W"], mask: Bool[Tensor, "H W"]
) -> float:
    height, width = mask.shape
    rows, cols = mask.any(dim=1).nonzero()[:, 0], mask.any(dim=0).nonzero()[:, 0]
    (top, bottom), (left, right) = (
        _grow(int(r[0]), int(r[-1]) + 1, size) for r, size in ((rows, height), (cols, width))
    )
    window = mask[top:bottom, left:right].to(predicted.dtype)
    a = predicted[:, top:bottom, left:right] * window
    b = truth[:, top:bottom, left:right] * window
    return float(lpips(a[None], b[None])[0])


def _grow(start: int, stop: int, size: int) -> tuple[int, int]:
    """[start, stop) grown about its centre to min(LPIPS_MIN_CROP_PX, size) or more, inside [0, size)."""
    side = min(max(stop - start, LPIPS_MIN_CROP_PX), size)
    start = min(max(0, (start + stop - side) // 2), size - side)
    return start, start + side


def _measure(
    predicted: EvalBuffers, truth: EvalBuffers, agx: AgX, lpips: Lpips | None, shadow_valid: Tensor | None
) -> list[dict[str, float]]:
    image_p, image_t = tone_map(agx, predicted), tone_map(agx, truth)  # (S, 3, H, W)
    mask = (predicted.alpha.float() > MASK_THRESHOLD) | (truth.alpha.float() > MASK_THRESHOLD)  # (S, H, W, 1)
    pixels = mask.sum(dim=(1, 2, 3))  # (S,)
    masked_mean = _masked_mean(mask, pixels)
    channels_first = mask.permute(0, 3, 1, 2)  # (S, 1, H, W)

    scores: dict[str, Tensor] = {}
    psnr = peak_signal_noise_ratio(image_p, image_t, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim, ssim_map = structural_similarity_index_measure(
        image_p, image_t, data_range=1.0, reduction="none", return_full_image=True
    )
    squared = (image_p - image_t) ** 2
    scores["psnr_masked"] = _psnr_from_mse(masked_mean(squared.permute(0, 2, 3, 1)))
    scores["ssim_masked"] = masked_mean(ssim_map.permute(0, 2, 3, 1))
    if lpips is not None:
        scores["lpips_masked"] = torch.tensor(
            [
                _masked_lpips(lpips, image_p[s], image_t[s], channels_first[s, 0])
                if pixels[s] > 0
                else math.nan
                for s in range(len(pixels))
            ]
        )
    scores["psnr"] = psnr.clamp(max=PSNR_CAP_DB)
    scores["ssim"] = ssim
    if lpips is not None:
        scores["lpips"] = lpips(image_p, image_t)

    for name in PBR_BUFFERS:
        p, t = getattr(predicted, name), getattr(truth, name)
        if p is None or t is None:
            continue
        difference = p.float() - t.float()
        scores[f"{name}_l1_masked"] = masked_mean(difference.abs())
        scores[f"{name}_psnr_masked"] = _psnr_from_mse(masked_mean(difference**2))
        scores[f"{name}_l1"] = difference.abs().mean(dim=(1, 2, 3))
        scores[f"{name}_psnr"] = _psnr_from_mse((difference**2).mean(dim=(1, 2, 3)))

    if shadow_valid is not None:
        # _check returns a validity only when both sides have a shadow pass
        assert predicted.shadow is not None and truth.shadow is not None
        error = (predicted.shadow.float() - truth.shadow.float() * truth.alpha.float()).abs()
        invalid = ~shadow_valid.to(error.device)
        scores["shadow_l1_masked"] = masked_mean(error).masked_fill(invalid, math.nan)
        scores["shadow_l1"] = error.mean(dim=(1, 2, 3)).masked_fill(invalid, math.nan)

    columns = {name: values.detach().double().cpu().tolist() for name, values in scores.items()}
    frames = []
    for s in range(len(pixels)):
        values = {name: columns[name][s] for name in METRICS if name in columns}
        frames.append({name: value for name, value in values.items() if math.isfinite(value)})
    return frames


def _masked_mean(mask: Bool[Tensor, "S H W 1"], pixels: Tensor) -> Callable[[Tensor], Tensor]:
    """x (S, H, W, C) -> (S,) mean over the masked pixels and the channels; NaN where the mask is empty."""

    def mean(x: Tensor) -> Tensor:
        total = (x * mask.to(x.dtype)).sum(dim=(1, 2, 3))
        count = pixels.to(x.dtype) * x.shape[-1]
        return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))

    return mean


# -- aggregation ---------------------------------------------------------------------------------------------


def _metrics_of(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric fields of a record that are not identifiers."""
    values = {}
    for key, value in record.items():
        if key in RECORD_KEYS or isinstance(value, bool) or not isinstance(value, int | float | np.number):
            continue
        if math.isfinite(float(value)):
            values[key] = float(value)
    return values


def _ordered(metrics: Iterable[str]) -> list[str]:
    known = set(metrics)
    return [m for m in METRICS if m in known] + sorted(known - set(METRICS))


def _group(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(task, input, asset) -> {"splits", "frames", "values": {metric: [per-frame values]}}, sorted by key."""
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for index, row in enumerate(rows):
        missing = [k for k in ("task", "input", "asset") if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"record {index} lacks a string {missing[0]!r}: {dict(row)!r:.200}")
        group = groups.setdefault(
            (row["task"], row["input"], row["asset"]), {"splits": set(), "frames": 0, "values": {}}
        )
        if row.get("split") is not None:
            group["splits"].add(str(row["split"]))
        group["frames"] += 1
        for metric, value in _metrics_of(row).items():
            group["values"].setdefault(metric, []).append(value)
    return dict(sorted(groups.items()))


def average_per_asset(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each metric's mean over an asset's frames, one row per (task, input, asset): the per-asset table.

    Args:
        rows: per-frame records `{"task": str, "input": str, "asset": str, "split": str, "frame": str | int,
            **metrics}`; a metric that is absent, None, NaN or infinite in a record is missing for that frame.

    Returns:
        Rows `{"task", "input", "asset", "split", "frames", **{metric: mean}}` sorted by (task, input, asset);
        `frames` counts the asset's records, `split` joins its splits with "+" (normally one); a metric no
        frame of the asset has is left out.

    Examples:
        >>> average_per_asset([{"task": "task2", "input": "gt", "asset": "a", "split": "test", "frame": 0,
        ...                     "psnr": 30.0}, {"task": "task2", "input": "gt", "asset": "a", "split": "test",
        ...                     "frame": 1, "psnr": 20.0, "lpips": None}])
        [{'task': 'task2', 'input': 'gt', 'asset': 'a', 'split': 'test', 'frames': 2, 'psnr': 25.0}]
    """
    table = []
    for (task, input_, asset), group in _group(rows).items():
        row: dict[str, Any] = {"task": task, "input": input_, "asset": asset}
        row["split"] = "+".join(sorted(group["splits"]))
        row["frames"] = group["frames"]
        for metric in _ordered(group["values"]):
            row[metric] = float(np.mean(group["values"][metric]))
        table.append(row)
    return table


def bootstrap_interval(
    values: Sequence[float] | np.ndarray, *, resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap interval of the mean: `resamples` draws of len(values) with replacement.

    A single value gives the degenerate interval (value, value, value): one asset says nothing about spread.

    Raises:
        ValueError: no values, or a confidence outside (0, 1).

    Examples:
        >>> bootstrap_interval([1.0])
        (1.0, 1.0, 1.0)
        >>> mean, low, high = bootstrap_interval([1.0, 2.0, 3.0, 4.0], seed=0)
        >>> low <= mean <= high
        True
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or len(array) == 0:
        raise ValueError(f"bootstrap_interval needs a non-empty 1-D sequence, got shape {array.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = float(array.mean())
    if len(array) == 1:
        return mean, mean, mean
    generator = np.random.default_rng(seed)
    means = array[generator.integers(0, len(array), size=(resamples, len(array)))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return mean, float(low), float(high)


def summarize(
    rows: Iterable[Mapping[str, Any]], *, resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict[str, dict[str, dict[str, dict[str, float | int]]]]:
    """Per (task, input, metric): the mean over assets of the per-asset means, with a bootstrap interval.

    Every asset weighs the same whatever its frame count. The interval resamples assets (`bootstrap_interval`,
    one generator seeded with `seed` per metric, so it does not depend on which other metrics exist); with a
    single asset it is degenerate: low = high = mean.

    Args:
        rows: per-frame records as for `average_per_asset`.

    Returns:
        JSON-ready `{task: {input: {metric: {"mean", "low", "high", "assets", "frames"}}}}`, sorted by task
        and input, metrics in `METRICS` order then by name; `assets` counts the assets with the metric,
        `frames` the frames with it. A metric no frame has is left out.

    Examples:
        >>> rows = [{"task": "task1", "input": "gt", "asset": a, "split": "test", "frame": 0, "psnr": p}
        ...         for a, p in (("a", 30.0), ("b", 20.0))]
        >>> summarize(rows, resamples=10)["task1"]["gt"]["psnr"]["mean"]
        25.0
    """
    summary: dict[str, dict[str, dict[str, dict[str, float | int]]]] = {}
    per_metric: dict[tuple[str, str], dict[str, tuple[list[float], int]]] = {}
    for (task, input_, _), group in _group(rows).items():
        metrics = per_metric.setdefault((task, input_), {})
        for metric, values in group["values"].items():
            means, frames = metrics.get(metric, ([], 0))
            metrics[metric] = (means + [float(np.mean(values))], frames + len(values))
    for (task, input_), metrics in per_metric.items():
        entry = summary.setdefault(task, {}).setdefault(input_, {})
        for metric in _ordered(metrics):
            means, frames = metrics[metric]
            mean, low, high = bootstrap_interval(means, resamples=resamples, seed=seed, confidence=confidence)
            entry[metric] = {"mean": mean, "low": low, "high": high, "assets": len(means), "frames": frames}
    logger.info("summarized %d (task, input) pairs", len(per_metric))
    return summary
