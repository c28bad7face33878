"""`near demo`: the embedded default job: generate the demo assets, render them with every recipe."""

import dataclasses
import json
import subprocess
from pathlib import Path

from infra.environments import find_render_python
from render_jobs.demo_assets import MANIFEST_FILE
from render_jobs.recipes import RECIPE_NAMES, RecipeConfig, recipe_config


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Small enough to finish in minutes on a CPU-only machine; the paper's sizes are `near render` defaults."""

    resolution_px: int = 128
    samples: int = 8
    lh_views: int = 12
    input_views: int = 4
    relight_views: int = 4
    relight_lightings: int = 2
    seed: int = 0

    def recipes(self) -> list[RecipeConfig]:
        common = dict(resolution_px=self.resolution_px, samples=self.samples, seed=self.seed)
        views = {"lh": self.lh_views, "input": self.input_views, "relight": self.relight_views}
        return [
            recipe_config(name, num_views=views[name], lightings_per_view=self.relight_lightings if name == "relight" else None, **common)
            for name in RECIPE_NAMES
        ]


def generate_demo_assets(out_dir: Path, *, seed: int = 0, render_python: str | None = None) -> list[Path]:
    """Build the procedural demo assets (a bpy job, so it runs in the render env)."""
    python = find_render_python(render_python)
    completed = subprocess.run(
        [str(python), "-m", "render_jobs.demo_assets", str(out_dir), "--seed", str(seed)],
        capture_output=True, text=True, check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"demo asset generation failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    manifest = json.loads((out_dir / MANIFEST_FILE).read_text())
    return [out_dir / entry["file"] for entry in manifest["assets"].values()]
