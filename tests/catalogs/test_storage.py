"""Data roots in an object store (`catalogs.storage`), against a real S3 HTTP API on loopback: the same
guarantees as a local root (exclusive publication, checked reads that never return fill values) and clear
errors where an object store cannot do what a folder can."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
from upath import UPath

from catalogs.errors import CatalogError, DamagedPackError, NotADataRoot
from catalogs.packs import PackReader, write_pack
from catalogs.storage import is_url, root_path, write_exclusive
from catalogs.tables import FactoryCatalog
from infra.errors import ConfigError
from pipelines.build_config import BuildConfig


@pytest.mark.parametrize("location, url", [("s3://bucket/prefix", True), ("gs://b/p", True), ("/data/near", False),
                                           ("relative/root", False), ("file:///data/near", False)])
def test_urls_name_object_stores_and_paths_stay_local(location, url):
    assert is_url(location) == url
    assert isinstance(root_path(location), UPath if url else Path)


def test_a_build_config_keeps_a_url_root_and_its_scratch_stays_on_the_node(tmp_path):
    config = BuildConfig.from_dict({"data_root": "s3://bucket/near"}, base=tmp_path)
    assert config.data_root == "s3://bucket/near" and str(config.root) == "s3://bucket/near"
    assert config.scratch_dir == Path(tempfile.gettempdir()) / "near-scratch"
    assert BuildConfig.from_dict({"data_root": "data"}, base=tmp_path).data_root == str(tmp_path / "data")
    with pytest.raises(ConfigError, match="source.path is required"):
        config.local_default(None, "demo-assets")


def test_a_url_root_refuses_the_default_sqlite_catalog_and_a_missing_bucket(s3_root, tmp_path):
    with pytest.raises(CatalogError, match="pass a catalog URI"):
        FactoryCatalog(s3_root)
    assert not UPath(s3_root).exists(), "refused before anything is written"
    with pytest.raises(NotADataRoot, match="bucket does not exist"):
        FactoryCatalog("s3://near-no-such-bucket/data", f"sqlite:///{tmp_path / 'catalog.db'}")
    assert not UPath("s3://near-no-such-bucket").exists(), "a mistyped bucket is never created"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_exclusive_writes_let_exactly_one_writer_win(where, s3_root, tmp_path):
    path = root_path(s3_root if where == "s3" else tmp_path) / "releases" / "r" / "release.json"
    write_exclusive(path, b"first")
    with pytest.raises(FileExistsError):
        write_exclusive(path, b"second")
    assert path.read_bytes() == b"first"


def test_a_pack_in_s3_reads_back_exactly_and_a_lost_chunk_is_damage_not_zeros(s3_root):
    rows = np.arange(24, dtype=np.float32).reshape(6, 4)
    (packed,) = write_pack(s3_root, "slat_lh", "0" * 64, "run", [("key", {"feats": rows})])
    reader = PackReader(s3_root, packed.pack_path)
    np.testing.assert_array_equal(reader.read(packed.arrays, digest=packed.content_digest)["feats"], rows)
    feats = UPath(s3_root) / packed.pack_path / "feats"
    (chunk,) = [key for key in feats.fs.find(feats.path) if "/c/" in key]  # one shard
    feats.fs.rm(chunk)
    with pytest.raises(DamagedPackError, match="missing"):
        PackReader(s3_root, packed.pack_path).read(packed.arrays)
