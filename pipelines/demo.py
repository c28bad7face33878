"""`near demo`: the embedded default job: demo assets, small random-weight models, a build config, the build.

Everything runs on this machine (local Ray, SQLite catalog, local disk). No weights can be downloaded, so the
demo writes a small DINOv2 and SLAT encoder with random weights, marked random: its latents exercise the whole
factory but mean nothing. `<out>/build.yaml` is an ordinary build config: edit it and run `near build`.
"""

import dataclasses
import json
import subprocess
from pathlib import Path

import yaml

from infra.environments import find_render_python
from render_jobs.demo_assets import MANIFEST_FILE

DEMO_DINOV2 = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 2}
"""Small enough for a CPU; the real model is ViT-L/14 with registers (`encoders.dinov2.VITL14_REG`)."""
DEMO_STAGE2_MODEL = {
    "decoder": {"model_channels": 48, "num_heads": 3, "intrinsic_blocks": 2, "lighting_blocks": 2, "num_registers": 4},
    "tokenizer": {
        "map_size": [32, 64], "convnext_depths": [1, 1, 1, 1], "convnext_dims": [16, 16, 32, 32], "width": 48,
        "num_heads": 3, "self_attention_blocks": 1,
    },
    "heads": {"gaussians_per_voxel": 4, "color_feature_channels": 16, "radiance_hidden": 32},
}  # fmt: skip
"""Stage 2 at a CPU size; the paper's (12 + 6 blocks of width 768, 4096 lighting tokens) is the default."""


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Small enough to finish in minutes on a CPU-only machine; the paper's sizes are the build defaults."""

    resolution_px: int = 128
    samples: int = 8
    lh_views: int = 12
    input_views: int = 4
    relight_views: int = 4
    relight_lightings: int = 2
    shaded_views: int = 2
    shaded_steps: int = 8
    seed: int = 0
    input_seed: int = 3
    """Lights the first two input views of the open box, the demo's test asset, with env maps: `near eval`'s
    reconstruction task compares against env-map-lit views only."""
    test_percent: float = 20.0
    """Of the five demo assets, the split rule makes the open box the one test asset at this share."""

    def write_build_config(self, out: Path) -> Path:
        """Write the demo models (once) and `<out>/build.yaml`; returns the YAML's path."""
        models = write_demo_models(out / "models", seed=self.seed)
        common = {"resolution_px": self.resolution_px, "samples": self.samples, "seed": self.seed}
        config = {
            "data_root": "data",
            "source": {"kind": "demo", "path": "assets", "seed": self.seed},
            "recipes": {
                "lh": {**common, "num_views": self.lh_views},
                "input": {**common, "num_views": self.input_views, "seed": self.input_seed},
                "relight": {
                    **common,
                    "num_views": self.relight_views,
                    "lightings_per_view": self.relight_lightings,
                },
            },
            "models": {name: str(path.relative_to(out)) for name, path in models.items()},
            "shaded": {"views": self.shaded_views, "sampler": {"steps": self.shaded_steps}},
            "release": {"name": f"demo-seed{self.seed}", "test_percent": self.test_percent, "val_percent": 0},
            "execution": {"allow_software_gl": True},
        }
        path = out / "build.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def write_stage2_config(self, out: Path) -> Path:
        """`<out>/stage2.yaml`: Stage 2 at a CPU size on the demo release (validating on its training assets);
        the environment maps come from the release. The CPU rasterizer blends every
        pixel with every Gaussian of its tile, so a CPU run is a short smoke run: real training wants gsplat."""
        config = {
            "data_root": "data",
            "out_dir": "runs/stage2",
            "model": DEMO_STAGE2_MODEL,
            "steps": 40,
            "batch_size": 2,
            "lr": 2e-3,
            "warmup_steps": 5,
            "val_split": "train",
            "val_samples": 4,
            "val_every": 20,
            "checkpoint_every": 20,
            "image_every": 20,
        }
        path = out / "stage2.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def write_stage1_config(self, out: Path) -> Path:
        """`<out>/stage1.yaml`: Stage 1 at a CPU size on the demo release, for `near train stage1`. The demo
        release is too small for a validation split, so it validates on its training assets (an overfit check)."""
        config = {
            "data_root": "data",
            "out_dir": "runs/stage1",
            "base_model": "models/slat-flow-demo.safetensors",
            "dinov2": "models/dinov2-demo",
            "lora": {"rank": 16, "alpha": 16.0},
            "steps": 200,
            "batch_size": 2,
            "lr": 1e-3,
            "val_split": "train",
            "val_every": 100,
            "checkpoint_every": 100,
            "sampler": {"steps": 12, "cfg_strength": 0.0},
        }
        path = out / "stage1.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path


def write_demo_models(folder: Path, *, seed: int) -> dict[str, Path]:
    """A small DINOv2 and a matching SLAT encoder and flow model with seeded random weights (marked random),
    written once."""
    from encoders.dinov2 import save_random_dinov2
    from encoders.slat_encoder import SlatEncoderConfig, build_random_slat_encoder, save_slat_encoder
    from encoders.slat_flow import SlatFlowConfig, build_random_slat_flow, save_slat_flow

    dinov2, slat = folder / "dinov2-demo", folder / "slat-encoder-demo.safetensors"
    flow = folder / "slat-flow-demo.safetensors"
    if not dinov2.exists():
        save_random_dinov2(dinov2, seed=seed, **DEMO_DINOV2)
    if not slat.exists():
        config = SlatEncoderConfig(
            in_channels=DEMO_DINOV2["hidden_size"], model_channels=64, num_blocks=2, num_heads=2
        )
        save_slat_encoder(build_random_slat_encoder(config, seed=seed), slat)
    if not flow.exists():
        flow_config = SlatFlowConfig(
            model_channels=64, cond_channels=DEMO_DINOV2["hidden_size"], num_blocks=2, num_heads=2,
            io_block_channels=(16,), use_fp16=False,
        )  # fmt: skip
        save_slat_flow(build_random_slat_flow(flow_config, seed=seed), flow)
    return {"dinov2": dinov2, "slat_encoder": slat, "slat_flow": flow}


def generate_demo_assets(out_dir: Path, *, seed: int = 0, render_python: str | None = None) -> list[Path]:
    """Build the procedural demo assets (a bpy job, so it runs in the render env)."""
    python = find_render_python(render_python)
    completed = subprocess.run(
        [str(python), "-m", "render_jobs.demo_assets", str(out_dir), "--seed", str(seed)],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"demo asset generation failed ({completed.returncode}):\n{completed.stderr[-4000:]}"
        )
    manifest = json.loads((out_dir / MANIFEST_FILE).read_text())
    return [out_dir / entry["file"] for entry in manifest["assets"].values()]
