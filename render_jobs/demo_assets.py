"""Procedural PBR demo assets, deterministic by seed: the embedded default input of the factory.

Each asset is built here as numpy geometry plus a material whose values are recorded in
`demo_assets.json`, so tests can compare renders against the ground truth:

    diffuse_sphere   Lambertian (no specular) sphere of known albedo: radiance == albedo under E_h
    metal_torus      metallic, low roughness
    rough_cone       rough dielectric
    textured_cube    unit cube, smooth procedural base-color texture, planar UVs (see `cube_uv`)
    open_box         concave: a box without its top, casting shadows on its own inside

Run in the render env: `python -m render_jobs.demo_assets OUT_DIR [--seed N]`.
"""

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_FILE = "demo_assets.json"
TEXTURE_PX = 256


def uv_sphere(radius: float, segments: int = 64, rings: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (V, 3) and quads/triangles (as (F, 4) with repeated last index for triangles)."""
    vertices = [(0.0, 0.0, -radius)]
    for r in range(1, rings):
        theta = math.pi * r / rings - math.pi / 2
        for s in range(segments):
            phi = 2 * math.pi * s / segments
            vertices.append((radius * math.cos(theta) * math.cos(phi), radius * math.cos(theta) * math.sin(phi), radius * math.sin(theta)))
    vertices.append((0.0, 0.0, radius))
    top = len(vertices) - 1
    faces = []
    ring = lambda r, s: 1 + (r - 1) * segments + s % segments  # noqa: E731
    for s in range(segments):
        faces.append((0, ring(1, s + 1), ring(1, s), ring(1, s)))
        faces.append((top, ring(rings - 1, s), ring(rings - 1, s + 1), ring(rings - 1, s + 1)))
        for r in range(1, rings - 1):
            faces.append((ring(r, s), ring(r, s + 1), ring(r + 1, s + 1), ring(r + 1, s)))
    return np.array(vertices), np.array(faces)


def torus(major: float, minor: float, segments: int = 64, sides: int = 24) -> tuple[np.ndarray, np.ndarray]:
    vertices, faces = [], []
    for i in range(segments):
        a = 2 * math.pi * i / segments
        for j in range(sides):
            b = 2 * math.pi * j / sides
            r = major + minor * math.cos(b)
            vertices.append((r * math.cos(a), r * math.sin(a), minor * math.sin(b)))
            faces.append((i * sides + j, ((i + 1) % segments) * sides + j,
                          ((i + 1) % segments) * sides + (j + 1) % sides, i * sides + (j + 1) % sides))
    return np.array(vertices), np.array(faces)


def cone(radius: float, height: float, segments: int = 64) -> tuple[np.ndarray, np.ndarray]:
    ring = [(radius * math.cos(2 * math.pi * s / segments), radius * math.sin(2 * math.pi * s / segments), -height / 2) for s in range(segments)]
    vertices = ring + [(0.0, 0.0, height / 2), (0.0, 0.0, -height / 2)]
    apex, bottom = segments, segments + 1
    faces = [(s, (s + 1) % segments, apex, apex) for s in range(segments)]
    faces += [((s + 1) % segments, s, bottom, bottom) for s in range(segments)]
    return np.array(vertices), np.array(faces)


def open_box(size: float = 1.0, height: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    h = size / 2
    z0, z1 = -height / 2, height / 2
    vertices = np.array([(-h, -h, z0), (h, -h, z0), (h, h, z0), (-h, h, z0), (-h, -h, z1), (h, -h, z1), (h, h, z1), (-h, h, z1)])
    faces = np.array([(0, 3, 2, 1), (0, 1, 5, 4), (1, 2, 6, 5), (2, 3, 7, 6), (3, 0, 4, 7)])  # no top face
    return vertices, faces


def unit_cube() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cube [-0.5, 0.5]^3 as 6 separate quads (24 vertices) with planar UVs from `cube_uv`."""
    vertices, faces, uvs = [], [], []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            a, b = [k for k in range(3) if k != axis]
            quad = np.zeros((4, 3))
            quad[:, axis] = 0.5 * sign
            quad[:, [a, b]] = [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]
            if np.cross(quad[1] - quad[0], quad[2] - quad[0])[axis] * sign < 0:
                quad = quad[::-1]  # wind counter-clockwise seen from outside: the normal points out
            base = len(vertices)
            vertices.extend(quad.tolist())
            uvs.extend(cube_uv(quad, axis).tolist())
            faces.append((base, base + 1, base + 2, base + 3))
    return np.array(vertices), np.array(faces), np.array(uvs)


def cube_uv(points: np.ndarray, axis: int) -> np.ndarray:
    """UV of points (P, 3) on the cube face normal to `axis`: the two other coordinates + 0.5, in axis order."""
    a, b = [k for k in range(3) if k != axis]
    return np.stack([points[:, a] + 0.5, points[:, b] + 0.5], axis=-1)


def texture_params(seed: int) -> dict[str, list[float]]:
    """A smooth RGB pattern: per channel 0.5 + 0.35 sin(2 pi (fu u + fv v) + phase)."""
    rng = np.random.default_rng(seed)
    return {"freq_u": rng.integers(1, 3, size=3).tolist(), "freq_v": rng.integers(1, 3, size=3).tolist(),
            "phase": rng.uniform(0, 2 * math.pi, size=3).tolist()}


def texture_rgb(uv: np.ndarray, params: dict[str, list[float]]) -> np.ndarray:
    """sRGB-encoded texture value (..., 3) at uv (..., 2); the analytic source of the texture image."""
    u, v = uv[..., 0:1], uv[..., 1:2]
    arg = 2 * math.pi * (np.array(params["freq_u"]) * u + np.array(params["freq_v"]) * v) + np.array(params["phase"])
    return 0.5 + 0.35 * np.sin(arg)


def texture_image(params: dict[str, list[float]], size_px: int = TEXTURE_PX) -> np.ndarray:
    """(H, W, 3) texel values at texel centres; row 0 is v = 0 (Blender's image origin is bottom-left)."""
    centres = (np.arange(size_px) + 0.5) / size_px
    u, v = np.meshgrid(centres, centres)
    return texture_rgb(np.stack([u, v], axis=-1), params)


def demo_specs(seed: int = 0) -> list[dict[str, Any]]:
    """Geometry and materials of every demo asset; the numbers tests compare against."""
    rng = np.random.default_rng(seed)
    jitter = lambda base: [float(np.clip(c + rng.uniform(-0.05, 0.05), 0.05, 0.95)) for c in base]  # noqa: E731
    sphere_v, sphere_f = uv_sphere(0.5)
    torus_v, torus_f = torus(0.35, 0.15)
    cone_v, cone_f = cone(0.4, 0.9)
    box_v, box_f = open_box()
    cube_v, cube_f, cube_uvs = unit_cube()
    return [
        dict(name="diffuse_sphere", vertices=sphere_v, faces=sphere_f, smooth=True,
             material=dict(base_color=jitter([0.65, 0.40, 0.20]), roughness=1.0, metallic=0.0, specular_ior_level=0.0)),
        dict(name="metal_torus", vertices=torus_v, faces=torus_f, smooth=True,
             material=dict(base_color=jitter([0.95, 0.64, 0.54]), roughness=0.2, metallic=1.0)),
        dict(name="rough_cone", vertices=cone_v, faces=cone_f, smooth=False,
             material=dict(base_color=jitter([0.20, 0.35, 0.70]), roughness=0.85, metallic=0.0)),
        dict(name="textured_cube", vertices=cube_v, faces=cube_f, uvs=cube_uvs, smooth=False,
             material=dict(base_color=[1.0, 1.0, 1.0], roughness=0.5, metallic=0.0), texture=texture_params(seed)),
        dict(name="open_box", vertices=box_v, faces=box_f, smooth=False,
             material=dict(base_color=jitter([0.80, 0.80, 0.80]), roughness=0.7, metallic=0.0)),
    ]


def write_demo_assets(out_dir: Path, seed: int = 0) -> list[Path]:
    """Build every demo asset as a .glb in `out_dir` and write the manifest. Needs bpy (render env)."""
    from render_jobs import blender_scene

    out_dir.mkdir(parents=True, exist_ok=True)
    paths, manifest = [], {"seed": seed, "assets": {}}
    for spec in demo_specs(seed):
        faces = spec["faces"]
        polygons = [tuple(dict.fromkeys(f)) for f in faces.tolist()]  # repeated last index -> triangle
        uvs = spec.get("uvs")
        texture = texture_image(spec["texture"]) if "texture" in spec else None
        path = out_dir / f"{spec['name']}.glb"
        blender_scene.save_demo_asset(path, spec["vertices"], polygons, uvs, spec["material"], texture, spec["smooth"])
        manifest["assets"][spec["name"]] = {"file": path.name, "material": spec["material"], "texture": spec.get("texture")}
        paths.append(path)
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in write_demo_assets(args.out_dir, args.seed):
        print(path)


if __name__ == "__main__":
    main()
