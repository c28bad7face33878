"""`near relight`: one image and a geometry prior -> a relightable asset, rendered under any environment map.

    image (RGBA) -> DINOv2 condition -> Z_s on the mesh's 64^3 voxels -> Stage 1 -> LH-SLAT -> Stage 2

The mesh is the prior in the factory's canonical frame: Blender world, Z up, the asset's front towards -Y, the
largest side 1 and centred (`normalize`); a mesh that is not normalized is scaled and centred the same way (a
render set's `mesh.ply` already is). The image is conditioned the way the factory's `input` views are:
premultiplied linear RGBA, cropped to 1.2 times its alpha box. Per environment map the outputs are a turntable,
the predicted PBR maps and shadow of the front view, the map turning under the front camera, and the Gaussians
of the front view as a 3DGS PLY.
"""

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import plyfile
import torch
from jaxtyping import Float, Int
from PIL import Image
from torch import Tensor

from encoders.voxelize import voxelize_mesh
from infra.errors import ConfigError, NotFound
from render_jobs.exr import read_channels, read_env_map
from training.eval.media import env_rotation_yaws, pbr_panel, to_uint8, turntable_cameras, write_frames, write_gif
from training.inference import Stage1Predictor, Stage2Renderer, View
from training.stage2.agx import AgX
from training.stage2.export import write_3dgs_ply
from training.stage2.model import Stage2Render

IMAGE_SUFFIXES = (".png", ".webp", ".tif", ".tiff", ".exr")


@dataclasses.dataclass(frozen=True)
class RelightSettings:
    image: Path
    mesh: Path
    stage1_run: Path
    stage2_run: Path
    out_dir: Path
    env_maps: tuple[Path, ...] = ()
    """.exr maps; none: the maps the Stage 2 run's release holds out (never trained on), from the release."""
    views: int = 60
    rotation_frames: int = 36
    resolution_px: int = 512
    fov_deg: float = 40.0
    radius_m: float = 2.0
    elevation_deg: float = 20.0
    fps: int = 20
    seed: int = 0


