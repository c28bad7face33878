"""The build configuration: one YAML file names the source, the recipes, the models and the release.

    data_root: /data/near                  # packs, catalog (SQLite by default), releases, reports
    source: {kind: local, path: /assets, pattern: "**/*"}     # or {kind: demo, seed: 0}
    recipes:                               # overrides of the paper's defaults per recipe
      lh: {num_views: 150, resolution_px: 512, samples: 16}
    models: {dinov2: facebook/dinov2-with-registers-large, slat_encoder: ..., slat_flow: ...}
    shaded: {views: 1, sampler: {steps: 25, cfg_strength: 3.0}}   # the shaded SLAT Z_s of Stage 1
    release: {name: lh-slat-v1, min_voxels: 1, max_voxels: 65536, test_percent: 1, val_percent: 5,
              filters: [{stat: has_base_color_texture, equals: true}]}

Every relative path is relative to the YAML file's folder.
"""

import dataclasses
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from catalogs.errors import check_release_name
from catalogs.objaverse import OBJAVERSE_SOURCES, ObjaverseSelection
from catalogs.splits import SplitRule
from catalogs.storage import RootPath, is_local, root_path
from encoders.asset_encoder import DEFAULT_SLAT_ENCODER
from encoders.dinov2 import DEFAULT_DINOV2, Precision
from encoders.shaded_slat import DEFAULT_SLAT_FLOW, ShadedSlatConfig
from infra.config import (
    ConfigFieldError,
    FrozenConfig,
    LocalPath,
    Location,
    ModelReference,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Range,
    check_field,
    load_config,
    load_config_file,
)
from infra.errors import ConfigError
from render_jobs.protocol import GpuBackend
from render_jobs.recipes import RECIPE_NAMES, RecipeConfig, RecipeName, recipe_config

SourceKind = Literal["local", "demo", "objaverse-xl"]


