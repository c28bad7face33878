"""Write-once Zarr v3 packs: one per executed batch, ragged per-asset tensors as concatenated rows.

    <data_root>/packs/<step>/<spec_hash[:16]>/<pack_id>/
      zarr.json                    attrs: format, step, spec_hash, run_id, created_at, artifact_keys
      <array>                      (sum of rows, *row_shape), e.g. latents (sum N, 8), coords (sum N, 3),
                                   features (sum N, 1024), images (sum V, H, W, 4)
      offsets/<array>              int64 (assets + 1,): asset i owns rows offsets[i]:offsets[i + 1]

In a local root a pack is written under `.tmp-<pack_id>`, flushed, then renamed, so a pack directory is
complete or absent. An object store has no rename: there a pack is written in place under its fresh id, and
only the registry commit that follows makes it visible (readers follow committed pack paths alone). Either
way, a pack no committed registry row names is garbage for `gc`. Nothing in a pack is ever rewritten.
Chunks hold about 1 MiB of whole rows (one image per chunk for image stacks) and shards about 64 MiB, so
one asset's read touches only its own chunks.

Reads never see fill values for lost bytes (zarr's default for a missing chunk). Packs of format `near-pack/2`
write every chunk, even an all-zero one, and checksum every chunk and shard index (`_compressors`), so a read
goes through a strict store that refuses an absent, empty or short chunk, and a damaged one fails its checksum:
either way `DamagedPackError` names the pack, the array and the sample. Packs of `near-pack/1` may omit all-zero
chunks and have no checksums: their reads are always checked against the content digest instead.
"""

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import zarr
from zarr.abc.store import ByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from catalogs.errors import DamagedPackError
from catalogs.storage import RootPath, fsync_dir, is_local, root_path, zarr_store

