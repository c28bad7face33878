"""The baseline the render benchmark measures the project against: a plain bpy script, as dataset render scripts
are written, rendering the `lh` views of the same assets with the same samples and resolution.

    <render env python> benchmarks/render_baseline_bpy.py --out DIR --views 32 --resolution 512 --samples 16 ASSET...

Per asset: a factory-empty scene, the importer, scale and centre into [-0.5, 0.5]^3, a uniform white world, the
`lh` rig's Hammersley cameras (radius 2, 40 degree FOV), and per view one `render.render(write_still=True)` of
a multilayer EXR (Blender's defaults: ZIP, half) with beauty + depth + normal. Everything else is EEVEE's default.

It takes part in the benchmark's common window (`benchmarks/render.py`): it renders one view of every asset to
warm up, prints `ready`, waits for `go` on stdin, then renders the assets round and round, one EXR per view
under `--out`, until it is killed. The harness counts the files written between its shared start and stop.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from render_jobs.gpu_backend import select_gpu_backend
from render_jobs.views import hammersley_views


def import_asset(bpy, path: Path) -> None:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    suffix = path.suffix.lower()
    if suffix == ".blend":
        bpy.ops.wm.open_mainfile(filepath=str(path))
    elif suffix in (".glb", ".gltf"):
        bpy.ops.import_scene.gltf(filepath=str(path))
    elif suffix == ".obj":
        bpy.ops.wm.obj_import(filepath=str(path))
    elif suffix == ".fbx":
        bpy.ops.import_scene.fbx(filepath=str(path))
    elif suffix == ".ply":
        bpy.ops.wm.ply_import(filepath=str(path))
    elif suffix == ".stl":
        bpy.ops.wm.stl_import(filepath=str(path))
    else:
        raise ValueError(f"{path}: no importer for {suffix}")


def normalize(bpy) -> None:
    from mathutils import Matrix, Vector

    corners = [obj.matrix_world @ Vector(c) for obj in bpy.context.scene.objects if obj.type == "MESH"
               for c in obj.bound_box]
    lo = np.min([tuple(c) for c in corners], axis=0)
    hi = np.max([tuple(c) for c in corners], axis=0)
    scale = 1.0 / float(np.max(hi - lo))
    transform = Matrix.Translation((-0.5 * (lo + hi) * scale).tolist()) @ Matrix.Scale(scale, 4)
    for obj in bpy.context.scene.objects:
        if obj.parent is None:
            obj.matrix_world = transform @ obj.matrix_world


def set_up_scene(bpy, resolution: int, samples: int):
    from mathutils import Matrix

    scene = bpy.context.scene
    scene.render.engine = "BLENDER_EEVEE"
    scene.render.resolution_x = scene.render.resolution_y = resolution
    scene.render.resolution_percentage = 100
    scene.render.film_transparent = True
    scene.eevee.taa_render_samples = samples
    scene.render.image_settings.media_type = "MULTI_LAYER_IMAGE"
    scene.render.image_settings.color_depth = "16"
    bpy.context.view_layer.use_pass_z = True
    bpy.context.view_layer.use_pass_normal = True
    world = bpy.data.worlds.new("white")
    world.use_nodes = True
    world.node_tree.nodes["Background"].inputs["Color"].default_value = (1.0, 1.0, 1.0, 1.0)
    scene.world = world
    camera = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
    camera.data.sensor_fit = "HORIZONTAL"
    scene.collection.objects.link(camera)
    scene.camera = camera
    return scene, camera, Matrix


def render_asset(bpy, path: Path, views: list, resolution: int, samples: int, out: Path) -> None:
    import_asset(bpy, path)
    normalize(bpy)
    scene, camera, Matrix = set_up_scene(bpy, resolution, samples)
    for i, view in enumerate(views):
        camera.data.angle = view.fov_rad
        camera.matrix_world = Matrix(view.c2w.tolist())
        scene.render.filepath = str(out / f"{path.stem}_{i:03d}.exr")
        bpy.ops.render.render(write_still=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("assets", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--views", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--gpu-backend", choices=("opengl", "vulkan"), default="opengl")
    args = parser.parse_args()
    select_gpu_backend(args.gpu_backend)
    import bpy

    views = hammersley_views(args.views, rng=np.random.default_rng(0))
    warm = args.out / "warm"
    warm.mkdir(parents=True, exist_ok=True)
    for path in args.assets:
        render_asset(bpy, path, views[:1], args.resolution, args.samples, warm)
    print("ready", file=sys.__stdout__, flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    for cycle in range(1_000_000):
        out = args.out / f"cycle{cycle:04d}"
        out.mkdir()
        for path in args.assets:
            render_asset(bpy, path, views, args.resolution, args.samples, out)


if __name__ == "__main__":
    main()
