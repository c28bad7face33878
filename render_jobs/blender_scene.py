"""Everything that touches `bpy`: load and sanitize an asset, normalize it, set up EEVEE, lights and cameras.

This is the only module of the project that imports bpy; it runs in the render env's child process.
What the shadow pass holds, and the sun each env map gets for it: `render_jobs.lighting` (module docstring).
"""

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bpy
import gpu
import numpy as np
from mathutils import Matrix

from infra.errors import AssetRejected, Reason
from render_jobs.cameras import look_at_c2w
from render_jobs.formats import AssetFormat
from render_jobs.lighting import LightingSpec, sun_threshold
from render_jobs.recipes import RecipeConfig
from render_jobs.views import ViewSpec

logger = logging.getLogger(__name__)

ENGINE = "BLENDER_EEVEE"  # Blender 5.0's id (4.2/4.5 called it BLENDER_EEVEE_NEXT)
VIEW_LAYER_AOVS = {"basecolor": "COLOR", "roughness": "VALUE", "metallic": "VALUE"}
_PRINCIPLED_INPUTS = {"basecolor": "Base Color", "roughness": "Roughness", "metallic": "Metallic"}
_AOV_SOCKET = {"COLOR": "Color", "VALUE": "Value"}
_HIDDEN_TYPES = {"CURVE", "SURFACE", "META", "FONT", "POINTCLOUD", "VOLUME", "GREASEPENCIL", "GPENCIL", "CURVES"}
_DROPPED_TYPES = {"CAMERA", "LIGHT", "LIGHT_PROBE", "LIGHTPROBE", "SPEAKER"}
NO_SUN_THRESHOLD = 0.0
"""`world.sun_threshold` that extracts no sun: EEVEE creates its world sun only for a threshold above 0."""


def disable_auto_run_scripts() -> None:
    """Never run Python embedded in a .blend (registered text blocks, scripted drivers)."""
    bpy.context.preferences.filepaths.use_scripts_auto_execute = False


def reset() -> None:
    """Empty the session between assets; keeps preferences (unlike read_factory_settings)."""
    bpy.ops.wm.read_homefile(use_empty=True)


def gl_info() -> dict[str, str]:
    """The GPU backend and implementation EEVEE draws with; only available after a first render."""
    return {
        "gpu_backend": gpu.platform.backend_type_get().lower(),
        "gl_renderer": gpu.platform.renderer_get(),
        "gl_vendor": gpu.platform.vendor_get(),
        "gl_device_type": gpu.platform.device_type_get(),
    }


def set_anisotropic_filter(*, enabled: bool) -> str:
    """Leave Blender's anisotropic texture filtering at its default or turn it off; returns the setting used.

    On llvmpipe the default (FILTER_2) fetches texels from the wrong place of a texture along triangle edges
    (about 1 % of textured pixels at 1 sample); plain trilinear filtering does not. The setting is a user
    preference: set after the warm-up render it holds for every later render, across `reset`.
    """
    system = bpy.context.preferences.system
    if not enabled:
        system.anisotropic_filter = "FILTER_0"
    return system.anisotropic_filter


def warm_up(scratch: Path) -> dict[str, str]:
    """Render one 8x8 frame so the GL context exists and its renderer can be checked."""
    reset()
    scene = bpy.context.scene
    mesh = bpy.data.meshes.new("warm_up")
    mesh.from_pydata([(-0.3, 0, -0.3), (0.3, 0, -0.3), (0, 0, 0.3)], [], [(0, 1, 2)])
    scene.collection.objects.link(bpy.data.objects.new("warm_up", mesh))
    _configure_render(scene, resolution_px=8, samples=1)
    camera = _new_camera(scene)
    camera.matrix_world = Matrix(look_at_c2w(np.array([0.0, -2.0, 0.0])).tolist())
    scene.render.filepath = str(scratch / "warm_up.exr")
    bpy.ops.render.render(write_still=True)
    return gl_info()


# ---------------------------------------------------------------------------------------------------------
# Loading and sanitizing


