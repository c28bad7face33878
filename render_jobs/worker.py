"""The render child: `<render env python> -m render_jobs.worker`, one asset at a time over a pipe.

Requests arrive as JSON lines on stdin; results leave as JSON lines on the process's original stdout,
which is kept private: everything Blender prints (C and Python) is redirected to stderr, whose tail the
supervisor keeps for failure records. An asset's folder appears only when complete (written under a
`.partial-<pid>` name, then renamed).
"""

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from infra.errors import AssetRejected, NotFound, Reason
from render_jobs import contact_sheet, lighting, render_set
from render_jobs.cameras import focal_px
from render_jobs.exr import read_channels
from render_jobs.formats import detect_format
from render_jobs.gpu_backend import select_gpu_backend
from render_jobs.protocol import (
    GPU_BACKEND_ENV_VAR,
    RenderRequest,
    RenderResult,
    WorkerInfo,
    decode,
    encode,
    is_software_gl,
)
from render_jobs.recipes import RecipeConfig, env_map_files, plan_frames, recipe_env_maps

logger = logging.getLogger(__name__)

BLANK_COVERAGE = 1e-4
"""An asset whose largest alpha coverage over all frames is below this rendered nothing: `blank_render`."""
TILE_PX = 128
STORE_QUEUE = 2
"""Frames rendered but not yet stored, at most (each holds its decoded passes in memory)."""


def _env_maps(recipe: RecipeConfig, scene: Any) -> dict[str, Path]:
    """The maps the recipe draws, by file name, in the order `plan_frames` takes them (`recipe_env_maps`).

    Raises:
        NotFound: the folder holds no map, or lacks one of `recipe.env_map_names` (named in the message).
    """
    if not recipe.needs_env_maps:
        return {}
    if recipe.env_maps_dir is None:
        maps, where = scene.bundled_env_maps(), "the maps bpy ships"
    else:
        folder = Path(recipe.env_maps_dir)
        maps, where = env_map_files(folder), str(folder)
    if not maps:
        raise NotFound(f"no .exr or .hdr environment maps in {where}")
    try:
        names = recipe_env_maps(recipe, maps)
    except NotFound as err:
        raise NotFound(f"{err} (in {where})") from err
    return {name: maps[name] for name in names}