PACK_FORMAT = "near-pack/2"
UNCHECKED_FORMATS = ("near-pack/1",)
"""Pack formats without chunk checksums that may omit all-zero chunks: reads verify the content digest."""
CHUNK_BYTES = 1 << 20
SHARD_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class ArraySlice:
    """Where one asset's rows of one array live in its pack."""

    name: str
    row_start: int
    row_count: int
    row_shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict:
        return {"name": self.name, "row_start": self.row_start, "row_count": self.row_count,
                "shape": list(self.row_shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ArraySlice":
        return cls(d["name"], int(d["row_start"]), int(d["row_count"]), tuple(int(x) for x in d["shape"]), d["dtype"])


@dataclasses.dataclass(frozen=True)
class PackedAsset:
    """One asset's output as written: its pack (relative to the data root), array slices and digest."""

    artifact_key: str
    pack_path: str
    arrays: tuple[ArraySlice, ...]
    content_digest: str


def content_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """BLAKE2b-128 over (name, dtype, shape, C-order bytes) of every array, in name order."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.data)
    return h.hexdigest()


def pack_dir(step: str, spec_hash: str, pack_id: str) -> str:
    return f"packs/{step}/{spec_hash[:16]}/{pack_id}"


def write_pack(
    data_root: str | os.PathLike[str],
    step: str,
    spec_hash: str,
    run_id: str,
    outputs: Sequence[tuple[str, Mapping[str, np.ndarray]]],
) -> list[PackedAsset]:
    """Write one pack holding `outputs` = [(artifact_key, {array name: (rows, *row_shape)})] and return where
    each asset landed. All assets must have the same array names, row shapes and dtypes."""
    if not outputs:
        raise ValueError("a pack needs at least one asset")
    names = sorted(outputs[0][1])
    layout = {name: (outputs[0][1][name].shape[1:], np.asarray(outputs[0][1][name]).dtype) for name in names}
    for key, arrays in outputs:
        if sorted(arrays) != names:
            raise ValueError(f"asset {key}: arrays {sorted(arrays)} differ from the pack's {names}")
        for name, array in arrays.items():
            if (array.shape[1:], array.dtype) != layout[name]:
                raise ValueError(f"asset {key}: {name} is {array.dtype}{array.shape[1:]} per row, "
                                 f"the pack's is {layout[name][1]}{layout[name][0]}")

    pack_id = uuid.uuid4().hex
    relative = pack_dir(step, spec_hash, pack_id)
    final = root_path(data_root) / relative
    folder = final.with_name(f".tmp-{pack_id}") if is_local(final) else final
    folder.parent.mkdir(parents=True, exist_ok=True)
    root = zarr.open_group(zarr_store(folder, read_only=False), mode="w-", zarr_format=3)
    root.attrs.update({
        "format": PACK_FORMAT, "step": step, "spec_hash": spec_hash, "run_id": run_id,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "artifact_keys": [key for key, _ in outputs],
    })
    offsets = {}
    for name in names:
        parts = [np.asarray(arrays[name]) for _, arrays in outputs]
        counts = np.array([len(p) for p in parts], dtype=np.int64)
        offsets[name] = np.concatenate([[0], np.cumsum(counts)])
        _write_array(root, name, np.concatenate(parts, axis=0))
        root.create_array(f"offsets/{name}", data=offsets[name], chunks=(len(offsets[name]),),
                          compressors=_compressors(offsets[name].dtype), config=_EVERY_CHUNK)
    if is_local(final):
        _fsync_tree(folder)
        os.rename(folder, final)
        fsync_dir(final.parent)

    packed = []
    for i, (key, arrays) in enumerate(outputs):
        slices = tuple(
            ArraySlice(name, int(offsets[name][i]), int(offsets[name][i + 1] - offsets[name][i]),
                       tuple(int(x) for x in layout[name][0]), layout[name][1].str)
            for name in names
        )
        packed.append(PackedAsset(key, relative, slices, content_digest(arrays)))
    return packed


def _write_array(root: zarr.Group, name: str, data: np.ndarray) -> None:
    row_bytes = max(1, int(np.prod(data.shape[1:], dtype=np.int64)) * data.dtype.itemsize)
    chunk_rows = max(1, min(CHUNK_BYTES // row_bytes, len(data)))
    shard_rows = chunk_rows * max(1, min(SHARD_BYTES // (chunk_rows * row_bytes), -(-len(data) // chunk_rows)))
    root.create_array(
        name, data=data, chunks=(chunk_rows, *data.shape[1:]), shards=(shard_rows, *data.shape[1:]) if len(data) else None,
        compressors=_compressors(data.dtype), config=_EVERY_CHUNK,
    )


_EVERY_CHUNK = {"write_empty_chunks": True}
"""An all-zero chunk is written like any other, so a chunk absent on disk is always damage."""


def _compressors(dtype: np.dtype) -> tuple:
    """zstd everywhere; byte-shuffle for floats (exponent bytes compress together), bit-shuffle for small ints,
    plain zstd for 8-bit images (shuffling one-byte values does nothing). Every chunk is checksummed: plain zstd
    frames carry zstd's own content checksum, checked while decompressing (a third of the cost of a CRC-32C pass
    over a 16-light stack); blosc has none, so its chunks end with a CRC-32C."""
    if dtype.itemsize == 1:
        return (ZstdCodec(level=3, checksum=True),)
    shuffle = BloscShuffle.shuffle if dtype.kind == "f" else BloscShuffle.bitshuffle
    return BloscCodec(cname="zstd", clevel=3, shuffle=shuffle, typesize=dtype.itemsize), Crc32cCodec()


class _StrictStore(WrapperStore[Store]):
    """A read-only pack store that raises where zarr would substitute fill values: a key that is absent, or a
    byte range that comes back short (a truncated file)."""

    def __init__(self, store: Store, pack_path: str) -> None:
        super().__init__(store)
        self.pack_path = pack_path

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        return self._checked(key, byte_range, await self._store.get(key, prototype, byte_range))

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        found = await self._store.get_partial_values(prototype, key_ranges)
        return [self._checked(key, byte_range, value) for (key, byte_range), value in zip(key_ranges, found)]

    def _checked(self, key: str, byte_range: ByteRequest | None, value: Buffer | None) -> Buffer:
        array = key.split("/c/")[0].removesuffix("/zarr.json")
        if value is None:
            raise DamagedPackError(self.pack_path, array, f"{key} is missing")
        if isinstance(byte_range, RangeByteRequest):
            expected = byte_range.end - byte_range.start
        elif isinstance(byte_range, SuffixByteRequest):
            expected = byte_range.suffix
        elif not len(value):  # a whole chunk or document is never empty
            raise DamagedPackError(self.pack_path, array, f"{key} is empty")
        else:
            expected = len(value)
        if len(value) != expected:
            raise DamagedPackError(self.pack_path, array, f"{key} is truncated ({len(value)} of {expected} bytes)")
        return value


class PackReader:
    """One pack opened for reading; its arrays open lazily and stay open.

    Raises (from every method):
        DamagedPackError: the pack, its metadata or a chunk a read needs is missing, truncated or undecodable.
    """

    def __init__(self, data_root: str | os.PathLike[str], pack_path: str) -> None:
        self.pack_path = pack_path
        folder = root_path(data_root) / pack_path
        if not folder.is_dir():
            raise DamagedPackError(pack_path, "", "the pack folder is missing")
        with _naming_damage(pack_path, ""):
            self.format = json.loads((folder / "zarr.json").read_bytes())["attributes"]["format"]
        self.is_checked = self.format not in UNCHECKED_FORMATS
        """Chunks carry checksums and are all present; else reads must check the content digest."""
        store = zarr_store(folder, read_only=True)
        self._store = _StrictStore(store, pack_path) if self.is_checked else store
        self._arrays: dict[str, zarr.Array] = {}

    def read(self, arrays: Sequence[ArraySlice], *, where: str = "", digest: str | None = None) -> dict[str, np.ndarray]:
        """One asset's arrays, one slice each. With `digest` (required for unchecked packs, whose reads could
        hold fill values), the arrays must be all of the asset's and hash to it."""
        if digest is None and not self.is_checked:
            raise ValueError(f"pack {self.pack_path} ({self.format}) has no chunk checksums: pass the content digest")
        out = {a.name: self.rows(a, slice(a.row_start, a.row_start + a.row_count), where=where) for a in arrays}
        if digest is not None and content_digest(out) != digest:
            raise DamagedPackError(self.pack_path, "", "content digest mismatch: these are not the bytes committed", where)
        return out

    def read_names(self, arrays: Sequence[ArraySlice], names: Sequence[str] | None, *, digest: str,
                   where: str = "", verify: bool = False) -> dict[str, np.ndarray]:
        """The arrays in `names` (all when None) of one asset, every chunk checked. The content digest is
        checked when `verify`, and always for packs without chunk checksums, which are then read whole."""
        verify = verify or not self.is_checked
        chosen = arrays if names is None or verify else [a for a in arrays if a.name in names]
        out = self.read(chosen, where=where, digest=digest if verify else None)
        return out if names is None else {name: out[name] for name in names if name in out}

    def rows(self, item: ArraySlice, rows: slice | int, *, where: str = "") -> np.ndarray:
        """Rows of one array, by row number in the pack (checksums only: see `read` for unchecked packs)."""
        with _naming_damage(self.pack_path, item.name, where):
            if item.name not in self._arrays:
                self._arrays[item.name] = zarr.open_array(self._store, path=item.name, mode="r", zarr_format=3)
            return self._arrays[item.name][rows]


@contextlib.contextmanager
def _naming_damage(pack_path: str, array: str, where: str = "") -> Iterator[None]:
    """Whatever zarr raises on bad bytes (a missing key, a codec or checksum error, broken JSON) becomes a
    DamagedPackError that names the pack, the array and the sample."""
    try:
        yield
    except DamagedPackError as err:
        raise DamagedPackError(err.pack_path, err.array or array, err.detail, where) from None
    except Exception as err:  # re-raised, typed: zarr's codecs raise ValueError, RuntimeError, OSError, ...
        raise DamagedPackError(pack_path, array, f"{type(err).__name__}: {err}", where) from err


def read_asset(
    data_root: str | os.PathLike[str], pack_path: str, arrays: Sequence[ArraySlice], *, digest: str | None = None,
    where: str = "",
) -> dict[str, np.ndarray]:
    """One asset's arrays from its pack (`PackReader.read`)."""
    return PackReader(data_root, pack_path).read(arrays, where=where, digest=digest)


def _fsync_tree(folder: RootPath) -> None:
    for dirpath, _, files in os.walk(folder):
        for file in files:
            fd = os.open(os.path.join(dirpath, file), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)
