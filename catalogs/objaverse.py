"""The Objaverse-XL source, through the `objaverse` package's own functions (pinned 0.1.7: later git heads break
on import, rendering_at_scale.md section 1).

    annotations (oxl.get_annotations: one parquet per source, cached in the download dir)
      -> select (sources, file types, licenses, an optional list of fileIdentifiers or sha256s, a limit)
      -> download (oxl.download_objects; GitHub repos are kept as zip archives)
      -> materialize (an archived file is extracted safely: no path escapes, a size limit, its glTF buffers
         and images beside it) -> `sources` rows (asset_id = fileIdentifier, source_id = sha256 of the bytes)

Annotation sha256s are the objaverse-xl crawl's; the registered `source_id` is always recomputed from the
bytes we have, and a mismatch is recorded in `attrs_json`.
"""

import dataclasses
import json
import os
import posixpath
import zipfile
from pathlib import Path

import pandas as pd
import pyarrow as pa

from catalogs.keys import sha256_file
from catalogs.sources import SOURCE_ROW_SCHEMA

OBJAVERSE_SOURCES = ("github", "sketchfab", "smithsonian", "thingiverse")
ARCHIVE_SUFFIXES = (".zip",)


class UnsafeArchiveMember(ValueError):
    """An archive member that would land outside its folder, or is too large."""


@dataclasses.dataclass(frozen=True)
class ObjaverseSelection:
    sources: tuple[str, ...] = OBJAVERSE_SOURCES
    file_types: tuple[str, ...] = ("glb", "gltf", "obj", "fbx", "ply", "stl", "usd", "usdz", "blend")
    """Blender 5 has no Collada importer (`dae`); `abc` carries no materials."""
    licenses: tuple[str, ...] | None = None
    """Keep only these license strings (as the annotations spell them); None keeps every license."""
    ids: tuple[str, ...] | None = None
    """fileIdentifiers or sha256s to keep (for example a curated 87K list); None keeps every object."""
    limit: int | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.sources) - set(OBJAVERSE_SOURCES))
        if unknown:
            raise ValueError(f"unknown objaverse-xl sources {unknown}; sources are {OBJAVERSE_SOURCES}")


def load_ids(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """One fileIdentifier or sha256 per line; blank lines and `#` comments are skipped."""
    lines = Path(path).read_text().splitlines()
    return tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))


