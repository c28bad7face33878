"""The Stage 2 model: LH-SLAT + camera + environment map -> relightable Gaussians -> rendered buffers.

A batch holds A assets and S samples (one view under one lighting each); `sample_asset[s]` says which asset
sample s shows. The intrinsic part (decoder, intrinsic head) runs once per asset; the lighting tokenizer, the
view embedding, the Lighting Aware Decoder, the lighting head, the radiance MLP and the rasterizer run per
sample. So several views of one asset in a batch share their intrinsic pass, and rendering a new view or
lighting of a decoded asset costs only the per-sample part.

Fast paths, each behind a flag so the benchmark times both sides and tests compare them (same outputs to float
tolerance): `decoder.batched_cross_attention`, `batched_rasterizer` (one rasterizer call for all samples), and for
inference `ViewRenderer`, which keeps a decoded asset and its maps' camera-independent tokenizer features and runs
only the per-view part, optionally replayed from a CUDA graph (`ViewRendererConfig`).
"""

import dataclasses
import itertools
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from encoders.sparse import SparseTensor
from infra.config import FrozenConfig
from training.stage2.decoders import (
    DecoderConfig,
    IntrinsicAwareDecoder,
    LightingAwareDecoder,
    RowGroups,
    ViewEmbedding,
)
from training.stage2.gaussians import (
    FEATURE_CHANNELS,
    FEATURE_WIDTHS,
    GaussianHeadsConfig,
    IntrinsicGaussians,
    IntrinsicHead,
    LightingAttributes,
    LightingHead,
    RadianceMlp,
    splats_for_view,
)
from training.stage2.lighting_tokenizer import LightingTokenizer, LightingTokenizerConfig, MapFeatures
from training.stage2.rasterizer import Camera, RasterBackend, Splats, rasterize


@dataclasses.dataclass(frozen=True)
class Stage2ModelConfig(FrozenConfig):
    """Defaults are the paper's sizes: 12 + 6 blocks of width 768, 16 registers, 4096 lighting tokens."""

    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
    tokenizer: LightingTokenizerConfig = dataclasses.field(default_factory=LightingTokenizerConfig)
    heads: GaussianHeadsConfig = dataclasses.field(default_factory=GaussianHeadsConfig)
    rasterizer: RasterBackend = "auto"
    batched_rasterizer: bool = True
    """Rasterize all samples in one call (each sample's Gaussians padded to the largest sample with zero opacity)
    rather than one call per sample; the same images."""


@dataclasses.dataclass(frozen=True)
class ViewRendererConfig(FrozenConfig):
    """What `ViewRenderer` reuses between views."""

    reuse_map_features: bool = True
    """Encode each map's E_ldr and E_log once: only E_dir depends on the camera."""
    cuda_graph: bool = True
    """On CUDA, replay the per-view decoder (lighting tokens to splats, not the rasterizer) from a CUDA graph
    captured on the first view: one launch instead of one per operation."""


@dataclasses.dataclass(frozen=True)
class Stage2Inputs:
    slat: SparseTensor  # (N, C_in) normalised latents of A assets, coords (asset, x, y, z)
    sample_asset: Int[Tensor, " S"]
    w2c: Float[Tensor, "S 4 4"]  # OpenCV world-to-camera
    K: Float[Tensor, "S 3 3"]  # pixel intrinsics
    env_ldr: Float[Tensor, "S 3 He We"]
    env_log: Float[Tensor, "S 3 He We"]
    env_dir: Float[Tensor, "S 3 He We"]
    image_size: tuple[int, int]  # (H, W)

    def to(self, device: torch.device) -> "Stage2Inputs":
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        slat = SparseTensor(self.slat.coords.to(device), self.slat.feats.to(device))
        return dataclasses.replace(self, slat=slat, **moved)


@dataclasses.dataclass(frozen=True)
class SampleRows:
    """Which rows of the assets' voxels each sample uses, grouped by sample. Built once per batch (it reads sizes on
    the host); the per-sample work after it never waits on the GPU."""

    gather: Int[Tensor, " M"]  # row of the assets' voxels
    sample: Int[Tensor, " M"]  # sample of each row
    groups: RowGroups


