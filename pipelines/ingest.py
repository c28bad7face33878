"""Ingest: find the configured source's assets and register the revisions the catalog has not seen.

demo          the generated demo assets (made once, in the render env)
local         a folder (glob; symlinks never followed out of it)
objaverse-xl  annotations -> selection -> download -> safe extraction (`catalogs.objaverse`)
"""

import logging
from pathlib import Path

import pyarrow as pa

from catalogs import objaverse
from catalogs.sources import file_rows
from catalogs.tables import FactoryCatalog
from pipelines.build_config import BuildConfig, SourceConfig
from pipelines.demo import generate_demo_assets
from render_jobs.demo_assets import MANIFEST_FILE
from render_jobs.formats import find_asset_files

logger = logging.getLogger(__name__)


def find_sources(config: BuildConfig) -> pa.Table:
    """`catalogs.sources.SOURCE_ROW_SCHEMA` rows of every asset the source holds now."""
    source = config.source
    if source.kind == "demo":
        folder = Path(source.path or config.data_root / "demo-assets")
        if not (folder / MANIFEST_FILE).exists():
            generate_demo_assets(folder, seed=source.seed)
        return file_rows(folder, find_asset_files([folder]), origin=f"demo:seed={source.seed}")
    if source.kind == "local":
        folder = Path(source.path)
        if not folder.is_dir():
            raise FileNotFoundError(f"source folder {folder} does not exist")
        matched = set(folder.glob(source.pattern))  # asset files (no symlink out of the folder) that match
        files = [path for path in find_asset_files([folder]) if path in matched]
        return file_rows(folder, files, origin=f"local:{source.path}")
    return objaverse_sources(source, Path(source.path or config.data_root / "objaverse"))


def objaverse_sources(source: SourceConfig, download_dir: Path) -> pa.Table:
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


def objaverse_rows(objects, downloaded: dict[str, str], download_dir: Path, *, max_bytes: int) -> pa.Table:
    """Rows for the downloaded objects; one that cannot be extracted safely is left out, and logged."""
    local = {}
    for identifier, path in downloaded.items():
        try:
            local[identifier] = objaverse.materialize(path, download_dir / "extracted", max_bytes=max_bytes)
        except (objaverse.UnsafeArchiveMember, KeyError, OSError) as err:
            logger.warning("objaverse-xl object %s not registered: %s", identifier, err)
    return objaverse.source_rows(objects, local)


def ingest(catalog: FactoryCatalog, config: BuildConfig, run_id: str) -> pa.Table:
    """Register the revisions the catalog has not seen; return this build's assets (asset_id, source_id, uri)."""
    found = find_sources(config)
    current = catalog.current_sources()
    seen = set(zip(current["asset_id"].to_pylist(), current["source_id"].to_pylist()))
    new = [(a, s) not in seen for a, s in zip(found["asset_id"].to_pylist(), found["source_id"].to_pylist())]
    if any(new):
        catalog.register_sources(found.filter(pa.array(new)), run_id)
    return found.select(["asset_id", "source_id", "uri"])
