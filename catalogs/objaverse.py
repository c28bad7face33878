"""The Objaverse-XL source, through the `objaverse` package's own functions (pinned 0.1.7: later git heads break
on import, rendering_at_scale.md section 1).

    annotations (oxl.get_annotations: one parquet per source, cached in the download dir)
      -> select (sources, file types, licenses, an optional list of fileIdentifiers or sha256s, a limit)
      -> download (oxl.download_objects; GitHub repos are kept as zip archives)
      -> materialize (an archived file is extracted safely: no path escapes, a size limit on all one asset
         extracts, its glTF buffers and images beside it) -> `sources` rows (asset_id = fileIdentifier,
         source_id = sha256 of the bytes)

An object that cannot be extracted raises an `ArchiveError` whose `reason` ingest records: one bad archive
never stops an ingest.

Annotation sha256s are the objaverse-xl crawl's; the registered `source_id` is always recomputed from the
bytes we have, and a mismatch is recorded in `attrs_json`.
"""

import dataclasses
import hashlib
import json
import os
import posixpath
import zipfile
import zlib
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

import pandas as pd

from catalogs.keys import sha256_file
from catalogs.sources import check_asset_id
from infra.errors import FactoryError, Reason

OBJAVERSE_SOURCES = ("github", "sketchfab", "smithsonian", "thingiverse")
ARCHIVE_SUFFIXES = (".zip",)


class ArchiveError(FactoryError):
    """A file that is not taken out of its archive; `reason` is what ingest records."""

    reason: ClassVar[Reason]


class UnsafeArchiveMember(ArchiveError, ValueError):
    """An archive member that would land outside its folder (absolute, `..`, a symlink entry)."""

    reason = Reason.UNSAFE_ARCHIVE_MEMBER


class ArchiveTooLarge(UnsafeArchiveMember):
    """What one asset extracts (the file, and a glTF's buffers and images) is over the size limit."""

    reason = Reason.TOO_LARGE


class CorruptArchive(ArchiveError, ValueError):
    """The archive, or a member an asset needs, does not decode: not a zip (an HTML error page saved under the
    archive's name), a truncated download, a bad CRC."""

    reason = Reason.CORRUPT_ARCHIVE


class ArchiveMemberNotFound(ArchiveError, KeyError):
    """The archive holds no such member."""

    reason = Reason.MISSING_MEMBER
    __str__ = BaseException.__str__  # KeyError's would print the message quoted


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
    """A plain file as it is; a file inside an archive (`<archive>.zip/<member>`) extracted under
    `extract_dir`, with the files a glTF references beside it, into the archive's own folder
    (`_extraction_dir`)."""
    for suffix in ARCHIVE_SUFFIXES:
        archive, sep, member = path.partition(suffix + "/")
        if sep:
            archive_path = Path(archive + suffix)
            out = _extraction_dir(archive_path, Path(extract_dir))
            return extract_member(archive_path, member, out, max_bytes=max_bytes)
    return Path(path)


def _extraction_dir(archive: Path, extract_dir: Path) -> Path:
    """`<extract_dir>/<stem>-<key>`, the key a hash of the archive's path, size and mtime: the `repo.zip` of
    two organisations never share a folder, and a re-downloaded archive (a new file) is extracted afresh
    instead of being served the previous download's files.

    Raises:
        OSError: the archive cannot be stat'ed (not downloaded).
    """
    stat = archive.stat()
    identity = b"\0".join([os.fsencode(archive.resolve()), b"%d" % stat.st_size, b"%d" % stat.st_mtime_ns])
    return extract_dir / f"{archive.stem}-{hashlib.sha256(identity).hexdigest()[:16]}"


def extract_member(archive: Path, member: str, out_dir: Path, *, max_bytes: int) -> Path:
    """Extract `member` of a zip archive (and, for a .gltf, the relative files it references) under `out_dir`.
    What it extracts in all, the member and its references, is at most `max_bytes`. A failed extraction leaves
    no partial file behind; finished files are kept for the next call.

    Raises:
        UnsafeArchiveMember: a path that escapes `out_dir` (absolute, `..`, a symlink entry).
        ArchiveTooLarge: over `max_bytes` in all (checked against what is actually read, not only the
            headers).
        CorruptArchive: not a zip archive, or a member that does not decode.
        ArchiveMemberNotFound: no such member (a missing glTF reference is left for the render to report).
    """
    try:
        with zipfile.ZipFile(archive) as zf:  # members are paths in the repository (`shutil.make_archive`)
            target, used = _extract_one(zf, member, out_dir, used=0, max_bytes=max_bytes)
            if target.suffix.lower() == ".gltf":
                for name in _gltf_references(target, member):
                    try:
                        used += _extract_one(zf, name, out_dir, used=used, max_bytes=max_bytes)[1]
                    except ArchiveMemberNotFound:
                        continue  # a missing texture is the render's to report (missing_textures)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise CorruptArchive(f"{archive}: {err}") from err
    return target


