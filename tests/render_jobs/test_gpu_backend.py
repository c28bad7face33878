"""Choosing Blender's GPU backend in the render child: the switch is found in the bpy module, OpenGL stays the
default, Vulkan renders the same images, and a Vulkan request without a driver fails clearly."""

import glob
import json
import os
import subprocess

import numpy as np
import pytest

from pipelines.local_render import render_files
from render_jobs.recipes import recipe_config
from render_jobs.render_set import RenderSet
from render_jobs.supervisor import RenderSupervisor, RenderWorkerConfig

pytestmark = [pytest.mark.blender, pytest.mark.slow]

TINY = recipe_config("lh", num_views=1, resolution_px=32, samples=2)
VULKAN_DRIVERS = [p for d in ("/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d") for p in glob.glob(f"{d}/*.json")]


def test_backend_switch_is_found_in_the_bpy_module(render_python):
    code = ("import importlib.util, json; from render_jobs.gpu_backend import _ANCHOR, _OVERRIDE, _symbol_offsets; "
            "print(json.dumps(_symbol_offsets(importlib.util.find_spec('bpy').origin, (_ANCHOR, _OVERRIDE))))")
    offsets = json.loads(subprocess.run([str(render_python), "-c", code], capture_output=True, text=True, check=True).stdout)
    assert len(set(offsets.values())) == 2 and min(offsets.values()) > 0


def test_opengl_is_the_default(supervisor):
    assert supervisor.start().gpu_backend == "opengl"


def test_vulkan_without_a_driver_fails_every_asset_with_a_reason(tmp_path, demo_assets, render_python):
    cfg = RenderWorkerConfig(render_python=str(render_python), allow_software_gl=True, gpu_backend="vulkan")
    no_driver = {"VK_DRIVER_FILES": str(tmp_path / "no_such_icd.json"), "VK_ICD_FILENAMES": str(tmp_path / "no_such_icd.json")}
    with RenderSupervisor(cfg, env=no_driver) as supervisor:
        record = next(render_files([demo_assets["diffuse_sphere"]], TINY, tmp_path / "out", worker=cfg, supervisor=supervisor))
    assert record.result.reason == "gpu_backend_unavailable"
    assert "vulkan" in record.result.message and "opengl" in record.result.message


@pytest.mark.skipif(not VULKAN_DRIVERS and not os.environ.get("VK_DRIVER_FILES"), reason="no Vulkan driver (ICD) here")
def test_vulkan_renders_the_same_images_as_opengl(tmp_path, demo_assets, render_python, supervisor, worker_config):
    asset = demo_assets["textured_cube"]
    opengl = next(render_files([asset], TINY, tmp_path / "gl", worker=worker_config, supervisor=supervisor))
    cfg = worker_config.replace(gpu_backend="vulkan")
    with RenderSupervisor(cfg) as vulkan_supervisor:
        vulkan = next(render_files([asset], TINY, tmp_path / "vk", worker=cfg, supervisor=vulkan_supervisor))
        assert vulkan_supervisor.info.gpu_backend == "vulkan"
    assert opengl.result.is_ok and vulkan.result.is_ok, vulkan.result.message
    gl_frame = RenderSet.open(opengl.result.out_dir).frames[0]
    vk_frame = RenderSet.open(vulkan.result.out_dir).frames[0]
    for pass_name in ("beauty", "alpha", "basecolor"):
        assert np.abs(gl_frame.load(pass_name) - vk_frame.load(pass_name)).max() < 2e-2, pass_name