@dataclasses.dataclass(frozen=True)
class SourceConfig(FrozenConfig):
    kind: SourceKind = "demo"
    path: LocalPath | None = None
    """`local`: the folder to scan. `demo`: where the generated assets go (default `<data_root>/demo-assets`).
    `objaverse-xl`: the download cache (annotations, repos, extracted files; default `<data_root>/objaverse`)."""
    pattern: str = "**/*"
    """`local`: glob under `path`; files with a supported extension are taken, symlinks out of `path` are not."""
    seed: NonNegativeInt = 0
    """`demo`: seed of the generated assets."""
    objaverse_sources: tuple[str, ...] = OBJAVERSE_SOURCES
    file_types: tuple[str, ...] = ObjaverseSelection.file_types
    licenses: tuple[str, ...] | None = None
    ids_file: LocalPath | None = None
    """`objaverse-xl`: a file of fileIdentifiers or sha256s to keep, one per line (a curated list)."""
    limit: PositiveInt | None = None
    download_processes: PositiveInt = 8
    max_file_mb: PositiveInt = 512
    """Most one asset may extract from a GitHub repository archive: the file and a glTF's buffers and images."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind == "local" and not self.path:
            raise ConfigFieldError("path", "a local source needs a path")
        if self.kind == "local" and not Path(self.path).is_dir():
            raise ConfigFieldError("path", f"no folder at {self.path!r}")
        pattern = PurePosixPath(self.pattern)
        if not self.pattern or pattern.is_absolute() or ".." in pattern.parts:
            raise ConfigFieldError(
                "pattern", f"must be a glob relative to source.path (no leading '/', no '..'), got {self.pattern!r}"
            )
        if self.ids_file is not None and not Path(self.ids_file).is_file():
            raise ConfigFieldError("ids_file", f"no file at {self.ids_file!r}")
        check_field(
            "objaverse_sources", lambda names: ObjaverseSelection(sources=names), self.objaverse_sources
        )


@dataclasses.dataclass(frozen=True)
class FilterConfig(FrozenConfig):
    """Keep a sample only if a stat its build recorded satisfies every bound given, e.g. the paper's PBR assets:
    `{stat: has_base_color_texture, equals: true}`. The step table says which step records each stat."""

    stat: str
    min: float | None = None
    max: float | None = None
    equals: bool | int | float | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min is None and self.max is None and self.equals is None:
            raise ConfigFieldError("stat", f"filter on {self.stat!r} needs min, max or equals")


@dataclasses.dataclass(frozen=True)
class ReleaseConfig(FrozenConfig):
    name: str | None = None
    """No release when unset; else one plain name (`catalogs.errors.RELEASE_NAME`)."""
    min_voxels: PositiveInt = 1
    max_voxels: PositiveInt | None = None
    val_percent: Annotated[float, Range(ge=0, le=100)] = 5.0
    test_percent: Annotated[float, Range(ge=0, le=100)] = 1.0
    """Share of assets in the `test` split, fixed by a hash of the source_id (`catalogs.splits`): the same asset
    is test in every release with this value, and no training run reads it. Only test assets get `render_eval`."""
    held_out_env_maps: tuple[str, ...] = ()
    """Env map file names (of the `relight` recipe's maps) Stage 2 never trains on: evaluation lights test
    assets with them (`render_eval`, and the `relight` frames they light). Empty: `num_held_out_env_maps` of
    them, a fixed choice by the hash of their names."""
    num_held_out_env_maps: NonNegativeInt = 4
    filters: tuple[FilterConfig, ...] = ()
    """Applied in order after the voxel bounds; the release record counts what each removed."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.name is not None:
            check_field("name", check_release_name, self.name)
        try:
            self.split
        except ValueError as err:
            raise ConfigFieldError("test_percent", str(err)) from None
        if self.max_voxels is not None and self.min_voxels > self.max_voxels:
            raise ConfigFieldError("min_voxels", f"{self.min_voxels} is above max_voxels {self.max_voxels}")


    @property
    def split(self) -> SplitRule:
        return SplitRule(test_percent=self.test_percent, val_percent=self.val_percent)


@dataclasses.dataclass(frozen=True)
class ExecutionConfig(FrozenConfig):
    ray_address: str | None = None
    """None: the cluster of `RAY_ADDRESS` (as `ray job submit` sets it), else a local one."""
    render_slots: PositiveInt = 1
    """`render_slot` resources a local cluster declares (cluster nodes declare their own)."""
    render_gpus: NonNegativeFloat = 0.0
    """GPU share per render actor (EEVEE shares a GPU well: 0.125 = 8 renderers per GPU)."""
    encoder_gpus: NonNegativeFloat = 0.0
    """GPU share of each encoder actor; 0 runs them on CPU."""
    encoders_per_node: PositiveInt = 1
    """Encoder actors per node that renders `lh` sets. Measured on one H100 at paper sizes (`docs/benchmarks.md`):
    beside 12 render children (12.5 GPU-s per asset) one actor needs 11.8 s per asset (8 of them sampling Z_s),
    only just keeping up, and works a backlog off alone at the end (a 99 s tail on 25 assets). Two per GPU cut
    the tail to 27 s and the build from 451 to 407 s, the renders running 8 % slower beside them: two suit
    builds of hundreds of assets per GPU; in a long steady build one may be cheaper, if it keeps up."""
    max_in_flight: PositiveInt = 8
    """Assets between render and commit at any time."""
    commit_every: PositiveInt = 64
    """Results per registry commit (each commit is an Iceberg snapshot); 1 commits each result as it arrives."""
    commit_interval_s: PositiveFloat = 30.0
    """Commit what has arrived at least this often."""
    render_timeout_s: PositiveFloat = 600.0
    allow_software_gl: bool = False
    gpu_backend: GpuBackend = "opengl"
    scratch_dir: LocalPath | None = None
    """Node-local folder for transient renders (default `<data_root>/scratch`, which on a cluster is the shared
    volume: set a node-local path there, as `infra/cluster/rayjob.yaml` does; `<tmp>/near-scratch` when the
    data root is a URL)."""
    keep_renders: bool = False


@dataclasses.dataclass(frozen=True)
class ModelsConfig(FrozenConfig):
    """The `models:` section: local paths (relative to the YAML file) or hub ids."""

    dinov2: ModelReference = DEFAULT_DINOV2
    slat_encoder: ModelReference = DEFAULT_SLAT_ENCODER
    slat_flow: ModelReference = DEFAULT_SLAT_FLOW
    precision: Precision = "auto"
    """DINOv2's dtype: `auto` is bfloat16 where encoders get GPUs (`execution.encoder_gpus`), else float32. The
    resolved dtype and device enter the encoder steps' keys."""


CATALOG_URI_ENV_VAR = "NEAR_CATALOG_URI"
"""Where a build and `near catalog` find the catalog URI when no config or option names one."""


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    data_root: Location
    """A local folder, or an object-store URL (`s3://bucket/prefix`) with `catalog_uri` naming a database."""
    source: SourceConfig = SourceConfig()
    recipes: dict[RecipeName, RecipeConfig] = dataclasses.field(
        default_factory=lambda: {name: recipe_config(name) for name in RECIPE_NAMES}
    )
    """A recipe's keys in YAML override that recipe's defaults."""
    models: ModelsConfig = ModelsConfig()
    shaded: ShadedSlatConfig = dataclasses.field(default_factory=ShadedSlatConfig)
    release: ReleaseConfig = ReleaseConfig()
    execution: ExecutionConfig = ExecutionConfig()
    catalog_uri: str | None = dataclasses.field(default_factory=lambda: os.environ.get(CATALOG_URI_ENV_VAR))
    """SQLAlchemy URI of the catalog; default: $NEAR_CATALOG_URI (as `near catalog` reads it; a cluster passes it
    from a Secret), else SQLite beside the data."""

    @classmethod
    def from_yaml(cls, path: str | Path) -> "BuildConfig":
        return load_config_file(cls, path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base: Path = Path(".")) -> "BuildConfig":
        """Relative paths in `data` are relative to `base`."""
        return load_config(cls, data, base=base)

    @property
    def dinov2(self) -> str:
        return self.models.dinov2

    @property
    def slat_encoder(self) -> str:
        return self.models.slat_encoder

    @property
    def slat_flow(self) -> str:
        return self.models.slat_flow

    @property
    def root(self) -> RootPath:
        """`data_root` as a path object (`catalogs.storage`)."""
        return root_path(self.data_root)

    @property
    def scratch_dir(self) -> Path:
        if self.execution.scratch_dir:
            return Path(self.execution.scratch_dir)
        return self.root / "scratch" if is_local(self.root) else Path(tempfile.gettempdir()) / "near-scratch"

    def local_default(self, folder: str | None, name: str) -> Path:
        """`folder`, else `<data_root>/<name>`, which must then be local (render nodes open source files)."""
        if folder:
            return Path(folder)
        if not is_local(self.root):
            raise ConfigError(f"source.path is required when data_root is a URL ({self.data_root}): source "
                              f"assets are files every render node opens")
        return self.root / name
