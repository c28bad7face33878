"""Catalog integrity under hostile conditions: a wrong catalog, lost or damaged bytes, a mistyped root, a rewritten
release, a moved root, damaged release files. Real SQLite catalogs, Iceberg tables and Zarr packs on disk; the
CLI runs as a user runs it."""

import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalogs.errors import (
    CatalogMismatch,
    DamagedPackError,
    InvalidReleaseName,
    NotADataRoot,
    ReleaseIntegrityError,
)
from catalogs.keys import sha256_file
from catalogs.packs import PackReader
from catalogs.planner import plan
from catalogs.release_reader import Release, release_dir
from catalogs.releases import TAG_PREFIX, ReleaseSpec, create_release, record_digest
from catalogs.splits import SplitRule
from catalogs.tables import SCHEMAS, FactoryCatalog
from catalogs.verify import verify_catalog, verify_published_releases, verify_release, verify_release_record

from .conftest import execute, fake_output, paper_graph, synthetic_sources

ROLES = {"slat_lh": "slat_lh", "images": "render_relight"}
RENDER_ENV_ONLY = ("bpy", "elftools")


def _near(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          env={"COLUMNS": "250", "PATH": ""}, cwd=Path(__file__).resolve().parents[2])


def _make_root(path: Path, assets: int = 6, release: str = "r1") -> FactoryCatalog:
    catalog = FactoryCatalog(path)
    graph = paper_graph()
    catalog.register_specs(graph.specs)
    catalog.register_sources(synthetic_sources(assets))
    execute(catalog, plan(catalog, graph), "run-1", batch=3)
    create_release(catalog, graph, ReleaseSpec(release, ROLES))
    return catalog


def _age(folder: Path, hours: float) -> None:
    old = time.time() - hours * 3600
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (old, old))


