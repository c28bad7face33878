"""Format detection, asset discovery, the protocol, the PLY/EXR formats of a render set."""

import numpy as np
import pytest

from pipelines.local_render import render_files
from render_jobs.exr import read_channels, write_channels
from render_jobs.formats import detect_format, find_asset_files
from render_jobs.protocol import RenderRequest, RenderResult, WorkerInfo, decode, encode
from render_jobs.recipes import recipe_config
from render_jobs.render_set import (
    FRAME_FORMATS,
    RenderSet,
    beauty_path,
    read_frame_file,
    read_ply,
    write_frame_file,
    write_ply,
)


def test_format_is_detected_by_content(tmp_path):
    cases = {
        "real.blend.glb": b"BLENDER-v500" + b"\0" * 100,  # a .blend that claims to be a .glb
        "model.bin.obj": b"glTF\x02\x00\x00\x00" + b"\0" * 100,
        "scene.ply": b"ply\nformat ascii 1.0\n",
        "noise.glb": bytes(range(256)) * 4,
        "mystery.xyz": b"hello",
        "scene.gltf": b'{"asset": {"version": "2.0"}}',
        "compressed.blend": b"\x28\xb5\x2f\xfd" + b"\0" * 100,
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    stl = tmp_path / "binary.dat"
    stl.write_bytes(b"\0" * 80 + (2).to_bytes(4, "little") + b"\0" * 100)
    assert detect_format(tmp_path / "real.blend.glb") == "blend"
    assert detect_format(tmp_path / "model.bin.obj") == "glb"
    assert detect_format(tmp_path / "scene.ply") == "ply"
    assert detect_format(tmp_path / "noise.glb") == "glb"  # no magic: the extension decides, the importer rejects
    assert detect_format(tmp_path / "mystery.xyz") is None
    assert detect_format(tmp_path / "scene.gltf") == "gltf"
    assert detect_format(tmp_path / "compressed.blend") == "blend"
    assert detect_format(stl) == "stl"


def test_folders_are_searched_and_sidecars_skipped(tmp_path):
    (tmp_path / "a" / "tex").mkdir(parents=True)
    for name in ("a/model.gltf", "a/model.bin", "a/tex/albedo.png", "b.glb", "c.blend1", "d.BLEND"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    outside = tmp_path.parent / f"{tmp_path.name}_outside.glb"
    outside.write_bytes(b"x")
    (tmp_path / "link.glb").symlink_to(outside)
    found = [p.relative_to(tmp_path).as_posix() for p in find_asset_files([tmp_path])]
    assert found == ["a/model.gltf", "b.glb", "d.BLEND"]
    with pytest.raises(FileNotFoundError):
        find_asset_files([tmp_path / "nope"])


def test_protocol_round_trip():
    messages = [
        RenderRequest("a.glb", "/out/a", "ab" * 32, {"name": "lh", "num_views": 2}),
        WorkerInfo(7, "5.0.1", "opengl", "llvmpipe", "Mesa", "SOFTWARE", 1.5, "FILTER_0"),
        RenderResult("a.glb", "failed", reason="timeout", message="m", stats={"faces": 3}, timings_s={"wall_s": 1.0}),
    ]
    for message in messages:
        assert decode(encode(message)) == message
    assert messages[1].is_software_gl
    with pytest.raises(ValueError, match="not a protocol message"):
        decode(b"Blender 5.0.1 (hash abc) started\n")


@pytest.mark.parametrize("frame_format", FRAME_FORMATS)
def test_frame_files_keep_names_dtypes_and_values(tmp_path, frame_format):
    rng = np.random.default_rng(1)
    channels = {"R": rng.random((4, 5)).astype(np.float16), "depth": rng.random((4, 5)).astype(np.float32),
                "normal.X": rng.random((4, 5)).astype(np.float16)}
    path = tmp_path / beauty_path(3, 1, frame_format)
    path.parent.mkdir()
    write_frame_file(path, channels)
    assert path.name == f"003_01.{frame_format}" and path.is_file()
    back = read_frame_file(path)
    assert back.keys() == channels.keys()
    for name, array in channels.items():
        assert back[name].dtype == array.dtype
        np.testing.assert_array_equal(back[name], array)


def test_ply_and_exr_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    vertices, faces = rng.random((10, 3)).astype(np.float32), rng.integers(0, 10, (7, 3)).astype(np.int32)
    write_ply(tmp_path / "m.ply", vertices, faces)
    v, f = read_ply(tmp_path / "m.ply")
    np.testing.assert_array_equal(v, vertices)
    np.testing.assert_array_equal(f, faces)
    channels = {"R": rng.random((4, 5)).astype(np.float16), "depth": rng.random((4, 5)).astype(np.float32)}
    write_channels(tmp_path / "x.exr", channels)
    back = read_channels(tmp_path / "x.exr")
    for name, array in channels.items():
        assert back[name].dtype == array.dtype
        np.testing.assert_array_equal(back[name], array)


@pytest.mark.blender
def test_npy_frames_hold_the_pixels_of_exr_frames(tmp_path, demo_assets, supervisor, worker_config):
    """The build's uncompressed frames and `near render`'s EXRs are two encodings of the same render."""
    recipe = recipe_config("lh", num_views=2, resolution_px=32, samples=2)
    sets = {}
    for frame_format in FRAME_FORMATS:
        (record,) = render_files([demo_assets["textured_cube"]], recipe, tmp_path / frame_format, worker=worker_config,
                                 supervisor=supervisor, frame_format=frame_format)
        assert record.result.is_ok, record.result.message
        sets[frame_format] = RenderSet.open(record.result.out_dir)
    exr, npy = sets["exr"], sets["npy"]
    assert [f.record["file_path"] for f in npy.frames] == ["beauty/000_00.npy", "beauty/001_00.npy"]
    assert not list(npy.root.rglob("*.exr"))
    for a, b in zip(exr.frames, npy.frames):
        np.testing.assert_array_equal(a.c2w, b.c2w)
        passes = list(exr.meta["passes"])
        for name, pixels in a.load_passes(*passes).items():
            np.testing.assert_array_equal(b.load(name), pixels, err_msg=name)