def load_rgba(path: Path) -> Float[Tensor, "4 H W"]:
    """Premultiplied linear RGBA: an 8/16-bit image is sRGB-decoded, an EXR taken as linear (premultiplied, as
    Blender writes it). Raises ConfigError when there is no alpha channel, naming how to add one."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ConfigError(f"{path}: unsupported image type {path.suffix!r}; give one of {IMAGE_SUFFIXES} with alpha")
    if path.suffix.lower() == ".exr":
        stored = read_channels(path)  # a render set's R, G, B, A, or Blender's <layer>.Combined.<c>
        channels = {c: stored.get(c, next((a for n, a in stored.items() if n.endswith(f"Combined.{c}")), None))
                    for c in "RGBA"}
        if any(channels[c] is None for c in "RGB"):
            raise ConfigError(f"{path}: no R, G, B channels (or a Combined pass) to read the image from")
        if channels["A"] is None:
            raise ConfigError(f"{path} has no alpha (A) channel: render with a transparent film, or cut the object "
                              "out (for example with `rembg`) and save an RGBA PNG")
        rgba = np.stack([channels[c] for c in "RGBA"], axis=0).astype(np.float32)
        return torch.from_numpy(np.nan_to_num(rgba)).clamp_min(0)
    image = Image.open(path)
    if "A" not in image.getbands():
        raise ConfigError(f"{path} has no alpha channel ({image.mode}): the object must be cut out. Remove the "
                          "background (for example `rembg i {path} cutout.png`) and pass the RGBA PNG")
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    linear = np.where(rgba[..., :3] <= 0.04045, rgba[..., :3] / 12.92, ((rgba[..., :3] + 0.055) / 1.055) ** 2.4)
    alpha = rgba[..., 3:]
    return torch.from_numpy(np.concatenate([linear * alpha, alpha], axis=-1)).permute(2, 0, 1)


def load_mesh(path: Path) -> tuple[Float[Tensor, "V 3"], Int[Tensor, "F 3"], dict[str, Any]]:
    """Vertices and triangles of a PLY mesh in the canonical frame (normalized as the factory's `normalize`
    step: largest side 1, centred on its box), and what the normalization did."""
    if path.suffix.lower() != ".ply":
        raise ConfigError(f"{path}: the geometry prior is read as PLY (a render set's mesh.ply); convert it")
    ply = plyfile.PlyData.read(str(path))
    if "vertex" not in ply or "face" not in ply:
        raise ConfigError(f"{path}: a mesh needs vertex and face elements")
    vertex = ply["vertex"]
    vertices = np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=1).astype(np.float64)
    faces = [np.asarray(f) for f in ply["face"].data[ply["face"].properties[0].name]]
    triangles = np.array([(f[0], f[i], f[i + 1]) for f in faces for i in range(1, len(f) - 1)], np.int64)
    if not len(vertices) or not len(triangles):
        raise ConfigError(f"{path}: the mesh has no triangles")
    low, high = vertices.min(0), vertices.max(0)
    scale = 1.0 / float((high - low).max())
    offset = -(low + high) / 2
    normalized = (vertices + offset) * scale
    record = {"scale": scale, "offset": offset.tolist(), "was_normalized": bool(abs(scale - 1) < 1e-3
              and np.abs(offset).max() < 1e-3)}  # fmt: skip
    return torch.from_numpy(normalized).float(), torch.from_numpy(triangles), record


def relight(settings: RelightSettings, *, on_step: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Write every output of `near relight` into `settings.out_dir`; returns the summary written as relight.json."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rgba = load_rgba(settings.image)
    vertices, faces, normalization = load_mesh(settings.mesh)
    on_step("loading the runs")
    stage1 = Stage1Predictor(settings.stage1_run, device)
    stage2 = Stage2Renderer(settings.stage2_run, device)
    if stage2.with_bc_slat:
        raise ConfigError(f"{settings.stage2_run} decodes BC-SLAT too, which Stage 1 does not predict: "
                          "relight with a Stage 2 run trained without `model.decoder.with_bc_slat`")
    maps = _env_maps(settings, stage2)
    on_step("voxelizing the mesh")
    coords = voxelize_mesh(vertices.to(device), faces.to(device), resolution=64).cpu().long()
    if not len(coords):
        raise ConfigError(f"{settings.mesh}: the mesh occupies no voxel")
    on_step(f"sampling Z_s and the LH-SLAT on {len(coords)} voxels")
    seed = int(hashlib.sha256(f"{settings.seed}/{settings.image}".encode()).hexdigest()[:15], 16)
    shaded = stage1.shaded(rgba[None], coords, seed=seed)[0]
    latent = stage1.predict(shaded, coords, stage1.condition(rgba[None]), seed=seed)
    out = settings.out_dir
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "lh_slat.npz", coords=coords.numpy().astype(np.uint8), latent=latent.numpy())
    agx = AgX.from_simple_ocio()
    cameras = turntable_cameras(settings.views, radius_m=settings.radius_m, fov_deg=settings.fov_deg,
                                elevation_deg=settings.elevation_deg)
    front_c2w, front_fov = cameras[0]
    outputs = {}
    for name, rgb in maps.items():
        on_step(f"rendering under {name}")
        folder = out / Path(name).stem
        views = [View(c2w, fov, rgb) for c2w, fov in cameras]
        turntable = stage2.render(latent, coords, views, settings.resolution_px)
        frames = _ldr(agx, turntable)
        write_frames(folder / "turntable", frames, "view")
        write_gif(folder / "turntable.gif", frames, settings.fps)
        front = turntable.sample(0)
        panel = pbr_panel(front.base_color[0], front.roughness[0], front.metallic[0], front.shadow[0])
        Image.fromarray(to_uint8(panel)).save(folder / "pbr.png")
        for buffer in ("base_color", "roughness", "metallic", "shadow"):
            image = getattr(front, buffer)[0].expand(-1, -1, 3)
            Image.fromarray(to_uint8(image)).save(folder / f"{buffer}.png")
        yaws = env_rotation_yaws(settings.rotation_frames)
        turning = stage2.render(latent, coords, [View(front_c2w, front_fov, rgb, yaw) for yaw in yaws],
                                settings.resolution_px)
        rotation = _ldr(agx, turning)
        write_frames(folder / "rotating_env_map", rotation, "yaw")
        write_gif(folder / "rotating_env_map.gif", rotation, settings.fps)
        splats = stage2.splats(latent, coords, View(front_c2w, front_fov, rgb))
        written = write_3dgs_ply(folder / "gaussians.ply", splats, agx)
        outputs[name] = {"folder": str(folder), "turntable": len(frames), "rotation": len(rotation),
                         "gaussians": written}
    summary = {
        "image": str(settings.image), "mesh": str(settings.mesh), "mesh_normalization": normalization,
        "voxels": len(coords), "stage1": stage1.checkpoint.describe(), "stage2": stage2.checkpoint.describe(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()
                     if k != "env_maps"},
        "env_maps": outputs,
    }
    (out / "relight.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def _env_maps(settings: RelightSettings, stage2: Stage2Renderer) -> dict[str, Tensor]:
    """File name -> the map at the tokenizer's size: the given files, else the Stage 2 release's held-out maps."""
    if settings.env_maps:
        missing = [str(p) for p in settings.env_maps if not p.is_file()]
        if missing:
            raise NotFound(f"no env map file at {missing}")
        return {p.name: stage2.resize_map(torch.from_numpy(read_env_map(p))) for p in settings.env_maps}
    from catalogs.release_reader import Release
    from training.eval.runner import held_out_env_maps
    from training.stage2.env_map_store import EnvMapStore

    config = stage2.config
    release = Release.open(config.data_root, stage2.checkpoint.meta["release"]["name"])
    store = EnvMapStore.from_release(release, stage2.map_size)
    held_out = held_out_env_maps(release, store, stage2)
    if not held_out:
        raise ConfigError("the Stage 2 run's release holds out no env map: pass --env-map FILE")
    return {name: store.get(digest) for digest, name in sorted(held_out.items(), key=lambda item: item[1])}


def _ldr(agx: AgX, render: Stage2Render) -> list[np.ndarray]:
    """AgX on black, (H, W, 3) uint8 per view."""
    return [to_uint8(agx(render.radiance[i]).clamp(0, 1)) for i in range(render.radiance.shape[0])]

