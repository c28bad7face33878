"""The build configuration: one YAML file names the source, the recipes, the models and the release.

    data_root: /data/near                  # packs, catalog (SQLite by default), releases, reports
    source: {kind: local, path: /assets, pattern: "**/*"}     # or {kind: demo, seed: 0}
    recipes:                               # overrides of the paper's defaults per recipe
      lh: {num_views: 150, resolution_px: 512, samples: 16}
    models: {dinov2: facebook/dinov2-with-registers-large, slat_encoder: ..., slat_flow: ...}
    shaded: {views: 1, sampler: {steps: 25, cfg_strength: 3.0}}   # the shaded SLAT Z_s of Stage 1
    release: {name: lh-slat-v1, min_voxels: 1, max_voxels: 65536}

Every relative path is relative to the YAML file's folder.
"""

import dataclasses
from pathlib import Path
from typing import Any, Literal

import yaml

from catalogs.objaverse import OBJAVERSE_SOURCES, ObjaverseSelection
from encoders.asset_encoder import DEFAULT_SLAT_ENCODER
from encoders.dinov2 import DEFAULT_DINOV2
from encoders.shaded_slat import DEFAULT_SLAT_FLOW, ShadedSlatConfig
from infra.config import FrozenConfig
from infra.errors import ConfigError
from render_jobs.protocol import GPU_BACKENDS
from render_jobs.recipes import RECIPE_NAMES, RecipeConfig, recipe_config

SourceKind = Literal["local", "demo", "objaverse-xl"]


@dataclasses.dataclass(frozen=True)
class SourceConfig(FrozenConfig):
    kind: SourceKind = "demo"
    path: str | None = None
    """`local`: the folder to scan. `demo`: where the generated assets go (default `<data_root>/demo-assets`).
    `objaverse-xl`: the download cache (annotations, repos, extracted files; default `<data_root>/objaverse`)."""
    pattern: str = "**/*"
    """`local`: glob under `path`; files with a supported extension are taken, symlinks out of `path` are not."""
    seed: int = 0
    """`demo`: seed of the generated assets."""
    objaverse_sources: tuple[str, ...] = OBJAVERSE_SOURCES
    file_types: tuple[str, ...] = ObjaverseSelection.file_types
    licenses: tuple[str, ...] | None = None
    ids_file: str | None = None
    """`objaverse-xl`: a file of fileIdentifiers or sha256s to keep, one per line (a curated list)."""
    limit: int | None = None
    download_processes: int = 8
    max_file_mb: int = 512
    """Largest file taken out of a GitHub repository archive."""

    def __post_init__(self) -> None:
        if self.kind not in ("local", "demo", "objaverse-xl"):
            raise ConfigError(f"source kind must be local, demo or objaverse-xl, got {self.kind!r}")
        if self.kind == "local" and not self.path:
            raise ConfigError("a local source needs a path")
        ObjaverseSelection(sources=self.objaverse_sources)  # validates the names


@dataclasses.dataclass(frozen=True)
class ReleaseConfig(FrozenConfig):
    name: str | None = None
    """No release when unset."""
    min_voxels: int = 1
    max_voxels: int | None = None
    val_percent: int = 5


