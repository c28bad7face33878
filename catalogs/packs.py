"""Write-once Zarr v3 packs: one per executed batch, ragged per-asset tensors as concatenated rows.

    <data_root>/packs/<step>/<spec_hash[:16]>/<pack_id>/
      zarr.json                    attrs: format, step, spec_hash, run_id, created_at, artifact_keys
      <array>                      (sum of rows, *row_shape), e.g. latents (sum N, 8), coords (sum N, 3),
                                   features (sum N, 1024), images (sum V, H, W, 4)
      offsets/<array>              int64 (assets + 1,): asset i owns rows offsets[i]:offsets[i + 1]

A pack is written under `.tmp-<pack_id>`, flushed, then renamed, so a pack directory is complete or absent;
one that no committed registry row names is garbage for `gc`. Nothing in a pack is ever rewritten.
Chunks hold about 1 MiB of whole rows (one image per chunk for image stacks) and shards about 64 MiB, so
one asset's read touches only its own chunks.
"""

import dataclasses
import datetime
import hashlib
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec

PACK_FORMAT = "near-pack/1"
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
    final = Path(data_root) / relative
    tmp = final.with_name(f".tmp-{pack_id}")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    root = zarr.open_group(zarr.storage.LocalStore(tmp), mode="w-")
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
        root.create_array(f"offsets/{name}", data=offsets[name], chunks=(len(offsets[name]),))
    _fsync_tree(tmp)
    os.rename(tmp, final)
    _fsync_dir(final.parent)

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
        compressors=_compressor(data.dtype),
    )


def _compressor(dtype: np.dtype):
    """zstd everywhere; byte-shuffle for floats (exponent bytes compress together), bit-shuffle for small ints,
    plain zstd for 8-bit images (shuffling one-byte values does nothing)."""
    if dtype.itemsize == 1:
        return ZstdCodec(level=3)
    shuffle = BloscShuffle.shuffle if dtype.kind == "f" else BloscShuffle.bitshuffle
    return BloscCodec(cname="zstd", clevel=3, shuffle=shuffle, typesize=dtype.itemsize)


def read_asset(data_root: str | os.PathLike[str], pack_path: str, arrays: Sequence[ArraySlice]) -> dict[str, np.ndarray]:
    """One asset's arrays: one slice per array, no offsets or metadata scan."""
    return {a.name: open_pack_array(data_root, pack_path, a.name)[a.row_start : a.row_start + a.row_count] for a in arrays}


def open_pack_array(data_root: str | os.PathLike[str], pack_path: str, name: str) -> zarr.Array:
    return zarr.open_array(zarr.storage.LocalStore(Path(data_root) / pack_path, read_only=True), path=name, mode="r")


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, files in os.walk(folder):
        for file in files:
            fd = os.open(os.path.join(dirpath, file), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