@dataclasses.dataclass(frozen=True)
class Stage2Render:
    """Per sample, premultiplied on black: HDR radiance and the PBR and shadow buffers, plus alpha."""

    radiance: Float[Tensor, "S H W 3"]
    base_color: Float[Tensor, "S H W 3"]
    roughness: Float[Tensor, "S H W 1"]
    metallic: Float[Tensor, "S H W 1"]
    shadow: Float[Tensor, "S H W 1"]
    alpha: Float[Tensor, "S H W 1"]
    scales: Float[Tensor, "M 3"]  # every rendered Gaussian of every sample, for the regularizers
    opacities: Float[Tensor, " M"]

    def sample(self, index: int) -> "Stage2Render":
        """The images of sample `index` alone (S = 1); the Gaussians' scales and opacities stay whole."""
        images = ("radiance", "base_color", "roughness", "metallic", "shadow", "alpha")
        return dataclasses.replace(self, **{name: getattr(self, name)[index : index + 1] for name in images})


def take(fields: Any, index: Tensor) -> Any:
    """The same dataclass with every tensor field indexed by `index` along its first axis."""
    return dataclasses.replace(
        fields, **{f.name: getattr(fields, f.name)[index] for f in dataclasses.fields(fields)}
    )


class Stage2Model(nn.Module):
    def __init__(self, config: Stage2ModelConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.decoder.model_channels
        self.tokenizer = LightingTokenizer(config.tokenizer)
        self.intrinsic_decoder = IntrinsicAwareDecoder(config.decoder)
        self.view_embedding = ViewEmbedding(config.decoder)
        self.lighting_decoder = LightingAwareDecoder(config.decoder, config.tokenizer.width)
        self.intrinsic_head = IntrinsicHead(channels, config.heads)
        self.lighting_head = LightingHead(channels, config.heads)
        self.radiance_mlp = RadianceMlp(config.heads)

    def decode_intrinsic(
        self, slat: SparseTensor
    ) -> tuple[Float[Tensor, "N C"], Float[Tensor, "A R C"], IntrinsicGaussians]:  # fmt: skip
        """Once per asset: intrinsic features, registers and the lighting-independent Gaussian attributes."""
        features, registers = self.intrinsic_decoder(slat)
        return features, registers, self.intrinsic_head(features, slat.coords[:, 1:])

    def encode_env_maps(self, env_ldr: Float[Tensor, "B 3 He We"], env_log: Float[Tensor, "B 3 He We"]) -> MapFeatures:
        """Once per map: the lighting tokenizer's camera-independent part."""
        return self.tokenizer.encode_maps(env_ldr, env_log)

    def sample_rows(self, coords: Int[Tensor, "N 4"], sample_asset: Int[Tensor, " S"]) -> SampleRows:
        """Which voxel rows each sample uses: once per batch, the one step that waits on the GPU."""
        assets = sample_asset.tolist()
        counts = torch.bincount(coords[:, 0].long().cpu(), minlength=max(assets) + 1).tolist()
        starts = [0, *itertools.accumulate(counts)]
        gather = torch.cat([torch.arange(starts[a], starts[a] + counts[a]) for a in assets])
        sample = torch.repeat_interleave(torch.arange(len(assets)), torch.tensor([counts[a] for a in assets]))
        groups = RowGroups.of([counts[a] for a in assets], coords.device)
        return SampleRows(gather.to(coords.device), sample.to(coords.device), groups)

    def decode_lighting(
        self, inputs: Stage2Inputs, features: Float[Tensor, "N C"], registers: Float[Tensor, "A R C"]
    ) -> tuple[Int[Tensor, " M"], RowGroups, LightingAttributes]:  # fmt: skip
        """Per sample: the rows of `features` it uses (grouped by sample), their groups, and its lighting-aware
        attributes."""
        rows = self.sample_rows(inputs.slat.coords, inputs.sample_asset)
        maps = self.encode_env_maps(inputs.env_ldr, inputs.env_log)
        lighting = self._decode_lighting(
            inputs.slat.coords, rows, features, registers[inputs.sample_asset], maps, inputs.w2c, inputs.env_dir
        )
        return rows.gather, rows.groups, lighting

    def _decode_lighting(
        self, coords: Int[Tensor, "N 4"], rows: SampleRows, features: Float[Tensor, "N C"],
        registers: Float[Tensor, "S R C"], maps: MapFeatures, w2c: Float[Tensor, "S 4 4"],
        env_dir: Float[Tensor, "S 3 He We"],
    ) -> LightingAttributes:  # fmt: skip
        """The per-sample decoder, free of host syncs (so a CUDA graph can capture it)."""
        tokens = self.tokenizer.tokens(maps, env_dir)  # (S, L, C_l)
        embedding = self.view_embedding(coords[rows.gather, 1:], w2c[rows.sample])
        h = features[rows.gather] + embedding.to(features.dtype)
        return self.lighting_head(self.lighting_decoder(h, tokens.to(h.dtype), registers, rows.groups))

    def forward(self, inputs: Stage2Inputs) -> Stage2Render:
        features, registers, gaussians = self.decode_intrinsic(inputs.slat)
        gather, groups, lighting = self.decode_lighting(inputs, features, registers)
        return self.render(inputs, take(gaussians, gather), lighting, groups)

    def render(
        self, inputs: Stage2Inputs, gaussians: IntrinsicGaussians, lighting: LightingAttributes, groups: RowGroups
    ) -> Stage2Render:  # fmt: skip
        """Rasterize each sample's Gaussians (rows grouped by sample) in float32."""
        w2c = inputs.w2c.float()
        return self._rasterize(self.splats(gaussians, lighting, groups, w2c), groups, w2c, inputs.K.float(),
                               inputs.image_size)  # fmt: skip

    def splats(
        self, gaussians: IntrinsicGaussians, lighting: LightingAttributes, groups: RowGroups,
        w2c: Float[Tensor, "S 4 4"],
    ) -> Splats | list[Splats]:  # fmt: skip
        """With `batched_rasterizer`, the S samples' splats padded to (S, max rows * K); else one Splats each."""
        if self.config.batched_rasterizer:
            return splats_for_view(_pad(gaussians, groups), _pad(lighting, groups), self.radiance_mlp, w2c)
        pieces = zip(_split(gaussians, groups.rows), _split(lighting, groups.rows))
        return [splats_for_view(g, light, self.radiance_mlp, w2c[s]) for s, (g, light) in enumerate(pieces)]

    def _rasterize(
        self, splats: Splats | list[Splats], groups: RowGroups, w2c: Float[Tensor, "S 4 4"], K: Float[Tensor, "S 3 3"],
        image_size: tuple[int, int],
    ) -> Stage2Render:  # fmt: skip
        height, width = image_size
        backend = self.config.rasterizer
        if isinstance(splats, Splats):
            images, alphas = rasterize(splats, Camera(w2c=w2c, K=K, width=width, height=height), backend=backend)
            per_voxel = self.config.heads.gaussians_per_voxel
            scales = groups.unpad(splats.scales.unflatten(1, (-1, per_voxel))).flatten(0, 1)
            opacities = groups.unpad(splats.opacities.unflatten(1, (-1, per_voxel))).flatten()
        else:
            rendered = [
                rasterize(sample, Camera(w2c=w2c[s], K=K[s], width=width, height=height), backend=backend)
                for s, sample in enumerate(splats)
            ]
            images, alphas = (torch.stack(parts) for parts in zip(*rendered))
            scales = torch.cat([sample.scales for sample in splats])
            opacities = torch.cat([sample.opacities for sample in splats])
        buffers = images.split([FEATURE_WIDTHS[name] for name in FEATURE_CHANNELS], dim=-1)
        return Stage2Render(**dict(zip(FEATURE_CHANNELS, buffers)), alpha=alphas, scales=scales, opacities=opacities)


class ViewRenderer:
    """Views of decoded assets under fixed environment maps, reusing what does not change between views: the
    intrinsic pass runs here once, and (with `reuse_map_features`) the maps' camera-independent tokenizer features;
    each call runs the per-view part, replayed from a CUDA graph with `cuda_graph` on CUDA.

    Calls follow the autocast in force. A CUDA graph is captured on the first call and replayed by every later one;
    a render's `scales` and `opacities` may then share the graph's buffers, which the next call overwrites.
    """

    def __init__(
        self, model: Stage2Model, slat: SparseTensor, sample_asset: Int[Tensor, " S"],
        env_ldr: Float[Tensor, "B 3 He We"], env_log: Float[Tensor, "B 3 He We"], *,
        config: ViewRendererConfig = ViewRendererConfig(),
    ) -> None:  # fmt: skip
        """`env_ldr`, `env_log`: B = S maps (one per sample), or one map that every sample sees."""
        self.model, self.config, self.coords = model, config, slat.coords
        features, registers, gaussians = model.decode_intrinsic(slat)
        self.rows = model.sample_rows(slat.coords, sample_asset)
        self.features, self.registers = features, registers[sample_asset]
        self.gaussians = take(gaussians, self.rows.gather)
        self.env = (env_ldr, env_log)
        self.maps = model.encode_env_maps(env_ldr, env_log) if config.reuse_map_features else None
        self.use_graph = config.cuda_graph and features.is_cuda
        self.graph: tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Splats | list[Splats]] | None = None

    def __call__(
        self, w2c: Float[Tensor, "S 4 4"], K: Float[Tensor, "S 3 3"], env_dir: Float[Tensor, "S 3 He We"],
        image_size: tuple[int, int],
    ) -> Stage2Render:  # fmt: skip
        """The buffers of S views (OpenCV `w2c`, pixel `K`); `env_dir` is each sample's map directions in its
        camera's frame (`encode_env_map`)."""
        w2c = w2c.float()
        if not self.use_graph:
            splats = self._splats(w2c, env_dir)
        else:
            if self.graph is None:
                self.graph = self._capture(w2c, env_dir)
            graph, static_w2c, static_env_dir, splats = self.graph
            static_w2c.copy_(w2c)
            static_env_dir.copy_(env_dir)
            graph.replay()
        return self.model._rasterize(splats, self.rows.groups, w2c, K.float(), image_size)

    def _splats(self, w2c: Float[Tensor, "S 4 4"], env_dir: Float[Tensor, "S 3 He We"]) -> Splats | list[Splats]:
        model = self.model
        maps = self.maps if self.maps is not None else model.encode_env_maps(*self.env)
        lighting = model._decode_lighting(self.coords, self.rows, self.features, self.registers, maps, w2c, env_dir)
        return model.splats(self.gaussians, lighting, self.rows.groups, w2c)

    def _capture(
        self, w2c: Float[Tensor, "S 4 4"], env_dir: Float[Tensor, "S 3 He We"]
    ) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Splats | list[Splats]]:  # fmt: skip
        """Warm up on a side stream, then capture `_splats` on static inputs. Autocast's weight cache is off while
        capturing: the graph must own the casts it replays."""
        static_w2c, static_env_dir = w2c.clone(), env_dir.clone()
        dtype, enabled = torch.get_autocast_dtype("cuda"), torch.is_autocast_enabled("cuda")
        with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._splats(static_w2c, static_env_dir)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                splats = self._splats(static_w2c, static_env_dir)
        return graph, static_w2c, static_env_dir, splats


def _pad(fields: Any, groups: RowGroups) -> Any:
    """Per-row fields as (S, max rows, ...), zeros after each sample's rows (zero opacity: not rendered)."""
    return dataclasses.replace(
        fields, **{f.name: groups.pad(getattr(fields, f.name)) for f in dataclasses.fields(fields)}
    )


def _split(fields: Any, rows: list[int]) -> list[Any]:
    pieces = {f.name: getattr(fields, f.name).split(rows) for f in dataclasses.fields(fields)}
    return [
        dataclasses.replace(fields, **{name: parts[i] for name, parts in pieces.items()})
        for i in range(len(rows))
    ]