@dataclasses.dataclass(frozen=True)
class ExecutionConfig(FrozenConfig):
    ray_address: str | None = None
    """None: the cluster of `RAY_ADDRESS` (as `ray job submit` sets it), else a local one."""
    render_slots: int = 1
    """`render_slot` resources a local cluster declares (cluster nodes declare their own)."""
    render_gpus: float = 0.0
    """GPU share per render actor (EEVEE shares a GPU well: 0.125 = 8 renderers per GPU)."""
    encoder_gpus: float = 0.0
    """GPU share of each encoder actor; 0 runs them on CPU."""
    encoders_per_node: int = 1
    """Encoder actors per node that renders `lh` sets (one H100 encodes an asset in about 2.3 s, while 8 H100s
    render about one asset per second: two per 8-GPU node keep up)."""
    max_in_flight: int = 8
    """Assets between render and commit at any time."""
    commit_every: int = 64
    """Results per registry commit (each commit is an Iceberg snapshot); 1 commits each result as it arrives."""
    commit_interval_s: float = 30.0
    """Commit what has arrived at least this often."""
    render_timeout_s: float = 600.0
    allow_software_gl: bool = False
    gpu_backend: str = "opengl"
    scratch_dir: str | None = None
    """Node-local folder for transient renders (default `<data_root>/scratch`)."""
    keep_renders: bool = False

    def __post_init__(self) -> None:
        if self.gpu_backend not in GPU_BACKENDS:
            raise ConfigError(f"gpu_backend must be one of {GPU_BACKENDS}, got {self.gpu_backend!r}")
        if min(self.max_in_flight, self.render_slots, self.commit_every, self.encoders_per_node) < 1:
            raise ConfigError("max_in_flight, render_slots, commit_every and encoders_per_node must be >= 1")


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    data_root: Path
    source: SourceConfig = SourceConfig()
    recipes: dict[str, RecipeConfig] = dataclasses.field(
        default_factory=lambda: {name: recipe_config(name) for name in RECIPE_NAMES}
    )
    dinov2: str = DEFAULT_DINOV2
    slat_encoder: str = DEFAULT_SLAT_ENCODER
    slat_flow: str = DEFAULT_SLAT_FLOW
    shaded: ShadedSlatConfig = dataclasses.field(default_factory=ShadedSlatConfig)
    release: ReleaseConfig = ReleaseConfig()
    execution: ExecutionConfig = ExecutionConfig()
    catalog_uri: str | None = None
    """SQLAlchemy URI of the catalog; default: SQLite beside the data."""

    @classmethod
    def from_yaml(cls, path: str | Path) -> "BuildConfig":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read build config {path}: {err}") from err
        return cls.from_dict(data, base=path.parent)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base: Path = Path(".")) -> "BuildConfig":
        known = {f.name for f in dataclasses.fields(cls)} | {"models"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown build config keys {unknown}; known: {sorted(known)}")
        if "data_root" not in data:
            raise ConfigError("the build config needs data_root")
        try:
            source = SourceConfig.from_dict(data.get("source", {}))
            if source.path is not None:
                source = source.replace(path=str(_resolve(base, source.path)))
            if source.ids_file is not None:
                source = source.replace(ids_file=str(_resolve(base, source.ids_file)))
            overrides = data.get("recipes") or {}
            bad = sorted(set(overrides) - set(RECIPE_NAMES))
            if bad:
                raise ConfigError(f"unknown recipes {bad}; recipes are {RECIPE_NAMES}")
            recipes = {name: recipe_config(name, **(overrides.get(name) or {})) for name in RECIPE_NAMES}
            models = data.get("models") or {}
            unknown_models = sorted(set(models) - {"dinov2", "slat_encoder", "slat_flow"})
            if unknown_models:
                raise ConfigError(
                    f"unknown models {unknown_models}; models are dinov2, slat_encoder, slat_flow"
                )
            return cls(
                data_root=_resolve(base, data["data_root"]),
                source=source,
                recipes=recipes,
                dinov2=_model_reference(base, models.get("dinov2", DEFAULT_DINOV2)),
                slat_encoder=_model_reference(base, models.get("slat_encoder", DEFAULT_SLAT_ENCODER)),
                slat_flow=_model_reference(base, models.get("slat_flow", DEFAULT_SLAT_FLOW)),
                shaded=ShadedSlatConfig.from_dict(data.get("shaded") or {}),
                release=ReleaseConfig.from_dict(data.get("release") or {}),
                execution=ExecutionConfig.from_dict(data.get("execution") or {}),
                catalog_uri=data.get("catalog_uri"),
            )
        except (TypeError, ValueError) as err:
            raise ConfigError(f"invalid build config: {err}") from err

    @property
    def scratch_dir(self) -> Path:
        return Path(self.execution.scratch_dir or self.data_root / "scratch")


def _resolve(base: Path, path: str | Path) -> Path:
    path = Path(path).expanduser()
    return (path if path.is_absolute() else base / path).resolve()


def _model_reference(base: Path, reference: str) -> str:
    """A local path (made absolute) or a hub id, which is kept as written."""
    candidate = _resolve(base, reference)
    is_local = candidate.exists() or candidate.with_suffix(".safetensors").exists()
    return str(candidate) if is_local or reference.startswith((".", "/", "~")) else reference
