"""The environment-map store without a build: a release (a real `Release` over an in-memory manifest, its
packs stood in for) serves its `env_maps` rows by sha256; folders stand in only for releases that pack none;
unknown maps fail with an error that names the release and the fix."""

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from catalogs.errors import ReleaseIntegrityError
from catalogs.release_reader import Release
from pipelines.steps import ENV_MAPS, SLAT_LH
from render_jobs.exr import write_channels
from training.stage2.env_map_store import ENV_MAP_PREFIX, EnvMapNotFound, EnvMapStore, packed_env_maps

SKY, SUNSET = hashlib.sha256(b"sky.exr bytes").hexdigest(), hashlib.sha256(b"sunset.exr bytes").hexdigest()


class PackedRelease(Release):
    """A release whose manifest lists `maps` (file name -> (sha256, (H, W, 3) pixels)) as `env_maps` rows next
    to one asset; `read` serves the pixels from memory and counts the reads."""

    def __init__(self, maps: dict[str, tuple[str, np.ndarray]], name: str = "tiny") -> None:
        rows = [{"sample_id": "asset.glb", "source_id": "ab" * 32, "split": "train", "role": SLAT_LH}]
        rows += [
            {"sample_id": ENV_MAP_PREFIX + file, "source_id": digest, "split": "shared", "role": ENV_MAPS}
            for file, (digest, _) in maps.items()
        ]
        manifest = pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.string()) for c in rows[0]]))
        super().__init__(Path("unused"), {"name": name}, manifest)
        self.pixels = {ENV_MAP_PREFIX + file: rgb for file, (_, rgb) in maps.items()}
        self.reads: list[tuple[str, str]] = []

    def read(self, sample_id, role, *, names=None, verify=False):
        self.reads.append((sample_id, role))
        return {"rgb": self.pixels[sample_id]}


def _map(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 10, (height, width, 3)).astype(np.float32)


def test_the_release_serves_its_maps_by_sha256_resized_by_area_averaging() -> None:
    sky, sunset = _map(8, 16, 0), _map(4, 8, 1)
    release = PackedRelease({"sky.exr": (SKY, sky), "sunset.exr": (SUNSET, sunset)})
    store = EnvMapStore.from_release(release, (4, 8))
    assert store.digests == {SKY, SUNSET} and len(store) == 2 and SKY in store
    assert store.digest_of("sky.exr") == SKY and store.name_of(SUNSET) == "sunset.exr"
    expected = torch.from_numpy(sky).reshape(4, 2, 8, 2, 3).mean(dim=(1, 3))  # 2 x 2 texel blocks
    assert torch.allclose(store.get(SKY), expected, atol=1e-5)
    assert torch.equal(store.get(SUNSET), torch.from_numpy(sunset))
    store.get(SKY)
    assert release.reads == [
        (ENV_MAP_PREFIX + "sky.exr", ENV_MAPS),
        (ENV_MAP_PREFIX + "sunset.exr", ENV_MAPS),
    ]
    assert release.split("train") == ["asset.glb"]  # the maps are `shared`: never a training sample


def test_an_unknown_digest_names_the_release_and_the_fix() -> None:
    store = EnvMapStore.from_release(PackedRelease({"sky.exr": (SKY, _map(4, 8, 0))}, name="rel-7"), (4, 8))
    with pytest.raises(EnvMapNotFound, match=r"(?s)sha256 " + SUNSET + r".*release 'rel-7'.*rebuild"):
        store.get(SUNSET)
    with pytest.raises(EnvMapNotFound, match=r"(?s)'train' relight frames.*release 'rel-7'"):
        store.require({SKY, SUNSET}, where="the 'train' relight frames")
    store.require({SKY})
    with pytest.raises(EnvMapNotFound, match=r"no environment map named 'forest.exr' in release 'rel-7'"):
        store.digest_of("forest.exr")
    assert isinstance(EnvMapNotFound("x"), LookupError)


def test_a_release_that_packs_no_maps_needs_folders(tmp_path: Path) -> None:
    old = PackedRelease({}, name="old")
    with pytest.raises(
        EnvMapNotFound, match=r"(?s)release 'old' packs no environment maps.*Rebuild.*env_maps"
    ):
        EnvMapStore.from_release(old, (4, 8))
    rgb = _map(4, 8, 2)
    write_channels(tmp_path / "studio.exr", {c: rgb[..., i] for i, c in enumerate("RGB")})
    store = EnvMapStore.from_release(old, (4, 8), folders=[tmp_path])
    digest = hashlib.sha256((tmp_path / "studio.exr").read_bytes()).hexdigest()
    assert store.digest_of("studio.exr") == digest and store.name_of(digest) == "studio.exr"
    assert torch.equal(store.get(digest), torch.from_numpy(rgb))
    with pytest.raises(EnvMapNotFound, match=r"(?s)in none of the folders.*rebuild the release"):
        store.get(SKY)


def test_a_release_that_packs_its_maps_ignores_folders(tmp_path: Path) -> None:
    write_channels(tmp_path / "studio.exr", {c: np.ones((4, 8), np.float32) for c in "RGB"})
    store = EnvMapStore.from_release(
        PackedRelease({"sky.exr": (SKY, _map(4, 8, 0))}), (4, 8), folders=[tmp_path]
    )
    assert store.digests == {SKY} and store.source == "release 'tiny'"


def test_a_damaged_env_maps_row_is_an_integrity_error() -> None:
    release = PackedRelease({"sky.exr": ("not-a-sha256", _map(4, 8, 0))})
    with pytest.raises(ReleaseIntegrityError, match="source_id 'not-a-sha256'"):
        packed_env_maps(release)
    flat = PackedRelease({"sky.exr": (SKY, np.zeros((4, 8), np.float32))})
    with pytest.raises(ReleaseIntegrityError, match=r"not \(H, W, 3\)"):
        EnvMapStore.from_release(flat, (4, 8)).get(SKY)