def load_asset(path: Path, fmt: AssetFormat) -> None:
    """Replace the session with the asset at `path`. Raises AssetRejected(import_error) on any importer failure."""
    path = Path(path).resolve()
    try:
        if fmt == "blend":
            result = bpy.ops.wm.open_mainfile(filepath=str(path), load_ui=False, use_scripts=False)
        else:
            reset()
            result = _IMPORTERS[fmt](filepath=str(path))
    except (RuntimeError, ValueError, TypeError, OSError, UnicodeDecodeError) as err:
        raise AssetRejected(str(path), Reason.IMPORT_ERROR, f"{fmt} importer failed: {err}".strip()) from err
    if "FINISHED" not in result:
        raise AssetRejected(str(path), Reason.IMPORT_ERROR, f"{fmt} importer returned {sorted(result)}")


_IMPORTERS = {
    "glb": lambda filepath: bpy.ops.import_scene.gltf(filepath=filepath),
    "gltf": lambda filepath: bpy.ops.import_scene.gltf(filepath=filepath),
    "obj": lambda filepath: bpy.ops.wm.obj_import(filepath=filepath),
    "fbx": lambda filepath: bpy.ops.import_scene.fbx(filepath=filepath),
    "ply": lambda filepath: bpy.ops.wm.ply_import(filepath=filepath),
    "stl": lambda filepath: bpy.ops.wm.stl_import(filepath=filepath),
    "usd": lambda filepath: bpy.ops.wm.usd_import(filepath=filepath),
    "usda": lambda filepath: bpy.ops.wm.usd_import(filepath=filepath),
    "usdc": lambda filepath: bpy.ops.wm.usd_import(filepath=filepath),
    "usdz": lambda filepath: bpy.ops.wm.usd_import(filepath=filepath),
}


def sanitize() -> dict[str, int]:
    """Keep only what renders as the asset: meshes (posed at frame 0) with their materials and textures.

    Drops cameras, lights and the world, realizes collection instances, removes objects the file hides
    from rendering and hides non-mesh geometry. Returns counts of what was dropped.
    """
    scene = bpy.context.scene
    scene.frame_set(0)
    dropped = {"cameras_lights": 0, "hidden_objects": 0, "non_mesh_objects": 0, "instances_realized": 0}
    dropped["instances_realized"] = _realize_collection_instances()
    for obj in list(scene.objects):
        if obj.type in _DROPPED_TYPES:
            bpy.data.objects.remove(obj, do_unlink=True)
            dropped["cameras_lights"] += 1
    scene.world = None
    view_layer = bpy.context.view_layer
    for obj in list(scene.objects):
        if obj.hide_render:
            if obj.type == "MESH":
                bpy.data.objects.remove(obj, do_unlink=True)
                dropped["hidden_objects"] += 1
            continue
        if obj.type in _HIDDEN_TYPES:
            obj.hide_render = obj.hide_viewport = True
            dropped["non_mesh_objects"] += 1
            continue
        obj.hide_viewport = False  # the viewport depsgraph then holds exactly what renders
        obj.hide_set(False, view_layer=view_layer)
        for modifier in getattr(obj, "modifiers", []):
            modifier.show_viewport = modifier.show_render
            if modifier.type == "SUBSURF":
                modifier.levels = modifier.render_levels
    scene.render.use_single_layer = True
    return dropped


def _realize_collection_instances(max_depth: int = 8) -> int:
    """Turn collection instances (linked ones included) into real objects, nested ones too."""
    realized = 0
    view_layer = bpy.context.view_layer
    for _ in range(max_depth):
        instancers = [o for o in view_layer.objects if o.instance_type == "COLLECTION" and o.instance_collection]
        if not instancers:
            break
        for obj in view_layer.objects:
            obj.select_set(False)
        for obj in instancers:
            obj.select_set(True)
        view_layer.objects.active = instancers[0]
        bpy.ops.object.duplicates_make_real(use_base_parent=True, use_hierarchy=True)
        for obj in instancers:
            obj.instance_type = "NONE"
        realized += len(instancers)
    return realized


def _mesh_instances() -> list[tuple[Any, np.ndarray]]:
    """(evaluated mesh, 4x4 world matrix) of every rendered mesh, instances included."""
    depsgraph = bpy.context.evaluated_depsgraph_get()
    depsgraph.update()
    out = []
    for inst in depsgraph.object_instances:
        obj = inst.object
        if obj.type != "MESH" or obj.original.hide_render or len(obj.data.vertices) == 0:
            continue
        out.append((obj.data, np.array(inst.matrix_world, dtype=np.float64)))
    return out


def _world_vertices(mesh: Any, matrix: np.ndarray) -> np.ndarray:
    co = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
    mesh.vertices.foreach_get("co", co)
    co = co.reshape(-1, 3).astype(np.float64)
    return co @ matrix[:3, :3].T + matrix[:3, 3]


