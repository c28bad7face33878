"""The build's steps (DESIGN section 8) with the paper's defaults, as catalog `StepSpec`s.

    source -> normalize -> voxelize --v
    source -> render_lh -----------> features -> slat_lh, slat_bc
    source -> render_input -----------> slat_shaded (with voxelize)
    source -> render_relight

Only Blender imports assets, so the `lh` render call also yields `normalize` (the mesh scaled so its largest
side is 1 and centred, DESIGN section 4, with its scale and offset); `render_lh` commits its cameras, and its
images are transient (scratch) and consumed by `features`. Changing the `lh` recipe therefore leaves
`normalize` and `voxelize` alone.
Model weight digests enter the specs, so new weights recompute exactly the steps that use them.
"""

import torch

from catalogs.keys import SOURCE, StepGraph, StepSpec
from encoders.backproject import BackprojectConfig
from encoders.dinov2 import load_dinov2
from encoders.slat_encoder import load_slat_encoder
from encoders.trellis_checkpoint import load_checkpoint
from encoders.weights import WeightsInfo
from pipelines.build_config import BuildConfig

VOXEL_RESOLUTION = 64
RENDER_STEPS = {"render_lh": "lh", "render_input": "input", "render_relight": "relight"}
ENCODE_STEPS = ("voxelize", "features", "slat_lh", "slat_bc")
SHADED_INPUTS = ("render_input", "voxelize")
LH_RENDER_STEPS = ("render_lh", "normalize")
"""What one `lh` render call commits."""


def model_weights(config: BuildConfig) -> dict[str, WeightsInfo]:
    """Digests of the configured models, read through the same code the encoder actors load them with."""
    _, slat = load_slat_encoder(config.slat_encoder, device=torch.device("cpu"))
    flow = load_checkpoint(config.slat_flow)[2]  # the tensors suffice: no 600M-parameter model is built
    return {"dinov2": load_dinov2(config.dinov2)[1], "slat_encoder": slat, "slat_flow": flow}


def build_graph(config: BuildConfig, weights: dict[str, WeightsInfo]) -> StepGraph:
    def render(step: str) -> StepSpec:
        params = config.recipes[RENDER_STEPS[step]].to_dict()
        return StepSpec(step, "3", (SOURCE,), params, implementation=("render_jobs.worker",))

    features = {"image_size_px": 518, "backproject": BackprojectConfig().to_dict(), "roles": ["lh", "bc"]}
    return StepGraph(
        [
            render("render_lh"),
            StepSpec(
                "normalize",
                "1",
                (SOURCE,),
                {"largest_side": 1.0, "centre": "aabb"},
                implementation=("render_jobs.blender_scene",),
            ),
            StepSpec(
                "voxelize",
                "1",
                ("normalize",),
                {"resolution": VOXEL_RESOLUTION},
                implementation=("encoders.voxelize",),
            ),
            StepSpec(
                "features",
                "1",
                ("render_lh", "voxelize"),
                features,
                {"dinov2": weights["dinov2"].digest},
                implementation=("encoders.backproject",),
            ),
            *(
                StepSpec(
                    f"slat_{role}",
                    "1",
                    ("features",),
                    {"role": role},
                    {"slat_encoder": weights["slat_encoder"].digest},
                    implementation=("encoders.slat_encoder",),
                )
                for role in ("lh", "bc")
            ),
            render("render_input"),
            StepSpec(
                "slat_shaded",
                "1",
                SHADED_INPUTS,
                config.shaded.to_dict(),
                {"dinov2": weights["dinov2"].digest, "slat_flow": weights["slat_flow"].digest},
                implementation=("encoders.shaded_slat", "encoders.slat_flow", "encoders.flow_sampler"),
            ),
            render("render_relight"),
        ]
    )
