"""Where a data root's bytes live: a local folder, or an object store named by URL (`s3://bucket/prefix`, or any
fsspec URL).

A local root is a `pathlib.Path`; a URL root is a `UPath` (universal_pathlib over fsspec), which has the same
path API, so the catalog code reads the same for both. What differs lives here: object stores have no rename
and no hard link, so a write that must not replace anything uses the store's conditional put
(`If-None-Match: *` on S3) where a local root links a finished temporary file into place.

Object-store credentials and endpoint come from the standard AWS variables (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_ENDPOINT_URL`, `AWS_REGION`), which boto (under s3fs,
for packs and releases) reads itself and `iceberg_properties` hands to pyiceberg's Arrow file IO, so every
process of a build (driver, actors, trainers) finds the store the same way: on a cluster, from a Secret.
"""

import os
import tempfile
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath
from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore

RootPath = Path | UPath
"""A path in a data root: `Path` for a local root, `UPath` for one in an object store."""


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether `location` names an object store (`s3://...`) rather than a local path (`file://` is local)."""
    scheme, sep, _ = str(location).partition("://")
    return bool(sep) and scheme != "file" and "/" not in scheme


def root_path(location: str | os.PathLike[str]) -> RootPath:
    """The path object for a data root or a file in one: a URL stays a URL, a local path becomes absolute."""
    if isinstance(location, UPath) and not isinstance(location, Path):
        return location
    text = os.fspath(location) if isinstance(location, os.PathLike) else location
    if is_url(text):
        return UPath(text)
    return Path(text.removeprefix("file://")).absolute()


def is_local(path: RootPath) -> bool:
    return isinstance(path, Path)


def filesystem(path: RootPath) -> fsspec.AbstractFileSystem:
    return fsspec.filesystem("file") if is_local(path) else path.fs


def fs_path(path: RootPath) -> str:
    """`path` as its filesystem names it (no scheme): what `filesystem(path)` and pyarrow take."""
    return str(path) if is_local(path) else path.path


def write_exclusive(path: RootPath, data: bytes) -> None:
    """Create `path` holding `data`, all or nothing, unless it exists.

    Raises:
        FileExistsError: `path` exists; of two writers racing for it, exactly one wins.
    """
    if not is_local(path):
        filesystem(path).pipe_file(fs_path(path), data, mode="create")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.link(tmp, path)
    finally:
        os.unlink(tmp)
    fsync_dir(path.parent)


def remove_tree(path: RootPath) -> None:
    filesystem(path).rm(fs_path(path), recursive=True)


def tree_stats(path: RootPath) -> tuple[float, int]:
    """(newest modification time, total bytes) of `path` and every file under it: an object store has no folder
    times, so there a folder's age is its newest file's."""
    newest, size = path.stat().st_mtime if is_local(path) else 0.0, 0
    fs = filesystem(path)
    for info in fs.find(fs_path(path), detail=True).values():  # one listing, no request per file
        size += int(info.get("size") or 0)
        modified = info.get("mtime") or info.get("LastModified")  # local / S3 listings name it differently
        newest = max(newest, modified.timestamp() if hasattr(modified, "timestamp") else float(modified or 0.0))
    return newest, size


def zarr_store(path: RootPath, *, read_only: bool) -> Store:
    """A zarr store on the folder `path` (a pack), through zarr's own local or fsspec store."""
    if is_local(path):
        return LocalStore(path, read_only=read_only)
    return FsspecStore.from_url(str(path), storage_options=dict(path.storage_options), read_only=read_only)


def iceberg_properties(location: str | os.PathLike[str]) -> dict[str, str]:
    """pyiceberg's S3 properties from the standard AWS variables, for a root in S3 (none for a local root)."""
    if not str(location).startswith(("s3://", "s3a://")):
        return {}
    names = {"s3.endpoint": "AWS_ENDPOINT_URL", "s3.access-key-id": "AWS_ACCESS_KEY_ID",
             "s3.secret-access-key": "AWS_SECRET_ACCESS_KEY", "s3.session-token": "AWS_SESSION_TOKEN"}
    properties = {key: os.environ[name] for key, name in names.items() if os.environ.get(name)}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        properties["s3.region"] = region
    return properties


def read_parquet_bytes(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """A parquet file read from memory (a manifest, fetched whole from any store). Single-threaded: with
    pyarrow 26.0.1, a threaded read from a memory buffer often aborts the process at exit."""
    return pq.read_table(pa.BufferReader(data), columns=columns, use_threads=False)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
