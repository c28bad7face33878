"""Local sources: asset files under a folder, hashed into `sources` rows.

An asset's id is its path relative to the folder (stable across rebuilds); its `source_id` is the sha256 of its
bytes, so an edited file is a new revision of the same asset.
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


def file_rows(folder: Path, files: list[Path], *, origin: str) -> pa.Table:
    """One row per file (found under `folder`); the asset id is its path relative to the folder."""
    rows = [
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
        for path in files
    ]
    return pa.Table.from_pylist(rows, schema=SOURCE_ROW_SCHEMA) if rows else SOURCE_ROW_SCHEMA.empty_table()