def world_aabb(asset_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) over the world-space vertices of every rendered mesh. Raises empty_scene / nan_bbox."""
    instances = _mesh_instances()
    if not instances:
        raise AssetRejected(asset_id, Reason.EMPTY_SCENE, "no renderable mesh after sanitizing")
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    for mesh, matrix in instances:
        points = _world_vertices(mesh, matrix)
        lo, hi = np.minimum(lo, points.min(0)), np.maximum(hi, points.max(0))
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise AssetRejected(asset_id, Reason.NAN_BBOX, f"bounding box is not finite: {lo} {hi}")
    if float(np.max(hi - lo)) <= 0.0:
        raise AssetRejected(asset_id, Reason.EMPTY_SCENE, "all mesh vertices coincide")
    return lo, hi


def normalize(asset_id: str) -> dict[str, Any]:
    """Scale and centre the asset into [-0.5, 0.5]^3 (largest side 1): p_norm = scale * p + offset."""
    lo, hi = world_aabb(asset_id)
    scale = 1.0 / float(np.max(hi - lo))
    offset = -0.5 * (lo + hi) * scale
    transform = Matrix.Translation(offset.tolist()) @ Matrix.Scale(scale, 4)
    for obj in bpy.context.scene.objects:
        if obj.parent is None:
            obj.matrix_world = transform @ obj.matrix_world
    bpy.context.view_layer.update()
    lo_n, hi_n = world_aabb(asset_id)
    return {"scale": scale, "offset": offset.tolist(), "aabb_source": [lo.tolist(), hi.tolist()],
            "aabb": [lo_n.tolist(), hi_n.tolist()]}


def mesh_arrays() -> tuple[np.ndarray, np.ndarray]:
    """World-space triangle soup of everything that renders: vertices (V, 3) float32, faces (F, 3) int32."""
    vertices, faces, base = [], [], 0
    for mesh, matrix in _mesh_instances():
        mesh.calc_loop_triangles()
        tris = np.empty(len(mesh.loop_triangles) * 3, dtype=np.int32)
        mesh.loop_triangles.foreach_get("vertices", tris)
        vertices.append(_world_vertices(mesh, matrix).astype(np.float32))
        faces.append(tris.reshape(-1, 3) + base)
        base += len(mesh.vertices)
    return np.concatenate(vertices), np.concatenate(faces)


def asset_stats() -> dict[str, Any]:
    """Vertices, faces, materials, textures and missing textures of what renders, and which PBR maps it has.

    Textures are every image the file holds with users (material nodes, legacy texture slots, UV editors):
    an image a file references but cannot find is a missing texture wherever it is referenced from.
    `has_base_color_texture`, `has_metallic_roughness_texture` and `has_normal_texture` say whether some
    rendered material shades through a Principled BSDF whose input of that kind is fed by an image that exists
    (see `_pbr_texture_flags`); run it after `rebuild_missing_shader_groups` so rebuilt materials count.
    """
    instances = _mesh_instances()
    materials = set()
    for obj in bpy.context.scene.objects:
        if obj.type == "MESH" and not obj.hide_render:
            materials.update(slot.material for slot in obj.material_slots if slot.material)
    images = [img for img in bpy.data.images if img.users > 0 and img.source not in ("VIEWER",)]
    missing = sorted(img.name for img in images if _is_missing(img))
    return {
        "vertices": sum(len(m.vertices) for m, _ in instances),
        "faces": sum(len(m.polygons) for m, _ in instances),
        "mesh_instances": len(instances),
        "materials": len(materials),
        "textures": len(images),
        "missing_textures": len(missing),
        "missing_texture_names": missing,
        **_pbr_texture_flags(materials),
    }


def _is_missing(image: Any) -> bool:
    if image.packed_file or image.source not in ("FILE", "SEQUENCE", "MOVIE"):
        return False
    return not os.path.isfile(bpy.path.abspath(image.filepath, library=image.library))


_PBR_TEXTURE_INPUTS = {
    "has_base_color_texture": ("Base Color",),
    "has_metallic_roughness_texture": ("Metallic", "Roughness"),  # glTF packs both in one image (G, B)
    "has_normal_texture": ("Normal",),  # through a Normal Map (or Bump) node
}
_MAX_GROUP_DEPTH = 8
"""Node groups nested deeper than this are not entered when tracing what feeds a socket."""


def _pbr_texture_flags(materials: set[Any]) -> dict[str, bool]:
    """For each flag of _PBR_TEXTURE_INPUTS: does a material's Principled BSDF read that input from an image?

    Only Principled BSDFs that shade the surface count (upstream of the active material output, node groups
    included). An input counts when an Image Texture node with an existing image (packed, or a file on disk)
    lies anywhere upstream of it: through mix, math, separate-color or normal-map nodes and through node
    groups. Vertex colors, procedural textures and images that are missing or only generated are not textures.
    """
    flags = dict.fromkeys(_PBR_TEXTURE_INPUTS, False)
    for material in materials:
        tree = material.node_tree
        if tree is None:
            continue
        outputs = [n for n in tree.nodes if n.type == "OUTPUT_MATERIAL" and n.is_active_output] or [
            n for n in tree.nodes if n.type == "OUTPUT_MATERIAL"
        ]
        surfaces = [(n.inputs["Surface"], ()) for n in outputs]
        for bsdf, path in _upstream_nodes(surfaces):
            if bsdf.type != "BSDF_PRINCIPLED":
                continue
            for flag, names in _PBR_TEXTURE_INPUTS.items():
                sockets = [(bsdf.inputs[name], path) for name in names if name in bsdf.inputs]
                images = (node.image for node, _ in _upstream_nodes(sockets) if node.type == "TEX_IMAGE")
                flags[flag] = flags[flag] or any(_has_pixels(image) for image in images)
    return flags


def _has_pixels(image: Any) -> bool:
    """The image holds pixels the file brings: packed, or a file (sequence, movie, UDIM tiles) that exists."""
    if image is None:
        return False
    if image.packed_file:
        return True
    return image.source in ("FILE", "SEQUENCE", "MOVIE", "TILED") and not _is_missing(image)


def _upstream_nodes(sockets: list[tuple[Any, tuple[Any, ...]]]) -> Iterator[tuple[Any, tuple[Any, ...]]]:
    """Every node whose output reaches one of `sockets`, with the group nodes it is inside (outermost first).

    Each socket comes with its own group path. Links go into a node group (a group node's output continues at
    the group's output node) and out of it (the group's input node continues at the group node's input);
    muted links are skipped and muted nodes pass through only their internal links.
    """
    stack = list(sockets)
    seen_sockets, seen_nodes = set(), set()
    while stack:
        socket, path = stack.pop()
        key = (socket.as_pointer(), tuple(n.as_pointer() for n in path))
        if key in seen_sockets:
            continue
        seen_sockets.add(key)
        for link in socket.links:
            if link.is_muted or not link.is_valid:
                continue
            node, from_socket = link.from_node, link.from_socket
            if node.mute:
                through = [il.from_socket for il in node.internal_links if il.to_socket == from_socket]
                stack.extend((s, path) for s in through)
            elif node.type == "GROUP":
                if node.node_tree is not None and len(path) < _MAX_GROUP_DEPTH:
                    inner = [n for n in node.node_tree.nodes if n.type == "GROUP_OUTPUT"]
                    inner = [n for n in inner if n.is_active_output] or inner
                    stack.extend((s, (*path, node)) for n in inner for s in n.inputs
                                 if s.identifier == from_socket.identifier)
            elif node.type == "GROUP_INPUT":
                if path:  # leave the group through the group node's input of the same identifier
                    outer = [s for s in path[-1].inputs if s.identifier == from_socket.identifier]
                    stack.extend((s, path[:-1]) for s in outer)
            else:
                node_key = (node.as_pointer(), key[1])
                if node_key not in seen_nodes:
                    seen_nodes.add(node_key)
                    yield node, path
                    stack.extend((s, path) for s in node.inputs)


# ---------------------------------------------------------------------------------------------------------
# Materials: shading from node groups whose library is missing


def rebuild_missing_shader_groups() -> list[str]:
    """Replace shader node groups whose library is missing by a Principled BSDF wired from the group's inputs.

    Old glTF importers shaded through a group ("glTF Metallic Roughness") linked from a library that GitHub
    assets rarely ship; Blender keeps the group node and its links but the empty placeholder renders black.
    The group's input names say what its textures are (base color, packed metallic-roughness, normal, ...),
    which is enough to rebuild the intended material. Returns the names of the materials rebuilt.
    """
    rebuilt = []
    for material in bpy.data.materials:
        tree = material.node_tree
        if tree is None or material.library is not None:
            continue
        shading = [n for n in tree.nodes if n.type == "GROUP" and _is_missing_group(n.node_tree)
                   and any(socket.is_linked for socket in n.outputs)]
        for group in shading:
            _replace_with_principled(tree, group)
        if shading:
            rebuilt.append(material.name)
    return rebuilt


def _is_missing_group(group_tree: Any) -> bool:
    return group_tree is None or group_tree.is_missing or len(group_tree.nodes) == 0


_GROUP_INPUT_ROLES = {
    "basecolor": "Base Color", "basecolour": "Base Color", "color": "Base Color", "diffuse": "Base Color",
    "albedo": "Base Color", "metallic": "Metallic", "metalness": "Metallic", "roughness": "Roughness",
    "emissive": "Emission Color", "emission": "Emission Color", "alpha": "Alpha", "opacity": "Alpha",
    "normal": "normal_map", "metallicroughness": "packed_orm", "occlusionroughnessmetallic": "packed_orm",
}


def _replace_with_principled(tree: Any, group: Any) -> None:
    bsdf = tree.nodes.new("ShaderNodeBsdfPrincipled")
    bsdf.location = group.location
    for socket in group.inputs:
        role = _GROUP_INPUT_ROLES.get(socket.name.lower().replace(" ", "").replace("_", ""))
        if role is None:
            continue
        source = socket.links[0].from_socket if socket.is_linked else None
        if role == "packed_orm":  # glTF packing: G = roughness, B = metallic
            if source is not None:
                split = tree.nodes.new("ShaderNodeSeparateColor")
                tree.links.new(source, split.inputs["Color"])
                tree.links.new(split.outputs["Green"], bsdf.inputs["Roughness"])
                tree.links.new(split.outputs["Blue"], bsdf.inputs["Metallic"])
        elif role == "normal_map":
            if source is not None:
                normal_map = tree.nodes.new("ShaderNodeNormalMap")
                tree.links.new(source, normal_map.inputs["Color"])
                tree.links.new(normal_map.outputs["Normal"], bsdf.inputs["Normal"])
        elif source is not None:
            tree.links.new(source, bsdf.inputs[role])
            if role == "Emission Color":
                bsdf.inputs["Emission Strength"].default_value = 1.0
        elif hasattr(socket, "default_value"):
            _copy_value(socket.default_value, bsdf.inputs[role])
    for output in group.outputs:
        for link in output.links:
            tree.links.new(bsdf.outputs["BSDF"], link.to_socket)
    tree.nodes.remove(group)


def _copy_value(value: Any, target: Any) -> None:
    """Copy an unlinked group input's value when its kind (scalar or vector of the same size) matches."""
    if isinstance(target.default_value, float):
        if isinstance(value, (int, float)):
            target.default_value = float(value)
    elif not isinstance(value, (int, float)) and len(value) == len(target.default_value):
        target.default_value = tuple(value)


# ---------------------------------------------------------------------------------------------------------
# Materials: shader AOVs that read whatever feeds the Principled BSDF


def add_material_aovs(names: tuple[str, ...]) -> None:
    """Give every rendered mesh a material and every material AOV outputs for `names` (of VIEW_LAYER_AOVS).

    Only the AOVs a recipe stores are wired: each one costs shader work and a render pass on every sample.
    """
    unknown = set(names) - set(VIEW_LAYER_AOVS)
    if unknown:
        raise ValueError(f"unknown AOVs {sorted(unknown)}; expected some of {sorted(VIEW_LAYER_AOVS)}")
    default = None
    for obj in bpy.context.scene.objects:
        if obj.type != "MESH" or obj.hide_render:
            continue
        if not obj.material_slots:
            default = default or _default_material()
            if obj.data.library is None:
                obj.data.materials.append(default)
        for slot in obj.material_slots:
            if slot.material is None:
                default = default or _default_material()
                slot.link = "OBJECT"
                slot.material = default
    if not names:
        return
    view_layer = bpy.context.view_layer
    for name in names:
        aov = view_layer.aovs.add()
        aov.name, aov.type = name, VIEW_LAYER_AOVS[name]
    done = set()
    for obj in bpy.context.scene.objects:
        for slot in getattr(obj, "material_slots", []):
            if slot.material and slot.material not in done:
                done.add(slot.material)
                _wire_aovs(slot.material, names)


def render_both_sides_with_depth() -> int:
    """Render every face from both sides and let every material write depth; returns the materials changed.

    Back-face culling (glTF's single-sided materials) hides faces the voxelization keeps, so their voxels would
    gather background features; TRELLIS renders with Cycles, which never culls. Blended transparency writes
    no depth in EEVEE (the far clip lands in the depth pass) and casts no AO, so it becomes dithered.
    Linked materials are read-only and stay as they are.
    """
    changed = 0
    for material in bpy.data.materials:
        if material.library is not None:
            continue
        if material.use_backface_culling or material.surface_render_method == "BLENDED":
            material.use_backface_culling = False
            material.surface_render_method = "DITHERED"
            changed += 1
    return changed


def _default_material() -> Any:
    material = bpy.data.materials.new("near_default")
    material.use_nodes = True
    return material


def _wire_aovs(material: Any, names: tuple[str, ...]) -> None:
    if material.library is not None:
        material = material.make_local()  # linked materials are read-only; a local copy can take AOV nodes
    if material.node_tree is None:
        material.use_nodes = True
    tree = material.node_tree
    bsdf = _surface_bsdf(tree)
    for name in names:
        kind = VIEW_LAYER_AOVS[name]
        node = tree.nodes.new("ShaderNodeOutputAOV")
        node.aov_name = name  # .name would only rename the node
        target = node.inputs[_AOV_SOCKET[kind]]
        source = _bsdf_input(bsdf, name)
        if source is not None and source.is_linked:
            tree.links.new(source.links[0].from_socket, target)
        elif source is not None:
            value = source.default_value
            target.default_value = tuple(value) if kind == "COLOR" else float(value)
        else:
            target.default_value = (0.8, 0.8, 0.8, 1.0) if kind == "COLOR" else (1.0 if name == "roughness" else 0.0)


def _surface_bsdf(tree: Any) -> Any:
    """The Principled BSDF closest to the active material output, else the first BSDF with a Color input."""
    outputs = [n for n in tree.nodes if n.type == "OUTPUT_MATERIAL" and n.is_active_output] or [
        n for n in tree.nodes if n.type == "OUTPUT_MATERIAL"
    ]
    frontier = [link.from_node for n in outputs for link in n.inputs["Surface"].links]
    seen, fallback = set(), None
    while frontier:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if node.type == "BSDF_PRINCIPLED":
            return node
        if fallback is None and "Color" in node.inputs and node.type.startswith(("BSDF", "EMISSION")):
            fallback = node
        frontier.extend(link.from_node for socket in node.inputs for link in socket.links)
    return next((n for n in tree.nodes if n.type == "BSDF_PRINCIPLED"), fallback)


def _bsdf_input(bsdf: Any, aov_name: str) -> Any:
    if bsdf is None:
        return None
    if bsdf.type == "BSDF_PRINCIPLED":
        return bsdf.inputs[_PRINCIPLED_INPUTS[aov_name]]
    name = {"basecolor": "Color", "roughness": "Roughness"}.get(aov_name)
    return bsdf.inputs.get(name) if name else None


# ---------------------------------------------------------------------------------------------------------
# Render set-up: engine, passes, camera, lighting


def _configure_render(scene: Any, *, resolution_px: int, samples: int) -> None:
    render = scene.render
    render.engine = ENGINE
    render.resolution_x = render.resolution_y = resolution_px
    render.resolution_percentage = 100
    render.film_transparent = True
    render.use_compositing = False
    render.use_sequencer = False
    render.use_motion_blur = False
    eevee = scene.eevee
    eevee.taa_render_samples = samples
    eevee.use_raytracing = True
    eevee.ray_tracing_method = "SCREEN"
    eevee.use_shadows = True
    if hasattr(eevee, "use_fast_gi"):
        eevee.use_fast_gi = True
    scene.view_settings.view_transform = "Standard"  # EXR stays scene-linear; this only affects previews
    scene.view_settings.look = "None"
    settings = render.image_settings
    settings.media_type = "MULTI_LAYER_IMAGE"
    settings.color_depth = "16"  # colour passes as half, as stored; Blender keeps depth, normal and value AOVs float
    settings.exr_codec = "NONE"  # a scratch file read back at once: no time spent compressing


def _new_camera(scene: Any) -> Any:
    data = bpy.data.cameras.new("near_camera")
    data.sensor_fit = "HORIZONTAL"
    data.sensor_width = data.sensor_height = 32.0
    data.clip_start, data.clip_end = 0.1, 100.0
    camera = bpy.data.objects.new("near_camera", data)
    scene.collection.objects.link(camera)
    scene.camera = camera
    return camera


class RenderRig:
    """Camera, worlds and lights of one asset's render; `render` writes one multilayer EXR per frame."""

    def __init__(self, recipe: RecipeConfig, env_map_paths: dict[str, Path]) -> None:
        self.scene = bpy.context.scene
        self.env_map_paths = env_map_paths
        _configure_render(self.scene, resolution_px=recipe.resolution_px, samples=recipe.samples)
        view_layer = bpy.context.view_layer
        self.view_layer_name = view_layer.name  # files from older Blender call it "View Layer"
        view_layer.use_pass_combined = True
        view_layer.use_pass_z = "depth" in recipe.passes
        view_layer.use_pass_normal = "normal" in recipe.passes
        view_layer.use_pass_shadow = "shadow" in recipe.passes
        self.camera = _new_camera(self.scene)
        self.homogenized_world = self._uniform_world()
        self.env_world, self.env_node, self.env_mapping = self._env_world()
        self.lights: list[Any] = []
        self.lighting: LightingSpec | None = None
        self.sun_threshold: float | None = None
        """The current frame's `world.sun_threshold` (env maps with a dominant light), else None."""
        self._sun_thresholds: dict[tuple[str, float], float | None] = {}

    def _uniform_world(self) -> Any:
        world = bpy.data.worlds.new("near_homogenized")
        world.use_nodes = True
        background = world.node_tree.nodes["Background"]
        background.inputs["Color"].default_value = (1.0, 1.0, 1.0, 1.0)
        world.sun_threshold = 1e9  # a uniform sky has no sun to extract (and so nothing that casts a shadow map)
        return world

    def _env_world(self) -> tuple[Any, Any, Any]:
        world = bpy.data.worlds.new("near_env_map")
        world.use_nodes = True
        nodes, links = world.node_tree.nodes, world.node_tree.links
        coords = nodes.new("ShaderNodeTexCoord")
        mapping = nodes.new("ShaderNodeMapping")
        mapping.vector_type = "POINT"
        env = nodes.new("ShaderNodeTexEnvironment")
        links.new(coords.outputs["Generated"], mapping.inputs["Vector"])
        links.new(mapping.outputs["Vector"], env.inputs["Vector"])
        links.new(env.outputs["Color"], nodes["Background"].inputs["Color"])
        world.use_sun_shadow = True  # the extracted sun is an env map's only shadow-casting light
        return world, env, mapping

    def _env_sun_threshold(self, name: str, image: Any, strength: float) -> float | None:
        """`lighting.sun_threshold` of the loaded map `image` at `strength`, once per (map, strength)."""
        key = (name, strength)
        if key not in self._sun_thresholds:
            self._sun_thresholds[key] = sun_threshold(_image_rgb(image), strength=strength)
        return self._sun_thresholds[key]

    def set_view(self, view: ViewSpec) -> None:
        self.camera.data.angle = view.fov_rad
        self.camera.matrix_world = Matrix(view.c2w.tolist())

    def set_lighting(self, lighting: LightingSpec) -> None:
        """Switch to `lighting`; a no-op when it is already set (all of `lh` shares one lighting)."""
        if lighting == self.lighting:
            return
        for light in self.lights:
            bpy.data.objects.remove(light, do_unlink=True)
        self.lights = []
        self.sun_threshold = None
        # Shadow maps serve lamps and the sun EEVEE extracts from a world; the uniform world has neither, and
        # updating the shadow atlas every sample is most of a frame's cost on some GL drivers.
        self.scene.eevee.use_shadows = lighting.kind != "homogenized"
        if lighting.kind == "homogenized":
            self.scene.world = self.homogenized_world
            self.homogenized_world.node_tree.nodes["Background"].inputs["Strength"].default_value = lighting.strength
        elif lighting.kind == "env_map":
            self.scene.world = self.env_world
            image = bpy.data.images.load(str(self.env_map_paths[lighting.env_map]), check_existing=True)
            self.env_node.image = image
            threshold = self._env_sun_threshold(lighting.env_map, image, lighting.strength)
            self.env_world.sun_threshold = NO_SUN_THRESHOLD if threshold is None else threshold
            self.sun_threshold = threshold
            # Rotating the lookup direction by -yaw turns the environment by +yaw (module docstring of lighting).
            self.env_mapping.inputs["Rotation"].default_value = (0.0, 0.0, -lighting.yaw_rad)
            self.env_world.node_tree.nodes["Background"].inputs["Strength"].default_value = lighting.strength
        else:
            self.scene.world = None
            for i, spec in enumerate(lighting.lights):
                data = bpy.data.lights.new(f"near_area_{i}", type="AREA")
                data.shape, data.size, data.energy = "SQUARE", spec.size_m, spec.power_w
                light = bpy.data.objects.new(f"near_area_{i}", data)
                light.matrix_world = Matrix(look_at_c2w(np.array(spec.location_m)).tolist())  # emits along -Z
                self.scene.collection.objects.link(light)
                self.lights.append(light)
        self.lighting = lighting

    def render(self, path: Path) -> None:
        self.scene.render.filepath = str(path)
        bpy.ops.render.render(write_still=True)


def _image_rgb(image: Any) -> np.ndarray:
    """(H, W, 3) float32 scene-linear pixels of a loaded image, row 0 at the top (Blender's is the bottom)."""
    width, height = image.size
    channels = image.channels
    pixels = np.empty(width * height * channels, dtype=np.float32)
    image.pixels.foreach_get(pixels)
    pixels = pixels.reshape(height, width, channels)[::-1]
    return pixels[..., :3] if channels >= 3 else np.repeat(pixels[..., :1], 3, axis=2)


def bundled_env_maps() -> dict[str, Path]:
    """The CC0 HDRIs that bpy ships (datafiles/studiolights/world), by file name."""
    folder = Path(bpy.utils.system_resource("DATAFILES", path="studiolights/world"))
    return {p.name: p for p in sorted(folder.glob("*.exr"))}


# ---------------------------------------------------------------------------------------------------------
# Demo assets


def save_demo_asset(
    path: Path,
    vertices: np.ndarray,  # (V, 3) float
    faces: list[tuple[int, ...]],  # polygons, 3 or more corners each
    uvs: np.ndarray | None,  # (F * k, 2) float, one per face corner
    material: dict[str, Any],
    texture_rgb: np.ndarray | None,  # (H, W, 3) float in [0, 1], sRGB-encoded, row 0 at v = 0
    smooth: bool,
) -> None:
    """Write one procedural asset as a binary glTF with its texture embedded.

    glTF rather than .blend: a .blend holds run-time memory addresses, so the same seed would give different
    bytes, hence a different `source_id`, on every generation; the glTF writer is byte-deterministic.
    """
    reset()
    name = Path(path).stem
    mesh = bpy.data.meshes.new(name)
    mesh.from_pydata(vertices.tolist(), [], faces)
    if uvs is not None:
        layer = mesh.uv_layers.new(name="UVMap")
        layer.data.foreach_set("uv", np.asarray(uvs, dtype=np.float32).ravel())
    mesh.polygons.foreach_set("use_smooth", [smooth] * len(mesh.polygons))
    mesh.update()
    obj = bpy.data.objects.new(name, mesh)
    bpy.context.scene.collection.objects.link(obj)
    mat = bpy.data.materials.new(f"{name}_material")
    mat.use_nodes = True
    bsdf = mat.node_tree.nodes["Principled BSDF"]
    bsdf.inputs["Base Color"].default_value = (*material["base_color"], 1.0)
    bsdf.inputs["Roughness"].default_value = material["roughness"]
    bsdf.inputs["Metallic"].default_value = material["metallic"]
    bsdf.inputs["Specular IOR Level"].default_value = material.get("specular_ior_level", 0.5)
    if texture_rgb is not None:
        h, w, _ = texture_rgb.shape
        image = bpy.data.images.new(f"{name}_basecolor", w, h, alpha=True)
        rgba = np.concatenate([texture_rgb, np.ones((h, w, 1))], axis=2).astype(np.float32)
        image.pixels.foreach_set(rgba.ravel())
        tex = mat.node_tree.nodes.new("ShaderNodeTexImage")
        tex.image = image
        mat.node_tree.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    mesh.materials.append(mat)
    bpy.ops.export_scene.gltf(filepath=str(path), export_format="GLB", use_selection=False)
