"""Sources of assets: files found, hashed and registered in the catalog's `sources` table.

An asset's id is its path relative to the source folder (stable across rebuilds); its `source_id` is the
sha256 of its bytes, so an edited file is a new revision of the same asset and a copied file is the same
content under another id.
"""

import os
from pathlib import Path

import pyarrow as pa

from catalogs.keys import sha256_file
from catalogs.tables import FactoryCatalog
from pipelines.build_config import BuildConfig
from pipelines.demo import generate_demo_assets
from render_jobs.demo_assets import MANIFEST_FILE
from render_jobs.formats import ASSET_EXTENSIONS


def scan_folder(folder: Path, pattern: str, *, kind: str, origin: str) -> pa.Table:
    """One `sources` row per supported file under `folder`; symlinks pointing out of the folder are skipped."""
    folder = folder.resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"source folder {folder} does not exist")
    rows = []
    for path in sorted(folder.glob(pattern)):
        if not path.is_file() or path.suffix.lower().lstrip(".") not in ASSET_EXTENSIONS:
            continue
        if not path.resolve().is_relative_to(folder):
            continue  # a symlink out of the folder: never followed
        rows.append(
            {
                "asset_id": path.relative_to(folder).as_posix(),
                "source_id": sha256_file(path),
                "uri": str(path),
                "size": os.path.getsize(path),
                "kind": path.suffix.lower().lstrip("."),
                "origin": origin,
                "license": None,
                "attrs_json": None,
            }
        )
    return pa.Table.from_pylist(rows, schema=_ROW_SCHEMA) if rows else _ROW_SCHEMA.empty_table()


def ingest(catalog: FactoryCatalog, config: BuildConfig, run_id: str) -> pa.Table:
    """Find the configured source's files, register revisions the catalog has not seen, return them all."""
    source = config.source
    if source.kind == "demo":
        folder = Path(source.path or config.data_root / "demo-assets")
        if not (folder / MANIFEST_FILE).exists():
            generate_demo_assets(folder, seed=source.seed)
        found = scan_folder(folder, "*", kind="demo", origin=f"demo:seed={source.seed}")
    else:
        if source.path is None:
            raise ValueError("a local source needs a path")
        found = scan_folder(Path(source.path), source.pattern, kind="local", origin=f"local:{source.path}")
    current = catalog.current_sources()
    seen = set(zip(current["asset_id"].to_pylist(), current["source_id"].to_pylist()))
    new = [(a, s) not in seen for a, s in zip(found["asset_id"].to_pylist(), found["source_id"].to_pylist())]
    if any(new):
        catalog.register_sources(found.filter(pa.array(new)), run_id)
    return found.select(["asset_id", "source_id", "uri"])


_ROW_SCHEMA = pa.schema(
    [
        ("asset_id", pa.string()),
        ("source_id", pa.string()),
        ("uri", pa.string()),
        ("size", pa.int64()),
        ("kind", pa.string()),
        ("origin", pa.string()),
        ("license", pa.string()),
        ("attrs_json", pa.string()),
    ]
)
