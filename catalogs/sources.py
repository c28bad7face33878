"""Local sources: files found under a folder, hashed into `sources` rows.

An asset's id is its path relative to the folder (stable across rebuilds); its `source_id` is the sha256 of its
bytes, so an edited file is a new revision of the same asset. Symlinks are never followed out of the folder.
"""

import os
from pathlib import Path

import pyarrow as pa

from catalogs.keys import sha256_file

SOURCE_ROW_SCHEMA = pa.schema(
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
"""What a source contributes to a `sources` row (the catalog adds observed_at and the ingest run)."""


def scan_folder(folder: Path, pattern: str, *, extensions: tuple[str, ...], origin: str) -> pa.Table:
    """One row per file under `folder` matching `pattern` whose extension (no dot) is in `extensions`."""
    folder = folder.resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"source folder {folder} does not exist")
    rows = []
    for path in sorted(folder.glob(pattern)):
        if not path.is_file() or path.suffix.lower().lstrip(".") not in extensions:
            continue
        if not path.resolve().is_relative_to(folder):
            continue  # a symlink out of the folder
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
    return pa.Table.from_pylist(rows, schema=SOURCE_ROW_SCHEMA) if rows else SOURCE_ROW_SCHEMA.empty_table()
