"""The Objaverse-XL source up to the network: the package's annotation loader on locally made tables, the
selection, and safe extraction of files from GitHub repository archives. The download itself needs the
network and is not run here."""

import hashlib
import json
import os
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from catalogs import objaverse
from catalogs.objaverse import ObjaverseSelection, UnsafeArchiveMember
from infra.errors import FactoryError, Reason
from pipelines.ingest import objaverse_rows

GLTF = {
    "asset": {"version": "2.0"},
    "buffers": [{"uri": "chair.bin", "byteLength": 4}],
    "images": [{"uri": "textures/wood.png"}, {"uri": "data:image/png;base64,AAAA"}],
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    """A repository archive as `download_objects(save_repo_format="zip")` leaves it: written aside, then moved
    into place (a re-download replaces the file, it does not rewrite it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(partial, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    os.replace(partial, path)
    return path


def _partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".partial")]


def _objects(download_dir: Path, *extra: str) -> pd.DataFrame:
    """The fixture's selected GitHub objects, then glb objects annotated as `extra` (fileIdentifiers)."""
    annotations = objaverse.load_annotations(download_dir)
    objects = objaverse.select(annotations, ObjaverseSelection(sources=("github",)))
    more = {"source": "github", "license": "MIT", "fileType": "glb", "sha256": "5" * 64, "metadata": "{}"}
    return pd.concat([objects, pd.DataFrame([{"fileIdentifier": f, **more} for f in extra])])


@pytest.fixture
def download_dir(tmp_path: Path) -> Path:
    """A download dir as `oxl.get_annotations` leaves it: one annotation parquet per source, plus one GitHub repo
    saved as a zip archive the way `download_objects(save_repo_format="zip")` saves it."""
    repo = tmp_path / "github" / "repos" / "someone" / "furniture.zip"
    repo.parent.mkdir(parents=True)
    gltf = json.dumps(GLTF).encode()
    with zipfile.ZipFile(repo, "w") as zf:
        zf.writestr("models/chair.gltf", gltf)
        zf.writestr("models/chair.bin", b"\0\0\0\0")
        zf.writestr("models/textures/wood.png", b"png")
        zf.writestr("models/table.glb", b"glb bytes")
        zf.writestr("../../escape.glb", b"evil")
        zf.writestr("models/huge.stl", b"x" * 4096)
    rows = {
        "github": [
            ("https://github.com/someone/furniture/blob/abc/models/chair.gltf", "gltf", "MIT", _sha(gltf)),
            ("https://github.com/someone/furniture/blob/abc/models/table.glb", "glb", "MIT", "0" * 64),
            ("https://github.com/someone/furniture/blob/abc/models/scene.dae", "dae", "MIT", "1" * 64),
        ],
        "sketchfab": [
            ("https://sketchfab.com/3d-models/u1", "glb", "by", "2" * 64),
            ("https://sketchfab.com/3d-models/u2", "glb", "by-nc", "2" * 64),
        ],
        "smithsonian": [
            ("https://3d-api.si.edu/content/document/3d_package:x/m.glb", "glb", "CC0", "3" * 64)
        ],
        "thingiverse": [("https://www.thingiverse.com/thing:1/files?fileId=2", "stl", "by-sa", "4" * 64)],
    }
    for source, items in rows.items():
        folder = tmp_path / source
        folder.mkdir(exist_ok=True)
        frame = pd.DataFrame(
            [
                {
                    "fileIdentifier": f,
                    "source": source,
                    "license": lic,
                    "fileType": t,
                    "sha256": sha,
                    "metadata": "{}",
                }
                for f, t, lic, sha in items
            ]
        )
        frame.to_parquet(folder / f"{source}.parquet")
    return tmp_path


def test_annotations_load_through_the_package_from_the_download_dir(download_dir: Path) -> None:
    annotations = objaverse.load_annotations(download_dir)
    assert set(annotations.columns) >= {
        "fileIdentifier",
        "source",
        "license",
        "fileType",
        "sha256",
        "metadata",
    }
    assert sorted(annotations["source"].unique()) == sorted(objaverse.OBJAVERSE_SOURCES)
    assert len(annotations) == 7


def test_selection_filters_and_deduplicates(download_dir: Path) -> None:
    annotations = objaverse.load_annotations(download_dir)
    every = objaverse.select(annotations, ObjaverseSelection())
    assert "dae" not in set(every["fileType"])  # Blender 5 cannot import Collada
    assert every["sha256"].is_unique and len(every) == 5  # the two sketchfab rows share content
    github = objaverse.select(annotations, ObjaverseSelection(sources=("github",), licenses=("MIT",)))
    assert list(github["fileType"]) == ["gltf", "glb"]
    by_sha = objaverse.select(
        annotations, ObjaverseSelection(ids=("3" * 64, "https://sketchfab.com/3d-models/u1"))
    )
    assert sorted(by_sha["source"]) == ["sketchfab", "smithsonian"]
    assert len(objaverse.select(annotations, ObjaverseSelection(limit=2))) == 2
    with pytest.raises(ValueError, match="unknown objaverse-xl sources"):
        ObjaverseSelection(sources=("polyhaven",))


def test_a_gltf_is_extracted_from_its_repo_archive_with_what_it_references(download_dir: Path) -> None:
    archived = str(download_dir / "github" / "repos" / "someone" / "furniture.zip" / "models" / "chair.gltf")
    path = objaverse.materialize(archived, download_dir / "extracted", max_bytes=1 << 20)
    assert path.name == "chair.gltf" and (path.parent / "chair.bin").read_bytes() == b"\0\0\0\0"
    assert (path.parent / "textures" / "wood.png").exists()
    assert path.is_relative_to(download_dir / "extracted")
    assert objaverse.materialize(archived, download_dir / "extracted", max_bytes=1 << 20) == path  # once


def test_unsafe_members_are_refused(download_dir: Path) -> None:
    archive = download_dir / "github" / "repos" / "someone" / "furniture.zip"
    out = download_dir / "extracted" / "furniture"
    with pytest.raises(UnsafeArchiveMember, match="outside"):
        objaverse.extract_member(archive, "../../escape.glb", out, max_bytes=1 << 20)
    with pytest.raises(UnsafeArchiveMember, match="limit"):
        objaverse.extract_member(archive, "models/huge.stl", out, max_bytes=1024)
    assert not (download_dir / "escape.glb").exists() and not any(out.rglob("huge.stl"))


def test_rows_carry_recomputed_sha256_and_skip_what_cannot_be_extracted(download_dir: Path) -> None:
    escape = "https://github.com/someone/furniture/blob/abc/escape.glb"
    gone = "https://github.com/someone/furniture/blob/abc/models/gone.glb"
    objects = _objects(download_dir, escape, gone)
    repo = download_dir / "github" / "repos" / "someone" / "furniture.zip"
    downloaded = {
        "https://github.com/someone/furniture/blob/abc/models/chair.gltf": f"{repo}/models/chair.gltf",
        "https://github.com/someone/furniture/blob/abc/models/table.glb": f"{repo}/models/table.glb",
        escape: f"{repo}/../../escape.glb",
        gone: f"{repo}/models/gone.glb",
    }
    rows, skipped = objaverse_rows(objects, downloaded, download_dir, max_bytes=1 << 20)
    rows = rows.to_pylist()
    assert [r["kind"] for r in rows] == ["gltf", "glb"]
    assert [(s.entry, s.reason) for s in skipped] == [
        (escape, Reason.UNSAFE_ARCHIVE_MEMBER),
        (gone, Reason.MISSING_MEMBER),
    ]
    chair, table = rows
    assert chair["source_id"] == _sha(json.dumps(GLTF).encode()) and "modified" not in json.loads(
        chair["attrs_json"]
    )
    assert json.loads(table["attrs_json"])["modified"] is True  # annotation sha256 "000..." != the bytes
    assert chair["origin"] == "objaverse-xl:github" and chair["license"] == "MIT"


def test_archive_errors_are_factory_errors() -> None:
    assert issubclass(UnsafeArchiveMember, FactoryError) and issubclass(UnsafeArchiveMember, ValueError)


def _corrupt_crc(path: Path) -> Path:
    """A stored member whose bytes no longer match its CRC-32 (a damaged download)."""
    _zip(path, {"models/broken.glb": b"glTF" + b"x" * 4000})
    data = path.read_bytes()
    path.write_bytes(data.replace(b"x" * 4000, b"x" * 3999 + b"y", 1))
    return path


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: path.write_text("<!doctype html><html><body>rate limit exceeded</body></html>"),
        _corrupt_crc,
    ],
    ids=["html-saved-as-zip", "bad-crc"],
)
def test_a_corrupt_archive_skips_its_object_with_a_reason(download_dir: Path, damage) -> None:
    objects = _objects(download_dir, "https://github.com/other/broken/blob/abc/models/broken.glb")
    broken = download_dir / "github" / "repos" / "other" / "broken.zip"
    broken.parent.mkdir(parents=True)
    damage(broken)
    chair = "https://github.com/someone/furniture/blob/abc/models/chair.gltf"
    downloaded = {
        chair: f"{download_dir}/github/repos/someone/furniture.zip/models/chair.gltf",
        "https://github.com/other/broken/blob/abc/models/broken.glb": f"{broken}/models/broken.glb",
    }
    rows, skipped = objaverse_rows(objects, downloaded, download_dir, max_bytes=1 << 20)
    assert rows["asset_id"].to_pylist() == [chair]
    assert [(s.entry, s.reason) for s in skipped] == [
        ("https://github.com/other/broken/blob/abc/models/broken.glb", Reason.CORRUPT_ARCHIVE)
    ]
    assert str(broken) in skipped[0].message
    assert not _partials(download_dir)