def _tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every file and folder under `root`: size and sha256 (folders: the sorted listing)."""
    state = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_dir():
            state[key] = (0, ",".join(sorted(p.name for p in path.iterdir())))
        else:
            state[key] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def _slat_row(release: Release, sample: str) -> dict:
    return release._row(sample, "slat_lh")


@pytest.fixture
def root(tmp_path: Path) -> FactoryCatalog:
    return _make_root(tmp_path / "data")


# 1 -----------------------------------------------------------------------------------------------------------


def test_gc_refuses_a_catalog_that_is_not_the_roots(root, tmp_path):
    """An empty or foreign registry is no proof that a pack is unreferenced: gc refuses it, and so does every open."""
    packs = sorted(p for p in root.data_root.glob("packs/*/*/*"))
    for pack in packs:
        _age(pack, 500)
    other = _make_root(tmp_path / "other", assets=2, release="x")
    new_db = tmp_path / "new.db"
    for uri in (f"sqlite:///{new_db}", other.uri):
        refused = _near("catalog", "--root", str(root.data_root), "--catalog-uri", uri, "gc", "--grace-hours", "0", "--delete")
        assert refused.returncode == 2 and "error:" in refused.stderr and "Traceback" not in refused.stderr, refused
        assert all(pack.is_dir() for pack in packs), "no committed pack may be deleted"
    assert not new_db.exists(), "a read of a missing catalog creates none"
    with pytest.raises(CatalogMismatch, match="belongs to data root"):
        FactoryCatalog(root.data_root, other.uri)
    with pytest.raises(CatalogMismatch, match="does not know"):
        FactoryCatalog(root.data_root, f"sqlite:///{tmp_path / 'fresh.db'}")  # a build with a wrong catalog
    listed = _near("catalog", "--root", str(root.data_root), "gc", "--grace-hours", "0")
    assert listed.returncode == 0 and "no garbage" in listed.stdout, "with its own catalog every pack is live"


# 2 -----------------------------------------------------------------------------------------------------------


def test_a_missing_or_empty_chunk_never_reads_as_fill_values(root):
    release = Release.open(root.data_root, "r1")
    sample = release.sample_ids[0]
    row = _slat_row(release, sample)
    assert PackReader(root.data_root, row["pack_path"]).format == "near-pack/2"
    shard = root.data_root / row["pack_path"] / "feats" / "c" / "0" / "0"
    original = shard.read_bytes()
    for damage, expected in ((lambda: shard.unlink(), "missing"), (lambda: shard.write_bytes(b""), "empty")):
        damage()
        with pytest.raises(DamagedPackError, match=expected) as raised:
            Release.open(root.data_root, "r1").read(sample, "slat_lh")
        assert (raised.value.pack_path, raised.value.array) == (row["pack_path"], "feats")
        assert raised.value.where == f"{sample}/slat_lh" and sample in str(raised.value)
        shard.write_bytes(original)
    np.testing.assert_array_equal(release.read(sample, "slat_lh")["feats"], fake_output("slat_lh", row["artifact_key"])["feats"])


def test_all_zero_data_is_stored_and_read_as_data(tmp_path):
    """Every chunk is written, so a legitimately all-zero asset is no false alarm."""
    from catalogs.packs import write_pack

    zeros = {"shadow": np.zeros((3, 16, 16), np.float16)}
    (packed,) = write_pack(tmp_path, "relight", "c" * 64, "run", [("k" * 64, zeros)])
    got = PackReader(tmp_path, packed.pack_path).read(packed.arrays, digest=packed.content_digest)
    np.testing.assert_array_equal(got["shadow"], zeros["shadow"])


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32])
def test_a_flipped_bit_anywhere_in_a_chunk_is_caught(tmp_path, dtype):
    """zstd's frame checksum (8-bit arrays) and the CRC-32C (blosc arrays) see every position of the chunk."""
    from catalogs.packs import write_pack

    rng = np.random.default_rng(0)
    data = np.clip(np.add.outer(np.arange(32), np.arange(32))[None] * 3 + rng.normal(0, 2, (4, 32, 32)), 0, 255).astype(dtype)
    (packed,) = write_pack(tmp_path, "relight", "c" * 64, "run", [("k" * 64, {"shadow": data})])
    chunk = next(p for p in sorted((tmp_path / packed.pack_path / "shadow" / "c").rglob("*")) if p.is_file())
    raw = chunk.read_bytes()
    for position in range(0, len(raw), max(1, len(raw) // 50)):
        chunk.write_bytes(raw[:position] + bytes([raw[position] ^ 0x04]) + raw[position + 1 :])
        with pytest.raises(DamagedPackError):
            PackReader(tmp_path, packed.pack_path).read(packed.arrays)
    chunk.write_bytes(raw)
    np.testing.assert_array_equal(PackReader(tmp_path, packed.pack_path).read(packed.arrays)["shadow"], data)


# 3 -----------------------------------------------------------------------------------------------------------


def test_read_only_commands_write_nothing_and_refuse_what_is_not_a_root(root, tmp_path):
    create_release(root, paper_graph(), ReleaseSpec("r2", {"slat_lh": "slat_lh"}))
    data = str(root.data_root)
    before = _tree(root.data_root)
    for args in (("show",), ("show", "r1"), ("log",), ("diff", "r1", "r2"), ("verify",), ("verify", "--deep"),
                 ("verify", "r1"), ("gc", "--grace-hours", "0")):
        result = _near("catalog", "--root", data, *args)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        assert _tree(root.data_root) == before, f"near catalog {' '.join(args)} wrote into the root"
    FactoryCatalog(data, read_only=True)
    FactoryCatalog(data)  # a writable open of an existing catalog writes no metadata file either
    assert _tree(root.data_root) == before

    missing = tmp_path / "DOES_NOT_EXIST"
    for args in (("verify", "--deep"), ("show",), ("gc",), ("show", "r1")):
        result = _near("catalog", "--root", str(missing), *args)
        assert result.returncode == 2 and "not exist" in result.stderr and not missing.exists(), result
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _near("catalog", "--root", str(empty), "verify", "--deep")
    assert result.returncode == 2 and "not a data root" in result.stderr and not any(empty.iterdir())
    with pytest.raises(NotADataRoot):
        FactoryCatalog(empty, read_only=True)


# 4 -----------------------------------------------------------------------------------------------------------


def test_verify_names_every_damaged_pack_and_goes_on(root):
    release = Release.open(root.data_root, "r1")
    samples = release.sample_ids
    packs = {_slat_row(release, s)["pack_path"]: s for s in samples}  # 6 assets in packs of 3: two packs
    (first, a), (second, b) = sorted(packs.items())
    images = release._row(samples[0], "images")["pack_path"]
    index = root.data_root / first / "feats" / "c" / "0" / "0"
    raw = index.read_bytes()
    index.write_bytes(raw[:-6] + bytes([raw[-6] ^ 0x10]) + raw[-5:])  # a flipped byte in the shard index
    chunk = root.data_root / second / "coords" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])  # half a shard
    meta = root.data_root / images / "images" / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:40])  # a truncated zarr.json

    problems = list(verify_catalog(root, deep=True))
    text = "\n".join(f"{p.where}: {p.what}" for p in problems)
    for pack, array in ((first, "feats"), (second, "coords"), (images, "images")):
        assert f"pack {pack}, array '{array}'" in text, text
    assert len({p.where for p in problems}) == len(problems) == 9, "each damaged asset once, the rest checked"
    assert {p.where for p in verify_release(release)} >= {f"{a}/slat_lh", f"{b}/slat_lh", f"{samples[0]}/images"}
    with pytest.raises(DamagedPackError, match="checksum"):
        release.read(a, "slat_lh", verify=True)
    result = _near("catalog", "--root", str(root.data_root), "verify", "--deep")
    assert result.returncode == 1 and "9 problems" in result.stdout and "Traceback" not in result.stderr