def prepare_scene(scene: Any, asset: Path, recipe: RecipeConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load `asset` and make it what every recipe renders: sanitized, shading from missing libraries rebuilt,
    normalized to [-0.5, 0.5]^3, the recipe's AOVs wired. Returns (normalization, stats).

    Raises:
        AssetRejected: unreadable, empty or unrecognised files, importer failures, nothing to render.
    """
    if not asset.is_file():
        raise AssetRejected(str(asset), Reason.IMPORT_ERROR, "not a readable file")
    if asset.stat().st_size == 0:
        raise AssetRejected(str(asset), Reason.IMPORT_ERROR, "file is empty")
    fmt = detect_format(asset)
    if fmt is None:
        raise AssetRejected(str(asset), Reason.UNSUPPORTED_FORMAT, f"unrecognised content and extension {asset.suffix!r}")
    scene.load_asset(asset, fmt)
    dropped = scene.sanitize()
    rebuilt = scene.rebuild_missing_shader_groups()
    opaque_depth = scene.render_both_sides_with_depth()
    normalization = scene.normalize(str(asset))
    stats = {
        "format": fmt, **scene.asset_stats(), "dropped": dropped, "rebuilt_materials": rebuilt,
        "materials_made_two_sided_dithered": opaque_depth,
    }
    scene.add_material_aovs(tuple(p for p in recipe.passes if p in scene.VIEW_LAYER_AOVS))
    return normalization, stats


def render_asset(request: RenderRequest, scratch: Path, scene: Any, info: WorkerInfo) -> RenderResult:
    """Load, sanitize, normalize and render one asset; every failure becomes a result with a reason."""
    asset = Path(request.asset_path)
    out_dir = Path(request.out_dir)
    partial = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    timings: dict[str, float] = {}
    stats: dict[str, Any] = {}
    try:
        recipe = RecipeConfig.from_dict(request.recipe)
        t = time.perf_counter()
        normalization, stats = prepare_scene(scene, asset, recipe)
        timings["import_s"] = time.perf_counter() - t

        t = time.perf_counter()
        partial.mkdir(parents=True)
        vertices, faces = scene.mesh_arrays()
        render_set.write_ply(partial / render_set.MESH_FILE, vertices, faces)
        env_maps = _env_maps(recipe, scene)
        frames = plan_frames(recipe, request.source_id, list(env_maps))
        rig = scene.RenderRig(recipe, env_maps)
        timings["setup_s"] = time.perf_counter() - t

        t = time.perf_counter()
        if request.frame_format not in render_set.FRAME_FORMATS:
            raise ValueError(f"frame_format must be one of {render_set.FRAME_FORMATS}, got {request.frame_format!r}")
        records, tiles, coverage, timings["blender_s"] = _render_frames(
            rig, frames, recipe, request.frame_format, partial, scratch
        )
        timings["render_s"] = time.perf_counter() - t
        timings["per_frame_s"] = timings["render_s"] / len(frames)
        if coverage < BLANK_COVERAGE:
            raise AssetRejected(str(asset), Reason.BLANK_RENDER, f"largest alpha coverage {coverage:.2e}")
        stats["max_alpha_coverage"] = coverage

        (partial / "contact_sheets").mkdir()
        for pass_name, pass_tiles in tiles.items():
            contact_sheet.write_contact_sheet(partial / "contact_sheets" / f"{pass_name}.png", pass_tiles)
        meta = _transforms(request, recipe, records, normalization, stats, info)
        meta["env_maps"] = {name: _sha256(path) for name, path in env_maps.items()}
        (partial / render_set.TRANSFORMS_FILE).write_text(json.dumps(meta, indent=1))
        _commit(partial, out_dir)
        return RenderResult(str(asset), "ok", out_dir=str(out_dir), stats=stats, timings_s=timings)
    except AssetRejected as err:
        return _failed(asset, err.reason.value, err.detail, stats, timings, partial)
    except MemoryError:
        return _failed(asset, Reason.OOM.value, "out of memory", stats, timings, partial)
    except Exception as err:  # noqa: BLE001 - any other failure of one asset must not stop the worker
        traceback.print_exc()
        return _failed(asset, Reason.RENDER_ERROR.value, f"{type(err).__name__}: {err}", stats, timings, partial)
    finally:
        scene.reset()


def _failed(asset: Path, reason: str, message: str, stats: dict, timings: dict, partial: Path) -> RenderResult:
    shutil.rmtree(partial, ignore_errors=True)
    logger.warning("failed asset=%s reason=%s %s", asset, reason, message)
    return RenderResult(str(asset), "failed", reason=reason, message=message, stats=stats, timings_s=timings)


def _commit(partial: Path, out_dir: Path) -> None:
    """Make the finished folder visible in one rename, replacing an older render set of the same asset."""
    if out_dir.exists():
        stale = out_dir.with_name(f"{out_dir.name}.stale-{os.getpid()}")
        out_dir.rename(stale)
        partial.rename(out_dir)
        shutil.rmtree(stale)
    else:
        partial.rename(out_dir)


def _render_frames(rig: Any, frames: list, recipe: RecipeConfig, frame_format: str, out: Path, scratch: Path):
    """Render and store every frame; returns (frame records, preview tiles per pass, largest alpha coverage,
    seconds spent inside Blender).

    Blender releases the GIL while it renders, so storing frame k (reading Blender's file back, splitting
    passes, writing frame files, preview tiles) runs on a thread during the render of frame k + 1: the render
    loop itself only moves the camera. At most STORE_QUEUE frames wait, each in its own scratch file.
    """
    has_gbuffer = any(render_set.PASS_CHANNELS[p][0] == "gbuffer" for p in recipe.passes)
    (out / "beauty").mkdir()
    if has_gbuffer:
        (out / "gbuffer").mkdir()
    tile_px = min(TILE_PX, recipe.resolution_px)
    records: list[dict[str, Any]] = []
    stored: list[Future] = []
    current_view, blender_s = -1, 0.0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="near-store") as store:
        for k, frame in enumerate(frames):
            if len(stored) > STORE_QUEUE:
                stored[-STORE_QUEUE - 1].result()  # frees its scratch file; re-raises a failed store at once
            t = time.perf_counter()
            new_view = frame.view_index != current_view
            if new_view:
                rig.set_view(frame.view)
            rig.set_lighting(frame.lighting)
            blender_file = scratch / f"frame{k % (STORE_QUEUE + 2)}.exr"
            rig.render(blender_file)
            blender_s += time.perf_counter() - t
            stored.append(store.submit(_store_frame, blender_file, rig.view_layer_name, frame, new_view, recipe,
                                       frame_format, out, tile_px))
            current_view = frame.view_index
            records.append(_frame_record(frame, recipe, frame_format, has_gbuffer=has_gbuffer,
                                         sun_threshold=rig.sun_threshold))
        results = [future.result() for future in stored]
    tiles = {p: [t for frame_tiles, _ in results for name, t in frame_tiles if name == p] for p in recipe.passes}
    coverage = max(frame_coverage for _, frame_coverage in results)
    return records, tiles, coverage, blender_s


def _store_frame(
    blender_file: Path, view_layer: str, frame: Any, new_view: bool, recipe: RecipeConfig, frame_format: str,
    out: Path, tile_px: int,
) -> tuple[list[tuple[str, np.ndarray]], float]:
    """Write one frame's beauty (and, for a new view, gbuffer) file; returns its preview tiles and alpha coverage."""
    beauty, gbuffer = render_set.split_passes(read_channels(blender_file, view_layer=view_layer), recipe.passes)
    alpha = beauty["A"]
    render_set.write_frame_file(out / render_set.beauty_path(frame.view_index, frame.lighting_index, frame_format),
                                beauty)
    if new_view and gbuffer:
        render_set.write_frame_file(out / render_set.gbuffer_path(frame.view_index, frame_format), gbuffer)
    tiles = []
    for pass_name in recipe.passes:
        kind, names, _ = render_set.PASS_CHANNELS[pass_name]
        if kind == "gbuffer" and not new_view:
            continue
        source = beauty if kind == "beauty" else gbuffer
        data = np.stack([source[c] for c in names], axis=-1) if len(names) > 1 else source[names[0]]
        tiles.append((pass_name, contact_sheet.preview_tile(pass_name, data, alpha, tile_px)))
    return tiles, float(np.mean(alpha, dtype=np.float32))


def _frame_record(
    frame: Any, recipe: RecipeConfig, frame_format: str, *, has_gbuffer: bool, sun_threshold: float | None
) -> dict[str, Any]:
    """One frame of transforms.json; its `lighting` is the frame's LightingSpec and `lighting.shadow_fields`."""
    view = frame.view
    f = focal_px(view.fov_rad, recipe.resolution_px)
    record = {
        "file_path": render_set.beauty_path(frame.view_index, frame.lighting_index, frame_format),
        "view_index": frame.view_index,
        "lighting_index": frame.lighting_index,
        "camera_angle_x": view.fov_rad,
        "transform_matrix": view.c2w.tolist(),
        "fl_x": f, "fl_y": f, "cx": recipe.resolution_px / 2, "cy": recipe.resolution_px / 2,
        "w": recipe.resolution_px, "h": recipe.resolution_px,
        "view": {"yaw_rad": view.yaw_rad, "pitch_rad": view.pitch_rad, "radius_m": view.radius_m, "fov_rad": view.fov_rad},
        "lighting": {**frame.lighting.to_dict(), **lighting.shadow_fields(frame.lighting, sun_threshold)},
    }
    if has_gbuffer:
        record["gbuffer_path"] = render_set.gbuffer_path(frame.view_index, frame_format)
    return record


def _transforms(request: RenderRequest, recipe: RecipeConfig, records: list, normalization: dict, stats: dict, info: WorkerInfo) -> dict:
    return {
        "format": render_set.FORMAT_VERSION,
        "asset_path": request.asset_path,
        "source_id": request.source_id,
        "recipe": recipe.to_dict(),
        "aabb": [[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]],
        "scale": normalization["scale"],
        "offset": normalization["offset"],
        "normalization": normalization,
        "camera_angle_x": records[0]["camera_angle_x"],
        "renderer": {"engine": "BLENDER_EEVEE", "raytracing": True, "samples": recipe.samples,
                     "bpy_version": info.bpy_version, "gpu_backend": info.gpu_backend, "gl_renderer": info.gl_renderer,
                     "gl_device_type": info.gl_device_type, "anisotropic_filter": info.anisotropic_filter},
        "passes": {name: {"file": render_set.PASS_CHANNELS[name][0], "channels": list(render_set.PASS_CHANNELS[name][1])}
                   for name in recipe.passes},
        "stats": stats,
        "frames": records,
    }


def _sha256(path: Path) -> str:
    """The content address an environment map is found by at training time (`training.stage2.env_map_store`)."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _send(channel: BinaryIO, message: Any) -> None:
    channel.write(encode(message))
    channel.flush()


def main() -> None:
    protocol_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # Blender's own prints go to stderr from here on
    sys.stdout = sys.stderr
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    select_gpu_backend(os.environ.get(GPU_BACKEND_ENV_VAR, "opengl"))
    from render_jobs import blender_scene as scene  # the only bpy import, after the redirect and the backend

    scene.disable_auto_run_scripts()
    scratch = Path(tempfile.mkdtemp(prefix="scratch-"))  # in the TMPDIR the supervisor removes after a kill
    try:
        gl = scene.warm_up(scratch)
        software = is_software_gl(gl["gl_renderer"], gl["gl_device_type"])
        texture_filter = scene.set_anisotropic_filter(enabled=not software)
        startup_s = time.perf_counter() - started
        info = WorkerInfo(pid=os.getpid(), bpy_version=scene.bpy.app.version_string, startup_s=startup_s,
                          anisotropic_filter=texture_filter, **gl)
        _send(protocol_out, info)
        for line in sys.stdin.buffer:
            request = decode(line)
            if not isinstance(request, RenderRequest):
                raise ValueError(f"expected a RenderRequest, got {type(request).__name__}")
            _send(protocol_out, render_asset(request, scratch, scene, info))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