def test_same_named_repositories_of_two_organisations_extract_apart(tmp_path: Path) -> None:
    paths = [
        objaverse.materialize(
            f"{_zip(tmp_path / 'repos' / org / 'models.zip', {'chair.glb': org.encode()})}/chair.glb",
            tmp_path / "extracted",
            max_bytes=1 << 20,
        )
        for org in ("orgA", "orgB")
    ]
    assert [p.read_bytes() for p in paths] == [b"orgA", b"orgB"]


def test_a_redownloaded_archive_is_extracted_again(tmp_path: Path) -> None:
    archive = tmp_path / "repos" / "org" / "models.zip"
    for content in (b"first version", b"second, longer version"):
        _zip(archive, {"chair.glb": content})
        path = objaverse.materialize(f"{archive}/chair.glb", tmp_path / "extracted", max_bytes=1 << 20)
        assert path.read_bytes() == content


def test_the_size_limit_bounds_what_one_asset_extracts_in_all(tmp_path: Path) -> None:
    gltf = {"asset": {"version": "2.0"}, "images": [{"uri": f"t{i}.png"} for i in range(3)]}
    archive = _zip(
        tmp_path / "repos" / "org" / "scene.zip",
        {"scene.gltf": json.dumps(gltf).encode(), **{f"t{i}.png": b"p" * 400 for i in range(3)}},
    )
    with pytest.raises(UnsafeArchiveMember, match="limit") as caught:  # each file is under 1000 bytes
        objaverse.materialize(f"{archive}/scene.gltf", tmp_path / "extracted", max_bytes=1000)
    assert caught.value.reason is Reason.TOO_LARGE
    assert not _partials(tmp_path)


def test_percent_encoded_gltf_uris_are_decoded(tmp_path: Path) -> None:
    gltf = {"buffers": [{"uri": "b%C3%A4r.bin"}], "images": [{"uri": "tex%20ture.png"}]}
    archive = _zip(
        tmp_path / "repos" / "org" / "scene.zip",
        {"m/scene.gltf": json.dumps(gltf).encode(), "m/bär.bin": b"bin", "m/tex ture.png": b"png"},
    )
    path = objaverse.materialize(f"{archive}/m/scene.gltf", tmp_path / "extracted", max_bytes=1 << 20)
    assert (path.parent / "tex ture.png").read_bytes() == b"png"
    assert (path.parent / "bär.bin").read_bytes() == b"bin"
