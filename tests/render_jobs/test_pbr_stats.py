"""Which PBR maps a material reads from images (`asset_stats`' has_*_texture flags), on graphs built in bpy.

The real assets' flags are checked in tests/pipelines/test_render_shared_assets.py; these graphs cover what
those files lack (node groups in both directions, muted links, generated images). Nothing is rendered.
"""

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.blender]

REPO = Path(__file__).resolve().parents[2]

_FLAGS_OF_MATERIALS = r"""
import json, sys
from pathlib import Path
import bpy
from render_jobs import blender_scene

folder = Path(sys.argv[1])
on_disk = bpy.data.images.new("on_disk", 4, 4)
on_disk.filepath_raw = str(folder / "on_disk.png")
on_disk.file_format = "PNG"
on_disk.save()
on_disk.source = "FILE"
packed = bpy.data.images.new("packed", 4, 4)
packed.pixels[0] = 0.5  # an untouched generated image does not pack
packed.pack()
assert packed.packed_file is not None and on_disk.source == "FILE"
absent = bpy.data.images.new("absent", 4, 4)
absent.source = "FILE"
absent.filepath = str(folder / "absent.png")
generated = bpy.data.images.new("generated", 4, 4)


def material(name):
    m = bpy.data.materials.new(name)
    m.use_nodes = True
    tree = m.node_tree
    return m, tree, tree.nodes["Principled BSDF"]


def image_node(tree, image):
    node = tree.nodes.new("ShaderNodeTexImage")
    node.image = image
    return node


def color_group(name, with_image):
    # a group with one color input and one color output: passes its input through a Mix, or outputs an image
    group = bpy.data.node_groups.new(name, "ShaderNodeTree")
    group.interface.new_socket("Color", in_out="INPUT", socket_type="NodeSocketColor")
    group.interface.new_socket("Color", in_out="OUTPUT", socket_type="NodeSocketColor")
    inside_in, inside_out = group.nodes.new("NodeGroupInput"), group.nodes.new("NodeGroupOutput")
    mix = group.nodes.new("ShaderNodeMix")
    mix.data_type = "RGBA"
    group.links.new(inside_in.outputs[0], mix.inputs["A"])
    if with_image:
        group.links.new(image_node(group, packed).outputs["Color"], mix.inputs["B"])
    group.links.new(mix.outputs["Result"], inside_out.inputs[0])
    return group


cases = {}

m, tree, bsdf = material("through_mix_and_hue")
hue = tree.nodes.new("ShaderNodeHueSaturation")
mix = tree.nodes.new("ShaderNodeMix")
mix.data_type = "RGBA"
tree.links.new(image_node(tree, on_disk).outputs["Color"], hue.inputs["Color"])
tree.links.new(hue.outputs["Color"], mix.inputs["A"])
tree.links.new(tree.nodes.new("ShaderNodeVertexColor").outputs["Color"], mix.inputs["B"])
tree.links.new(mix.outputs["Result"], bsdf.inputs["Base Color"])
cases[m.name] = m

m, tree, bsdf = material("image_inside_group")
node = tree.nodes.new("ShaderNodeGroup")
node.node_tree = color_group("makes_color", with_image=True)
tree.links.new(node.outputs[0], bsdf.inputs["Base Color"])
cases[m.name] = m

m, tree, bsdf = material("image_through_group_input")
node = tree.nodes.new("ShaderNodeGroup")
node.node_tree = color_group("passes_color", with_image=False)
tree.links.new(image_node(tree, packed).outputs["Color"], node.inputs[0])
tree.links.new(node.outputs[0], bsdf.inputs["Base Color"])
cases[m.name] = m

m, tree, bsdf = material("principled_inside_group")  # image outside, Principled BSDF inside a shader group
group = bpy.data.node_groups.new("shades", "ShaderNodeTree")
group.interface.new_socket("Normal Color", in_out="INPUT", socket_type="NodeSocketColor")
group.interface.new_socket("Shader", in_out="OUTPUT", socket_type="NodeSocketShader")
inside_in, inside_out = group.nodes.new("NodeGroupInput"), group.nodes.new("NodeGroupOutput")
inner_bsdf, normal_map = group.nodes.new("ShaderNodeBsdfPrincipled"), group.nodes.new("ShaderNodeNormalMap")
group.links.new(inside_in.outputs[0], normal_map.inputs["Color"])
group.links.new(normal_map.outputs["Normal"], inner_bsdf.inputs["Normal"])
group.links.new(inner_bsdf.outputs["BSDF"], inside_out.inputs[0])
node = tree.nodes.new("ShaderNodeGroup")
node.node_tree = group
tree.links.new(image_node(tree, on_disk).outputs["Color"], node.inputs[0])
tree.links.new(node.outputs[0], tree.nodes["Material Output"].inputs["Surface"])
cases[m.name] = m

m, tree, bsdf = material("packed_orm")
split = tree.nodes.new("ShaderNodeSeparateColor")
tree.links.new(image_node(tree, packed).outputs["Color"], split.inputs["Color"])
tree.links.new(split.outputs["Green"], bsdf.inputs["Roughness"])
cases[m.name] = m

m, tree, bsdf = material("vertex_colors_only")
tree.links.new(tree.nodes.new("ShaderNodeVertexColor").outputs["Color"], bsdf.inputs["Base Color"])
cases[m.name] = m

m, tree, bsdf = material("absent_and_generated_images")
tree.links.new(image_node(tree, absent).outputs["Color"], bsdf.inputs["Base Color"])
tree.links.new(image_node(tree, generated).outputs["Color"], bsdf.inputs["Roughness"])
tree.links.new(image_node(tree, None).outputs["Color"], bsdf.inputs["Metallic"])
cases[m.name] = m

m, tree, bsdf = material("muted_link_and_unused_bsdf")
link = tree.links.new(image_node(tree, packed).outputs["Color"], bsdf.inputs["Base Color"])
link.is_muted = True
unused = tree.nodes.new("ShaderNodeBsdfPrincipled")  # reaches no material output
tree.links.new(image_node(tree, packed).outputs["Color"], unused.inputs["Base Color"])
cases[m.name] = m

flags = {name: blender_scene._pbr_texture_flags({m}) for name, m in cases.items()}
flags["all_together"] = blender_scene._pbr_texture_flags(set(cases.values()))
print("FLAGS " + json.dumps(flags))
"""


@pytest.fixture(scope="module")
def flags(render_python, tmp_path_factory) -> dict[str, dict[str, bool]]:
    folder = tmp_path_factory.mktemp("pbr_stats")
    completed = subprocess.run([str(render_python), "-c", _FLAGS_OF_MATERIALS, str(folder)], cwd=REPO,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(x for x in completed.stdout.splitlines() if x.startswith("FLAGS "))
    return json.loads(line.removeprefix("FLAGS "))


def _set(flags: dict[str, bool]) -> set[str]:
    return {name.removeprefix("has_").removesuffix("_texture") for name, value in flags.items() if value}


@pytest.mark.parametrize(("material", "expected"), [
    ("through_mix_and_hue", {"base_color"}),
    ("image_inside_group", {"base_color"}),
    ("image_through_group_input", {"base_color"}),
    ("principled_inside_group", {"normal"}),
    ("packed_orm", {"metallic_roughness"}),
    ("vertex_colors_only", set()),
    ("absent_and_generated_images", set()),
    ("muted_link_and_unused_bsdf", set()),
    ("all_together", {"base_color", "metallic_roughness", "normal"}),
])
def test_texture_flags_follow_links_through_nodes_and_groups(flags, material, expected):
    assert _set(flags[material]) == expected
