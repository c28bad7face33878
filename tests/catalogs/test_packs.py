"""Write-once Zarr packs: ragged rows round-trip, one-asset reads, digests, clear errors."""

import numpy as np
import pytest

from catalogs.packs import content_digest, read_asset, write_pack


def test_ragged_assets_round_trip_and_read_one_slice_each(tmp_path):
    rng = np.random.default_rng(0)
    outputs = [(f"key{i}", {"feats": rng.normal(size=(n, 8)).astype(np.float32),
                            "coords": rng.integers(0, 64, (n, 3), dtype=np.uint8),
                            "images": rng.integers(0, 255, (16, 32, 32, 4), dtype=np.uint8)}) for i, n in enumerate([7, 0, 1500])]
    packed = write_pack(tmp_path, "slat_lh", "c" * 64, "run-1", outputs)
    assert {p.pack_path for p in packed} == {packed[0].pack_path}
    assert packed[0].pack_path.startswith("packs/slat_lh/cccccccccccccccc/")
    assert not list((tmp_path / "packs/slat_lh/cccccccccccccccc").glob(".tmp-*"))
    for p, (key, arrays) in zip(packed, outputs):
        assert p.artifact_key == key
        got = read_asset(tmp_path, p.pack_path, p.arrays)
        for name, array in arrays.items():
            np.testing.assert_array_equal(got[name], array)
        assert content_digest(got) == p.content_digest
    feats = {a.name: a for a in packed[2].arrays}["feats"]
    assert (feats.row_start, feats.row_count, feats.row_shape, feats.dtype) == (7, 1500, (8,), "<f4")


def test_digest_sees_one_changed_value_and_layout_changes():
    a = {"feats": np.zeros((3, 8), np.float32)}
    b = {"feats": a["feats"].copy()}
    b["feats"][2, 7] = 1e-7
    assert content_digest(a) != content_digest(b)
    assert content_digest(a) != content_digest({"feats": np.zeros((8, 3), np.float32)})
    assert content_digest(a) != content_digest({"feats": np.zeros((3, 8), np.float16)})


def test_inconsistent_batches_are_refused(tmp_path):
    with pytest.raises(ValueError, match="differ from the pack"):
        write_pack(tmp_path, "s", "c" * 64, "r", [("a", {"x": np.zeros((1, 2))}), ("b", {"y": np.zeros((1, 2))})])
    with pytest.raises(ValueError, match="per row"):
        write_pack(tmp_path, "s", "c" * 64, "r", [("a", {"x": np.zeros((1, 2))}), ("b", {"x": np.zeros((1, 3))})])
    with pytest.raises(ValueError, match="at least one"):
        write_pack(tmp_path, "s", "c" * 64, "r", [])
