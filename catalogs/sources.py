"""Local sources: asset files under a folder, hashed into `sources` rows.

An asset's id is its path relative to the folder (stable across rebuilds); its `source_id` is the sha256 of its
bytes, so an edited file is a new revision of the same asset. An entry that cannot be an asset (a name that is
not one line of UTF-8 text, a file that cannot be read) is skipped with its reason, as data (`SkippedSource`).
"""

import dataclasses
import os
import unicodedata
from pathlib import Path

import pyarrow as pa

from catalogs.keys import sha256_file
from infra.errors import FactoryError, Reason

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

_NOT_ONE_LINE = frozenset({"Cc", "Cs", "Zl", "Zp"})
"""Unicode categories an asset id may not hold: controls (newline, tab, ...), surrogates (how Python spells
the bytes of a file name that are not UTF-8), line and paragraph separators."""


class InvalidAssetId(FactoryError, ValueError):
    """A name that cannot be an asset id: not UTF-8, or not one line of text (ids are keys, log fields, report
    cells and folder names)."""

    reason = Reason.INVALID_NAME


@dataclasses.dataclass(frozen=True)
class SkippedSource:
    """An entry of a source that ingest did not take, and why; reported with the build."""

    entry: str
    """The path under the source folder (bytes that are not UTF-8 as `\\xff` escapes), or the source's own
    identifier (an objaverse-xl fileIdentifier)."""
    reason: Reason
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"entry": self.entry, "reason": self.reason.value, "message": self.message}


def check_asset_id(asset_id: str) -> str:
    """`asset_id` if it is one non-empty line of UTF-8 text, else InvalidAssetId."""
    if not asset_id or any(unicodedata.category(c) in _NOT_ONE_LINE for c in asset_id):
        raise InvalidAssetId(
            f"{os.fsencode(asset_id)!r} is not an asset id: it must be one line of UTF-8 text"
        )
    return asset_id


def file_rows(folder: Path, files: list[Path], *, origin: str) -> tuple[pa.Table, list[SkippedSource]]:
    """One row per file (found under `folder`), its asset id the path relative to the folder; a file whose
    name is no asset id or whose bytes cannot be read is skipped."""
    rows, skipped = [], []
    for path in files:
        asset_id = path.relative_to(folder).as_posix()
        try:
            rows.append(
                {
                    "asset_id": check_asset_id(asset_id),
                    "source_id": sha256_file(path),
                    "uri": str(path),
                    "size": os.path.getsize(path),
                    "kind": path.suffix.lower().lstrip("."),
                    "origin": origin,
                    "license": None,
                    "attrs_json": None,
                }
            )
        except InvalidAssetId as err:
            entry = os.fsencode(asset_id).decode("utf-8", "backslashreplace")
            skipped.append(SkippedSource(entry, err.reason, str(err)))
        except OSError as err:
            skipped.append(SkippedSource(asset_id, Reason.UNREADABLE_FILE, str(err)))
    return pa.Table.from_pylist(rows, schema=SOURCE_ROW_SCHEMA), skipped
