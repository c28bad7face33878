"""Ingest: find the configured source's assets and register the revisions the catalog has not seen.

demo          the generated demo assets (made once, in the render env)
local         a folder (glob; symlinks never followed out of it)
objaverse-xl  annotations -> selection -> download -> safe extraction (`catalogs.objaverse`)

An entry that cannot be an asset (an unreadable file, a name that is no asset id, a corrupt or unsafe
archive) is skipped and returned with its reason (`catalogs.sources.SkippedSource`): one bad entry never stops
an ingest.
"""

import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa

from catalogs import objaverse
from catalogs.keys import ENV_MAP_KIND
from catalogs.sources import SOURCE_ROW_SCHEMA, InvalidAssetId, SkippedSource, file_rows
from catalogs.tables import FactoryCatalog
from infra.errors import ConfigError, Reason
from pipelines.build_config import BuildConfig, SourceConfig
from pipelines.demo import generate_demo_assets
from pipelines.steps import EnvMaps
from render_jobs.demo_assets import MANIFEST_FILE
from render_jobs.formats import find_asset_files

logger = logging.getLogger(__name__)


def find_sources(config: BuildConfig) -> tuple[pa.Table, list[SkippedSource]]:
    """`catalogs.sources.SOURCE_ROW_SCHEMA` rows of every asset the source holds now, and the entries skipped.

    Raises:
        ConfigError: a local source whose folder is missing.
    """
    source = config.source
    if source.kind == "demo":
        folder = config.local_default(source.path, "demo-assets")
        if not (folder / MANIFEST_FILE).exists():
            generate_demo_assets(folder, seed=source.seed)
        rows, skipped = file_rows(folder, find_asset_files([folder]), origin=f"demo:seed={source.seed}")
    elif source.kind == "local":
        folder = Path(source.path)
        if not folder.is_dir():
            raise ConfigError(f"source.path must be a folder, got {source.path!r}")
        matched = set(folder.glob(source.pattern))  # asset files (no symlink out of the folder) that match
        files = [path for path in find_asset_files([folder]) if path in matched]
        rows, skipped = file_rows(folder, files, origin=f"local:{source.path}")
    else:
        rows, skipped = objaverse_sources(source, config.local_default(source.path, "objaverse"))
    for entry in skipped:
        logger.warning(
            "source entry skipped entry=%s reason=%s: %s", entry.entry, entry.reason.value, entry.message
        )
    return rows, skipped


def objaverse_sources(source: SourceConfig, download_dir: Path) -> tuple[pa.Table, list[SkippedSource]]:
    """Objaverse-XL objects the selection keeps, downloaded (network) and extracted into `download_dir`."""
    selection = objaverse.ObjaverseSelection(
        sources=source.objaverse_sources,
        file_types=source.file_types,
        licenses=source.licenses,
        ids=objaverse.load_ids(source.ids_file) if source.ids_file else None,
        limit=source.limit,
    )
    objects = objaverse.select(objaverse.load_annotations(download_dir), selection)
    downloaded = objaverse.download(objects, download_dir, processes=source.download_processes)
    return objaverse_rows(objects, downloaded, download_dir, max_bytes=source.max_file_mb << 20)


def objaverse_rows(
    objects: pd.DataFrame, downloaded: dict[str, str], download_dir: Path, *, max_bytes: int
) -> tuple[pa.Table, list[SkippedSource]]:
    """Rows for the downloaded objects, in selection order; one that cannot be extracted safely or read is
    skipped with its reason."""
    rows, skipped, extract_dir = [], [], download_dir / "extracted"
    for record in objects.to_dict("records"):
        identifier = record["fileIdentifier"]
        if identifier not in downloaded:
            continue
        try:
            path = objaverse.materialize(downloaded[identifier], extract_dir, max_bytes=max_bytes)
            rows.append(objaverse.source_row(record, path))
        except (objaverse.ArchiveError, InvalidAssetId) as err:
            skipped.append(SkippedSource(identifier, err.reason, str(err)))
        except OSError as err:
            skipped.append(SkippedSource(identifier, Reason.UNREADABLE_FILE, str(err)))
    return pa.Table.from_pylist(rows, schema=SOURCE_ROW_SCHEMA), skipped


def ingest(catalog: FactoryCatalog, config: BuildConfig, run_id: str) -> tuple[pa.Table, list[SkippedSource]]:
    """Register the revisions the catalog has not seen; return this build's assets (asset_id, source_id, uri)
    and the source entries skipped."""
    found, skipped = find_sources(config)
    return _register_new_revisions(catalog, found, run_id), skipped


def register_env_maps(catalog: FactoryCatalog, env_maps: EnvMaps, run_id: str) -> pa.Table:
    """Register the env maps the recipes draw as sources of kind `env_map` (asset id `env_map:<file name>`), so
    new bytes under a name are a new revision like an asset's; returns them as this build's sources."""
    rows = [
        {"asset_id": f"{ENV_MAP_KIND}:{name}", "source_id": digest, "uri": str(path), "size": path.stat().st_size,
         "kind": ENV_MAP_KIND, "origin": f"env_maps:{path.parent}", "license": None, "attrs_json": None}
        for name, (path, digest) in sorted(env_maps.files.items())
    ]
    return _register_new_revisions(catalog, pa.Table.from_pylist(rows, schema=SOURCE_ROW_SCHEMA), run_id)


def _register_new_revisions(catalog: FactoryCatalog, found: pa.Table, run_id: str) -> pa.Table:
    """Register the (asset_id, source_id) pairs of `found` the catalog has not seen as current; return `found` as
    this build's sources (asset_id, source_id, uri, kind)."""
    current = catalog.current_sources()
    seen = set(zip(current["asset_id"].to_pylist(), current["source_id"].to_pylist()))
    new = [pair not in seen for pair in zip(found["asset_id"].to_pylist(), found["source_id"].to_pylist())]
    if any(new):
        catalog.register_sources(found.filter(pa.array(new, pa.bool_())), run_id)
    return found.select(["asset_id", "source_id", "uri", "kind"])