def _extract_one(
    zf: zipfile.ZipFile, name: str, out_dir: Path, *, used: int, max_bytes: int
) -> tuple[Path, int]:
    """`name` extracted under `out_dir` (or found there from an earlier call) and its size; `used` bytes of
    the asset's `max_bytes` are taken already."""
    relative = posixpath.normpath(name)
    if relative.startswith(("/", "../")) or relative == "..":
        raise UnsafeArchiveMember(f"{zf.filename}: {name!r} would land outside {out_dir}")
    try:
        info = zf.getinfo(name)
    except KeyError as err:
        raise ArchiveMemberNotFound(f"{zf.filename} holds no member {name!r}") from err
    if (info.external_attr >> 16) & 0o170000 == 0o120000:
        raise UnsafeArchiveMember(f"{zf.filename}: {name!r} is a symlink")
    too_large = (
        f"{zf.filename}: {name!r} takes the asset over the {max_bytes}-byte limit ({used} bytes before it)"
    )
    if used + info.file_size > max_bytes:
        raise ArchiveTooLarge(too_large)
    target = (out_dir / relative).resolve()
    if not target.is_relative_to(out_dir.resolve()):
        raise UnsafeArchiveMember(f"{zf.filename}: {name!r} would land outside {out_dir}")
    if target.exists():
        size = target.stat().st_size
        if used + size > max_bytes:
            raise ArchiveTooLarge(too_large)
        return target, size
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    copied = 0
    try:
        with zf.open(info) as source, open(partial, "wb") as sink:
            while chunk := source.read(1 << 20):
                copied += len(chunk)
                if used + copied > max_bytes:
                    raise ArchiveTooLarge(too_large + ": it inflates past its header's size")
                sink.write(chunk)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)  # only still there when the copy failed
    return target, copied


def _gltf_references(gltf: Path, member: str) -> list[str]:
    """The archive members a glTF's buffer and image URIs name, each once. URIs are URI-references (glTF 2.0,
    section 3.3): their percent-encoding is decoded before they resolve against the glTF's folder; `data:` and
    absolute URIs name no member."""
    try:
        document = json.loads(gltf.read_text())
    except (ValueError, RecursionError):  # not UTF-8 JSON, or nested too deep to read: the import will say
        return []
    if not isinstance(document, dict):
        return []
    uris = [
        item["uri"]
        for key in ("buffers", "images")
        if isinstance(document.get(key), list)
        for item in document[key]
        if isinstance(item, dict) and isinstance(item.get("uri"), str)
    ]
    names: dict[str, None] = {}
    for uri in uris:
        try:
            parts = urlsplit(uri)
        except ValueError:  # not a URI-reference (an unbalanced `[` in an authority)
            continue
        if not parts.scheme and not parts.netloc:
            names[posixpath.normpath(posixpath.join(posixpath.dirname(member), unquote(parts.path)))] = None
    names.pop(posixpath.normpath(member), None)
    return list(names)


def source_row(record: dict[str, Any], path: Path) -> dict[str, Any]:
    """The `sources` row of one annotated object whose file is `path`; the sha256 is recomputed from the
    bytes.

    Raises:
        InvalidAssetId: the fileIdentifier is not one line of UTF-8 text.
        OSError: the file cannot be read.
    """
    asset_id = check_asset_id(record["fileIdentifier"])
    digest = sha256_file(path)
    attrs = {"metadata": record.get("metadata"), "annotation_sha256": record["sha256"]}
    if digest != record["sha256"]:
        attrs["modified"] = True  # the file changed since the crawl (objaverse-xl's handle_modified_object)
    return {
        "asset_id": asset_id,
        "source_id": digest,
        "uri": str(path),
        "size": path.stat().st_size,
        "kind": str(record["fileType"]).lower(),
        "origin": f"objaverse-xl:{record['source']}",
        "license": record.get("license"),
        "attrs_json": json.dumps(attrs, default=str, sort_keys=True),
    }