# 5 -----------------------------------------------------------------------------------------------------------


def _rewrite_record(folder: Path, **changes) -> None:
    info = json.loads((folder / "release.json").read_text())
    (folder / "release.json").write_text(json.dumps({**info, **changes}))


def test_a_rewritten_release_does_not_verify(root):
    folder = release_dir(root.data_root, "r1")
    manifest = pq.read_table(folder / "manifest.parquet")
    rows = manifest.to_pylist()
    first, second = [i for i, r in enumerate(rows) if r["role"] == "slat_lh"][:2]
    for column in ("artifact_key", "pack_path", "arrays", "content_digest"):
        rows[first][column], rows[second][column] = rows[second][column], rows[first][column]
    pq.write_table(manifest.from_pylist(rows, schema=manifest.schema), folder / "manifest.parquet")
    _rewrite_record(folder, manifest_sha256=sha256_file(folder / "manifest.parquet"))  # the forger updates the pin
    release = Release.open(root.data_root, "r1")  # consistent with itself
    problems = [p.what for p in verify_release_record(root, release)]
    assert any("differs from the catalog's tagged snapshot" in p and rows[first]["sample_id"] in p for p in problems)
    assert any("changed since it was published" in p for p in problems)
    result = _near("catalog", "--root", str(root.data_root), "verify", "r1")
    assert result.returncode == 1 and "tagged snapshot" in result.stdout

    _rewrite_record(folder, manifest_sha256=None)
    with pytest.raises(ReleaseIntegrityError, match="manifest_sha256 missing or null"):
        Release.open(root.data_root, "r1")


@pytest.mark.parametrize("field, value", [("num_samples", 99), ("splits", {"train": 1, "val": 5}), ("selection", "all"),
                                          ("roles", {"slat_lh": {"step": "slat_lh", "spec_hash": "0" * 64}}),
                                          ("split_rule", SplitRule(test_percent=50).to_dict()), ("test_roles", ["images"])])
def test_every_field_of_release_json_is_covered(root, field, value):
    _rewrite_record(release_dir(root.data_root, "r1"), **{field: value})
    problems = list(verify_published_releases(root))
    assert any("changed since it was published" in p.what for p in problems), field


# 6 -----------------------------------------------------------------------------------------------------------


def test_a_copied_or_moved_root_is_its_own(root, tmp_path):
    original = root.data_root
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    before = _tree(original)
    moved = FactoryCatalog(copy)
    assert moved.root_id == root.root_id
    moved.register_sources(synthetic_sources(2, start=6))
    execute(moved, plan(moved, paper_graph()), "run-2")
    create_release(moved, paper_graph(), ReleaseSpec("r2", ROLES))
    assert _tree(original) == before, "committing to the copy changed the original"
    shutil.move(original, tmp_path / "elsewhere")
    assert list(verify_catalog(FactoryCatalog(copy, read_only=True), deep=True)) == []
    for name in ("r1", "r2"):
        release = Release.open(copy, name)
        assert list(verify_release(release)) == [] and list(verify_release_record(moved, release)) == []
    assert len(Release.open(copy, "r2").sample_ids) == 8
    result = _near("catalog", "--root", str(copy), "verify", "--deep")
    assert result.returncode == 0, result.stdout


