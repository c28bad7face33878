"""`near eval`: the paper's four tasks and the decoder-input ablations on one split of a pinned release.

One `AssetEvaluator` holds both stages (EMA weights) and evaluates an asset at a time: it samples each
condition view's LH-SLAT with Stage 1, renders every task's frames with Stage 2 from each decoder input, and
scores them against the factory's renders (`training.eval.metrics`). On CPU one evaluator runs in this
process; with `gpus` (or `workers`) Ray runs one evaluator actor per GPU and hands out assets as they finish.
The test split is fixed by source_id before any training (`catalogs.splits`), and the evaluation refuses a
run whose training release had any of the evaluated assets in its train or val split.
"""

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from catalogs.release_reader import Release
from catalogs.splits import TEST, TRAIN, VAL
from infra.errors import ConfigError, FactoryError
from pipelines.steps import SLAT_BC, SLAT_LH, SLAT_SHADED
from training.eval.metrics import EvalBuffers, average_per_asset, measure_frames, summarize
from training.eval.report import grid_columns, save_grid, write_report
from training.eval.tasks import (
    FORWARD,
    GT,
    INPUTS,
    NOVEL_VIEW,
    PREDICTED,
    TASK_INPUTS,
    TASKS,
    Z_S,
    TruthFrame,
    condition_frames,
    condition_image,
    task_frames,
)
from training.inference import RunCheckpoint, Stage1Predictor, Stage2Renderer
from training.stage2.agx import AgX
from training.stage2.env_map_store import EnvMapStore
from training.stage2.lpips import Lpips
from training.stage2.model import Stage2Render

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What one evaluation reads and how; recorded verbatim in metrics.json."""

    data_root: str
    release: str
    stage1_run: str
    stage2_run: str
    out_dir: str
    split: str = TEST
    tasks: tuple[str, ...] = TASKS
    release_sha256: str | None = None
    lpips_vgg: str | None = None
    """torchvision's vgg16 weights for LPIPS (default: the Stage 2 run's `lpips_vgg`); none: LPIPS is omitted."""
    seed: int = 0
    batch_size: int = 4

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown or not self.tasks:
            raise ConfigError(f"unknown tasks {unknown}; choose among {list(TASKS)}")


def held_out_env_maps(release: Release, store: EnvMapStore, renderer: Stage2Renderer) -> dict[str, str]:
    """sha256 -> name of the maps the tasks light with: those the release holds out (release.json), or, for a
    release that records none, those the Stage 2 run never trained on."""
    recorded = release.info.get("held_out_env_maps")
    if recorded:
        return {digest: name for name, digest in recorded.items()}
    return {digest: store.name_of(digest) for digest in store.digests if digest not in renderer.trained_env_maps}


class AssetEvaluator:
    """Both stages and the scoring models on one device; `evaluate(asset)` gives the asset's per-frame rows."""

    def __init__(self, settings: EvalSettings, device: str = "auto") -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.settings, self.device = settings, torch.device(device)
        self.release = Release.open(settings.data_root, settings.release, settings.release_sha256)
        self.stage1 = Stage1Predictor(settings.stage1_run, self.device)
        self.stage2 = Stage2Renderer(settings.stage2_run, self.device)
        self.env_maps = EnvMapStore.from_release(self.release, self.stage2.map_size)
        self.held_out = set(held_out_env_maps(self.release, self.env_maps, self.stage2))
        self.agx = AgX.from_simple_ocio()
        lpips = settings.lpips_vgg or self.stage2.config.lpips_vgg
        self.lpips = Lpips.from_files(lpips) if lpips else None
        self.images = Path(settings.out_dir) / "images"

    def evaluate(self, asset: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Per-frame metric rows of every task and decoder input, and the image grid of each (task, input)."""
        release, settings = self.release, self.settings
        lh = release.read(asset, SLAT_LH)
        coords = torch.from_numpy(lh["coords"].astype(np.int64))
        truth_latent = torch.from_numpy(lh["latent"].astype(np.float32))
        if self.stage2.with_bc_slat:
            truth_latent = torch.cat([truth_latent, torch.from_numpy(release.read(asset, SLAT_BC)["latent"])], 1)
        shaded = torch.from_numpy(release.read(asset, SLAT_SHADED)["latent"].astype(np.float32))  # (N, V, 8)
        frames = condition_frames(release, asset, shaded.shape[1])
        latents: dict[str, list[torch.Tensor]] = {GT: [truth_latent] * len(frames), Z_S: [], PREDICTED: []}
        conditions = []
        for view, frame in enumerate(frames):
            image = condition_image(release, asset, frame)
            conditions.append(image)
            seed = int(hashlib.sha256(f"{settings.seed}/{asset}/{view}".encode()).hexdigest()[:15], 16)
            cond = self.stage1.condition(image[None])
            latents[PREDICTED].append(self.stage1.predict(shaded[:, view], coords, cond, seed=seed))
            latents[Z_S].append(shaded[:, view])
        truths = task_frames(release, asset, self.env_maps, self.held_out, len(frames))
        split = self._split_of(asset)
        rows, grids = [], []
        for task in settings.tasks:
            for decoder_input in TASK_INPUTS[task]:
                if decoder_input != GT and self.stage2.with_bc_slat:
                    continue  # Stage 1 makes no BC-SLAT: such a model is evaluated from ground truth only
                scored = self._score(asset, task, decoder_input, truths[task], latents[decoder_input], coords,
                                     conditions)
                for row in scored.rows:
                    rows.append({"task": task, "input": decoder_input, "asset": asset, "split": split, **row})
                if scored.worst is not None:
                    grids.append(scored.worst)
            if task == FORWARD and NOVEL_VIEW in settings.tasks:  # novel-view relighting's gt input
                rows += [{**row, "task": NOVEL_VIEW} for row in rows if row["task"] == FORWARD]
                grids += [{**grid, "task": NOVEL_VIEW} for grid in grids if grid["task"] == FORWARD]
        return rows, grids

    def _split_of(self, asset: str) -> str:
        manifest = self.release.manifest
        return manifest.filter(pc.equal(manifest["sample_id"], asset))["split"][0].as_py()

    def _score(self, asset: str, task: str, decoder_input: str, truths: Sequence[TruthFrame],
               latents: Sequence[torch.Tensor], coords: torch.Tensor, conditions: Sequence[torch.Tensor]
               ) -> "_Scored":  # fmt: skip
        """Render and score every truth frame of one (task, input) for one asset; keep the worst frame's grid."""
        jobs = [(truth, view) for truth in truths
                for view in (range(len(latents)) if truth.condition_view < 0 else [truth.condition_view])]
        if decoder_input == GT:  # one ground truth for every condition view: render its frames once
            jobs = list({truth.frame: (truth, max(truth.condition_view, 0)) for truth, _ in jobs}.values())
        rows: list[dict[str, Any]] = []
        worst: tuple[float, dict[str, Any]] | None = None
        for view in sorted({v for _, v in jobs}):
            batch = [truth for truth, v in jobs if v == view]
            for start in range(0, len(batch), self.settings.batch_size):
                chunk = batch[start : start + self.settings.batch_size]
                size = chunk[0].radiance.shape[0]
                render = self.stage2.render(latents[view], coords, [t.view for t in chunk], size)
                for i, (truth, values) in enumerate(zip(chunk, self._metrics(render, chunk))):
                    frame = truth.frame if truth.condition_view >= 0 or decoder_input == GT else f"{truth.frame}@{view}"
                    rows.append({"frame": frame, **values})
                    score = values.get("psnr_masked", values.get("psnr", 0.0))
                    if worst is None or (score is not None and score < worst[0]):
                        worst = (score, {"render": render.sample(i), "truth": truth, "frame": frame,
                                         "condition": conditions[view]})
        return _Scored(rows, self._grid(asset, task, decoder_input, worst) if worst else None)

    def _metrics(self, render: Stage2Render, truths: Sequence[TruthFrame]) -> list[dict[str, float]]:
        return measure_frames(EvalBuffers.of(render), EvalBuffers.stack(truths), agx=self.agx, lpips=self.lpips,
                              shadow_valid=[t.shadow_valid for t in truths])

    def _grid(self, asset: str, task: str, decoder_input: str, worst: tuple[float, dict[str, Any]]
              ) -> dict[str, Any]:  # fmt: skip
        score, case = worst
        name = f"{hashlib.sha256(asset.encode()).hexdigest()[:12]}_{task}_{decoder_input}.png"
        condition = case["condition"]  # premultiplied linear RGBA of the view the prediction came from
        image = None if decoder_input == GT else self.agx(condition[:3].permute(1, 2, 0)).clamp(0, 1)
        columns = grid_columns(EvalBuffers.of(case["render"]), EvalBuffers.stack([case["truth"]]), 0, agx=self.agx,
                               input_image=image)
        save_grid(self.images / name, columns)
        return {"task": task, "input": decoder_input, "asset": asset, "frame": case["frame"], "score": score,
                "path": f"images/{name}"}


@dataclasses.dataclass(frozen=True)
class _Scored:
    rows: list[dict[str, Any]]
    worst: dict[str, Any] | None


def check_not_trained_on(release: Release, split: str, runs: Sequence[str]) -> None:
    """Refuse when an evaluated asset (by source_id, the bytes) was in a run's training release as train or val:
    a test split changed between releases (a different `test_percent`) would leak into the numbers."""
    if split != TEST:
        return
    manifest = release.manifest
    evaluated = set(manifest.filter(pc.equal(manifest["split"], split))["source_id"].to_pylist())
    for run in runs:
        meta = RunCheckpoint.latest(run).meta
        pin, data_root = meta["release"], meta["config"]["data_root"]
        try:
            trained = Release.open(data_root, pin["name"], pin["manifest_sha256"])
        except (FactoryError, OSError) as err:
            logger.warning("cannot open %s's training release %r to check for leaks: %s", run, pin["name"], err)
            continue
        seen = pc.is_in(trained.manifest["split"], value_set=pa.array([TRAIN, VAL], pa.string()))
        rows = trained.manifest.filter(seen)
        leaked = evaluated & set(rows["source_id"].to_pylist())
        if leaked:
            raise ConfigError(f"{len(leaked)} {split} assets of release {release.info['name']!r} were trained on by "
                              f"{run} (release {pin['name']!r}): evaluate on a release whose test split it never saw")


def evaluate(settings: EvalSettings, *, gpus: int = 0, workers: int = 1,
             on_asset: Callable[[str, int, int], None] = lambda *_: None) -> dict[str, Any]:  # fmt: skip
    """Evaluate every asset of the split and write metrics.json, metrics.csv and report.html into
    `settings.out_dir`; returns the summary. `gpus` > 0 runs one Ray actor per GPU, `workers` > 1 as many CPU
    actors; otherwise the evaluation runs in this process."""
    release = Release.open(settings.data_root, settings.release, settings.release_sha256)
    assets = release.split(settings.split)
    if not assets:
        raise ConfigError(f"release {settings.release!r} has no {settings.split!r} samples "
                          f"(its splits: {release.info.get('splits')})")
    check_not_trained_on(release, settings.split, [settings.stage1_run, settings.stage2_run])
    Path(settings.out_dir).mkdir(parents=True, exist_ok=True)
    if gpus > 0 or workers > 1:
        rows, grids = _evaluate_on_ray(settings, assets, gpus, workers, on_asset)
        device = f"{gpus} GPU actors" if gpus else f"{workers} CPU actors"
    else:
        evaluator = AssetEvaluator(settings)
        device = _device_name(evaluator.device)
        rows, grids = [], []
        for done, asset in enumerate(assets, 1):
            asset_rows, asset_grids = evaluator.evaluate(asset)
            rows += asset_rows
            grids += asset_grids
            on_asset(asset, done, len(assets))
    summary = summarize(rows)
    summary = {task: {i: summary[task][i] for i in INPUTS if i in summary[task]} for task in TASKS if task in summary}
    meta = {
        "settings": dataclasses.asdict(settings),
        "release": {"name": release.info["name"], "manifest_sha256": release.info["manifest_sha256"],
                    "split_rule": release.info.get("split_rule"), "assets": len(assets)},
        "stage1": RunCheckpoint.latest(settings.stage1_run).describe(),
        "stage2": RunCheckpoint.latest(settings.stage2_run).describe(),
        "device": device,
    }
    write_report(Path(settings.out_dir), summary=summary, asset_rows=average_per_asset(rows), meta=meta, grids=grids)
    return summary


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _evaluate_on_ray(settings: EvalSettings, assets: list[str], gpus: int, workers: int,
                     on_asset: Callable[[str, int, int], None]) -> tuple[list, list]:  # fmt: skip
    import ray

    actor = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1)(AssetEvaluator)
    pool = [actor.remote(settings, "cuda" if gpus else "cpu") for _ in range(max(gpus, workers))]
    pending, rows, grids, queue = {}, [], [], list(assets)
    for evaluator in pool:
        if queue:
            asset = queue.pop(0)
            pending[evaluator.evaluate.remote(asset)] = (evaluator, asset)
    done = 0
    while pending:
        (ready,), _ = ray.wait(list(pending), num_returns=1)
        evaluator, asset = pending.pop(ready)
        asset_rows, asset_grids = ray.get(ready)
        rows += asset_rows
        grids += asset_grids
        done += 1
        on_asset(asset, done, len(assets))
        if queue:
            next_asset = queue.pop(0)
            pending[evaluator.evaluate.remote(next_asset)] = (evaluator, next_asset)
    return rows, grids

