"""The paper's four evaluation tasks (section 4, Fig. 6, Tables 1-3) as frames read from a release.

    forward_rendering       ground-truth LH-SLAT at the `relight` cameras under held-out maps (the G-buffer task)
    reconstruction          an env-map-lit `input` view -> Z_s -> Stage 1 -> LH-SLAT, at that view's camera
                            under that view's own map, against the input image
    relighting              the same LH-SLAT at the `input` camera under each held-out map (`render_eval`)
    novel_view_relighting   the same LH-SLAT at the `relight` cameras under held-out maps

Each task but the first is run with three decoder inputs (Table 3): the LH-SLAT Stage 1 predicts, Z_s itself
(Stage 1 skipped) and the ground-truth LH-SLAT; the gap between them is what Stage 1 is worth. The ground-truth
input of `novel_view_relighting` is `forward_rendering` itself, so it is computed once and reported under both.
The condition views are those the release's Z_s were sampled from (`shaded.views` per asset).
"""

import dataclasses

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from catalogs.release_reader import Release
from encoders.shaded_slat import input_view_frames
from pipelines.steps import EVAL, INPUT, RELIGHT
from training.inference import View
from training.stage2.env_map_store import EnvMapStore

FORWARD, RECONSTRUCTION, RELIGHTING, NOVEL_VIEW = (
    "forward_rendering", "reconstruction", "relighting", "novel_view_relighting")
TASKS = (FORWARD, RECONSTRUCTION, RELIGHTING, NOVEL_VIEW)
PREDICTED, Z_S, GT = "predicted", "z_s", "gt"
INPUTS = (PREDICTED, Z_S, GT)
TASK_INPUTS = {FORWARD: (GT,), RECONSTRUCTION: INPUTS, RELIGHTING: INPUTS, NOVEL_VIEW: (PREDICTED, Z_S)}
"""The decoder inputs each task is computed with (novel-view relighting's `gt` is forward rendering)."""
NO_ENV_MAP = bytes(32)


@dataclasses.dataclass(frozen=True)
class TruthFrame:
    """One rendered frame to compare against: where it was seen from and lit by, and what the factory rendered
    (premultiplied on black; PBR passes and shadow only where the render has them)."""

    frame: str
    """`<role>/<frame index>`: which frame of which render set."""
    view: View
    condition_view: int
    """The input view whose prediction is rendered here (-1 for frames that every condition view renders)."""
    radiance: Float[Tensor, "H W 3"]
    alpha: Float[Tensor, "H W 1"]
    base_color: Float[Tensor, "H W 3"] | None = None
    roughness: Float[Tensor, "H W 1"] | None = None
    metallic: Float[Tensor, "H W 1"] | None = None
    shadow: Float[Tensor, "H W 1"] | None = None
    shadow_valid: bool = False
    """Whether a shadow-casting light lit the frame: the shadow target is defined only then."""


class RenderSetFrames:
    """The frames of one asset's render set (role `input`, `relight` or `eval`) in a release, read one chunk at
    a time."""

    def __init__(self, release: Release, asset: str, role: str, env_maps: EnvMapStore) -> None:
        self.release, self.asset, self.role, self.env_maps = release, asset, role, env_maps
        names = ("frame_view", "frame_lighting", "frame_env_map", "frame_yaw", "frame_env_strength", "fov")
        available = set(release.array_names(asset, role))
        self.has = available
        self.meta = release.read(asset, role, names=names + tuple(
            n for n in ("frame_shadow_light",) if n in available))

    def __len__(self) -> int:
        return len(self.meta["frame_view"])

    def env_map_of(self, frame: int) -> str | None:
        digest = self.meta["frame_env_map"][frame].tobytes()
        return None if digest == NO_ENV_MAP else digest.hex()

    def frames(self, *, env_maps: set[str] | None = None, view: int | None = None) -> list[int]:
        """Env-map-lit frames, optionally only those lit by `env_maps` (sha256s) or seen from `view`."""
        return [
            f for f in range(len(self))
            if self.env_map_of(f) is not None and (env_maps is None or self.env_map_of(f) in env_maps)
            and (view is None or int(self.meta["frame_view"][f]) == view)
        ]  # fmt: skip

    def truth(self, frame: int, condition_view: int = -1) -> TruthFrame:
        read = self.release.read_row
        view = int(self.meta["frame_view"][frame])
        beauty = torch.from_numpy(np.nan_to_num(read(self.asset, self.role, "beauty", frame).astype(np.float32)))
        c2w = read(self.asset, self.role, "c2w", view).astype(np.float64)
        lit = View(c2w, float(self.meta["fov"][view]), self.env_maps.get(self.env_map_of(frame)),
                   float(self.meta["frame_yaw"][frame]), float(self.meta["frame_env_strength"][frame]))

        def per_view(name: str) -> Tensor | None:
            if name not in self.has:
                return None
            image = torch.from_numpy(read(self.asset, self.role, name, view).astype(np.float32))
            return image if image.ndim == 3 else image[..., None]

        shadow = None
        if "shadow" in self.has:
            shadow = torch.from_numpy(read(self.asset, self.role, "shadow", frame).astype(np.float32))[..., None]
        valid = "frame_shadow_light" in self.meta and bool(self.meta["frame_shadow_light"][frame])
        return TruthFrame(
            f"{self.role}/{frame}", lit, condition_view, beauty[..., :3], beauty[..., 3:],
            per_view("basecolor"), per_view("roughness"), per_view("metallic"), shadow, valid,
        )


def condition_frames(release: Release, asset: str, views: int) -> list[int]:
    """The `input` frames the asset's Z_s were sampled from, one per condition view."""
    meta = release.read(asset, INPUT, names=("frame_view", "frame_lighting"))
    return [int(f) for f in input_view_frames(meta["frame_view"], meta["frame_lighting"], views)]


def condition_image(release: Release, asset: str, frame: int) -> Float[Tensor, "4 H W"]:
    """An input frame as the factory conditioned on it: premultiplied linear RGBA."""
    beauty = release.read_row(asset, INPUT, "beauty", frame).astype(np.float32)
    return torch.from_numpy(np.nan_to_num(beauty)).permute(2, 0, 1)


def task_frames(release: Release, asset: str, env_maps: EnvMapStore, held_out: set[str], views: int
                ) -> dict[str, list[TruthFrame]]:  # fmt: skip
    """The truth frames of every task for one asset: `condition_view` says which prediction each is compared
    with (forward rendering and novel-view frames: -1, every condition view renders them)."""
    relight = RenderSetFrames(release, asset, RELIGHT, env_maps)
    held_out_frames = [relight.truth(f) for f in relight.frames(env_maps=held_out)]
    inputs = RenderSetFrames(release, asset, INPUT, env_maps)
    condition = condition_frames(release, asset, views)
    reconstruction = [inputs.truth(f, c) for c, f in enumerate(condition) if inputs.env_map_of(f) is not None]
    relighting = []
    if release.has(asset, EVAL):
        targets = RenderSetFrames(release, asset, EVAL, env_maps)
        relighting = [targets.truth(f, c) for c in range(len(condition)) for f in targets.frames(view=c)]
    return {FORWARD: held_out_frames, RECONSTRUCTION: reconstruction, RELIGHTING: relighting,
            NOVEL_VIEW: held_out_frames}