# 7 -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "release.json").write_text("{not json"), "release.json is unreadable"),
    (lambda f: _rewrite_record(f, snapshot_id=None), "snapshot_id missing or null"),
    (lambda f: (f / "release.json").write_text("[1, 2]"), "not a release record"),
    (lambda f: (f / "manifest.parquet").unlink(), "manifest.parquet is unreadable"),
    (lambda f: (f / "manifest.parquet").write_bytes((f / "manifest.parquet").read_bytes()[:100]), "does not match"),
])
def test_damaged_release_files_are_named_in_one_line(root, damage, message):
    folder = release_dir(root.data_root, "r1")
    damage(folder)
    with pytest.raises(ReleaseIntegrityError, match=message):
        Release.open(root.data_root, "r1")
    result = _near("catalog", "--root", str(root.data_root), "show", "r1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_a_release_name_is_one_plain_name(root, tmp_path):
    elsewhere = _make_root(tmp_path / "elsewhere", assets=2, release="x")
    for name in ("../../elsewhere/releases/x", str(elsewhere.data_root / "releases" / "x"), ".hidden", "a/b", ""):
        with pytest.raises(InvalidReleaseName):
            Release.open(root.data_root, name)
        with pytest.raises(InvalidReleaseName):
            ReleaseSpec(name, ROLES)


# 11 ----------------------------------------------------------------------------------------------------------


def test_every_project_exception_derives_from_the_error_base():
    """Every exception class the project defines is a FactoryError (zarr's BaseZarrError pattern)."""
    import importlib
    import inspect
    import pkgutil

    from infra.errors import FactoryError

    repo = Path(__file__).resolve().parents[2]
    outside = []
    for package in ("catalogs", "encoders", "infra", "pipelines", "render_jobs", "training"):
        for info in pkgutil.walk_packages([str(repo / package)], prefix=f"{package}."):
            try:
                module = importlib.import_module(info.name)
            except ImportError as err:
                assert err.name in RENDER_ENV_ONLY, err  # modules that import only in the render env
                continue
            for name, value in vars(module).items():
                if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == info.name:
                    if not issubclass(value, FactoryError):
                        outside.append(f"{info.name}.{name}")
    assert outside == []


# roots and packs made before these checks -----------------------------------------------------------------------


def test_a_root_made_before_root_ids_is_adopted_in_place_and_refused_once_moved(tmp_path):
    """The catalog of an older root stores absolute `file://` locations and no root id."""
    from pyiceberg.catalog.sql import SqlCatalog

    from catalogs.tables import NAMESPACE, SCHEMAS

    legacy = tmp_path / "legacy"
    (legacy / "packs").mkdir(parents=True)
    old = SqlCatalog("near", uri=f"sqlite:///{legacy / 'catalog.db'}", warehouse=(legacy / "warehouse").as_uri())
    old.create_namespace(NAMESPACE)
    for name, schema in SCHEMAS.items():
        old.create_table(f"{NAMESPACE}.{name}", schema=schema)

    assert FactoryCatalog(legacy, read_only=True).root_id is None and not (legacy / "near-root.json").exists()
    adopted = FactoryCatalog(legacy)
    assert adopted.root_id and json.loads((legacy / "near-root.json").read_text())["root_id"] == adopted.root_id
    adopted.register_sources(synthetic_sources(1))
    moved = tmp_path / "moved"
    shutil.move(legacy, moved)
    with pytest.raises(CatalogMismatch, match="outside"):
        FactoryCatalog(moved, read_only=True)


def test_packs_without_checksums_are_read_against_their_digest(tmp_path):
    """A `near-pack/1` pack may omit an all-zero chunk: its zeros are data only if the digest says so."""
    from catalogs.packs import write_pack

    arrays = {"shadow": np.zeros((2, 8, 8), np.float16), "beauty": np.ones((2, 8, 8), np.float16)}
    (packed,) = write_pack(tmp_path, "relight", "c" * 64, "run", [("k" * 64, arrays)])
    pack = tmp_path / packed.pack_path
    meta = json.loads((pack / "zarr.json").read_text())
    (pack / "zarr.json").write_text(json.dumps({**meta, "attributes": {**meta["attributes"], "format": "near-pack/1"}}))
    for chunk in [p for p in (pack / "shadow" / "c").rglob("*") if p.is_file()]:
        chunk.unlink()  # as zarr skipped all-zero chunks then
    reader = PackReader(tmp_path, packed.pack_path)
    assert not reader.is_checked
    np.testing.assert_array_equal(reader.read(packed.arrays, digest=packed.content_digest)["shadow"], arrays["shadow"])
    for chunk in [p for p in (pack / "beauty" / "c").rglob("*") if p.is_file()]:
        chunk.unlink()  # real data lost: zeros now, which the digest refuses
    with pytest.raises(DamagedPackError, match="content digest"):
        PackReader(tmp_path, packed.pack_path).read(packed.arrays, digest=packed.content_digest)


def _publish_as_before_split_rules(catalog: FactoryCatalog, name: str, val_percent: int) -> None:
    """Turn a release into one published before split rules: train / val by a hash of the asset id, the record's
    `val_percent` instead of `split_rule`, and the catalog's tagged snapshot and digest to match."""
    folder = release_dir(catalog.data_root, name)
    manifest = pq.read_table(folder / "manifest.parquet")
    sample_ids = manifest["sample_id"].to_pylist()
    splits = ["val" if int(hashlib.sha256(s.encode()).hexdigest()[:8], 16) % 100 < val_percent else "train"
              for s in sample_ids]
    manifest = manifest.set_column(manifest.schema.get_field_index("split"), "split", pa.array(splits, pa.string()))
    manifest = manifest.cast(SCHEMAS["samples"])
    pq.write_table(manifest, folder / "manifest.parquet")
    record = json.loads((folder / "release.json").read_text())
    del record["split_rule"], record["test_roles"]
    record.update(val_percent=val_percent, manifest_sha256=sha256_file(folder / "manifest.parquet"),
                  splits=dict(collections.Counter(dict(zip(sample_ids, splits)).values())))
    table = catalog.table("samples")
    table.overwrite(manifest, snapshot_properties={"release": name, "release_digest": record_digest(record)})
    table = catalog.table("samples")
    table.manage_snapshots().remove_tag(TAG_PREFIX + name).commit()
    table.manage_snapshots().create_tag(table.current_snapshot().snapshot_id, TAG_PREFIX + name).commit()
    record.update(snapshot_id=table.current_snapshot().snapshot_id, metadata_location=table.metadata_location)
    (folder / "release.json").write_text(json.dumps(record, indent=1))


def test_a_release_published_before_split_rules_still_opens_verifies_and_diffs(root):
    _publish_as_before_split_rules(root, "r1", val_percent=50)
    create_release(root, paper_graph(), ReleaseSpec("r2", ROLES, split=SplitRule(test_percent=20)))
    old, new = Release.open(root.data_root, "r1"), Release.open(root.data_root, "r2")
    assert old.split_rule is None and old.test_roles == frozenset() and old.split("test") == []
    assert set(old.split("train")) | set(old.split("val")) == set(old.sample_ids) and old.split("val")
    assert new.split_rule == SplitRule(test_percent=20).to_dict() and new.split("test")
    assert list(verify_published_releases(root)) == []
    data = str(root.data_root)
    for args in (("verify",), ("verify", "r1"), ("verify", "r2"), ("show", "r1"), ("show", "r2"), ("diff", "r1", "r2"),
                 ("show",), ("log",)):
        result = _near("catalog", "--root", data, *args)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    assert "split_rule" in _near("catalog", "--root", data, "show", "r2").stdout

    folder = release_dir(root.data_root, "r1")
    _rewrite_record(folder, val_percent=0)  # an old release's recorded split is still checked
    problems = [p.what for p in verify_published_releases(root)]
    assert any("not in the split val_percent=0 puts them in" in p for p in problems), problems