def load_annotations(download_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Every source's annotations (fileIdentifier, source, license, fileType, sha256, metadata); the parquet files
    are downloaded once into `download_dir` and read from there afterwards."""
    import objaverse.xl as oxl  # heavy (pandas, requests, loguru), and only this source needs it

    return oxl.get_annotations(download_dir=str(download_dir))


def select(annotations: pd.DataFrame, selection: ObjaverseSelection) -> pd.DataFrame:
    """The annotation rows the selection keeps, one per sha256 (the first fileIdentifier of duplicated content)."""
    keep = annotations["source"].isin(selection.sources)
    keep &= annotations["fileType"].str.lower().isin(selection.file_types)
    if selection.licenses is not None:
        keep &= annotations["license"].isin(selection.licenses)
    if selection.ids is not None:
        ids = set(selection.ids)
        keep &= annotations["fileIdentifier"].isin(ids) | annotations["sha256"].isin(ids)
    chosen = annotations[keep].drop_duplicates("sha256").sort_values("fileIdentifier", kind="stable")
    return chosen.head(selection.limit) if selection.limit is not None else chosen


def download(
    objects: pd.DataFrame, download_dir: str | os.PathLike[str], *, processes: int
) -> dict[str, str]:
    """fileIdentifier -> local path, through `oxl.download_objects` (needs the network). A GitHub object's path
    points into its repository's zip archive: `<repo>.zip/<path in the repo>`; see `materialize`."""
    import objaverse.xl as oxl

    return oxl.download_objects(
        objects, download_dir=str(download_dir), processes=processes, save_repo_format="zip"
    )


def materialize(path: str, extract_dir: str | os.PathLike[str], *, max_bytes: int) -> Path:
    """A plain file as it is; a file inside an archive (`<archive>.zip/<member>`) extracted under `extract_dir`
    (once), with the files a glTF references beside it."""
    for suffix in ARCHIVE_SUFFIXES:
        archive, sep, member = path.partition(suffix + "/")
        if sep:
            archive_path = Path(archive + suffix)
            out = Path(extract_dir) / archive_path.stem
            return extract_member(archive_path, member, out, max_bytes=max_bytes)
    return Path(path)


def extract_member(archive: Path, member: str, out_dir: Path, *, max_bytes: int) -> Path:
    """Extract `member` of a zip archive (and, for a .gltf, the relative files it references) under `out_dir`.

    Raises:
        UnsafeArchiveMember: a path that escapes `out_dir` (absolute, `..`, a symlink entry) or a file over
            `max_bytes` (checked against what is actually read, not only the header).
        KeyError: no such member.
    """
    with zipfile.ZipFile(archive) as zf:  # members are paths in the repository (`shutil.make_archive`)
        target = _extract_one(zf, member, out_dir, max_bytes)
        if target.suffix.lower() == ".gltf":
            for uri in _gltf_relative_uris(target):
                try:
                    _extract_one(
                        zf,
                        posixpath.normpath(posixpath.join(posixpath.dirname(member), uri)),
                        out_dir,
                        max_bytes,
                    )
                except KeyError:
                    continue  # a missing texture is the render's to report (missing_textures)
    return target


def _extract_one(zf: zipfile.ZipFile, name: str, out_dir: Path, max_bytes: int) -> Path:
    relative = posixpath.normpath(name)
    if relative.startswith(("/", "../")) or relative == "..":
        raise UnsafeArchiveMember(f"{name!r} would land outside {out_dir}")
    info = zf.getinfo(name)
    if (info.external_attr >> 16) & 0o170000 == 0o120000:
        raise UnsafeArchiveMember(f"{name!r} is a symlink")
    if info.file_size > max_bytes:
        raise UnsafeArchiveMember(f"{name!r} is {info.file_size} bytes, over the {max_bytes}-byte limit")
    target = (out_dir / relative).resolve()
    if not target.is_relative_to(out_dir.resolve()):
        raise UnsafeArchiveMember(f"{name!r} would land outside {out_dir}")
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    with zf.open(info) as source, open(partial, "wb") as sink:
        copied = 0
        while chunk := source.read(1 << 20):
            copied += len(chunk)
            if copied > max_bytes:
                sink.close()
                partial.unlink()
                raise UnsafeArchiveMember(f"{name!r} inflates past the {max_bytes}-byte limit")
            sink.write(chunk)
    partial.replace(target)
    return target


def _gltf_relative_uris(path: Path) -> list[str]:
    try:
        document = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return []
    uris = [item.get("uri") for key in ("buffers", "images") for item in document.get(key, [])]
    return [u for u in uris if isinstance(u, str) and not u.startswith("data:") and "://" not in u]


def source_rows(objects: pd.DataFrame, local: dict[str, Path]) -> pa.Table:
    """`sources` rows for the objects that have a local file: the sha256 is recomputed from the bytes."""
    rows = []
    for record in objects.to_dict("records"):
        path = local.get(record["fileIdentifier"])
        if path is None:
            continue
        digest = sha256_file(path)
        attrs = {"metadata": record.get("metadata"), "annotation_sha256": record["sha256"]}
        if digest != record["sha256"]:
            attrs["modified"] = (
                True  # the file changed since the crawl (objaverse-xl's handle_modified_object)
            )
        rows.append(
            {
                "asset_id": record["fileIdentifier"],
                "source_id": digest,
                "uri": str(path),
                "size": path.stat().st_size,
                "kind": str(record["fileType"]).lower(),
                "origin": f"objaverse-xl:{record['source']}",
                "license": record.get("license"),
                "attrs_json": json.dumps(attrs, default=str, sort_keys=True),
            }
        )
    return pa.Table.from_pylist(rows, schema=SOURCE_ROW_SCHEMA) if rows else SOURCE_ROW_SCHEMA.empty_table()
