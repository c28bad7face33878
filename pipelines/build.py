"""The build: ingest, plan, execute the plan on Ray as a stream of per-asset work, commit, release, report.

Each asset's todo steps become actor calls as soon as their inputs exist: its `lh` render feeds the encoder on
the same node without waiting for other assets; `render_input` and `render_relight` run beside it. At most
`max_in_flight` assets are between their first call and their last commit. Every result is committed as it
arrives (pack first, then registry rows), so a crash loses nothing committed and a rerun plans only the rest.
"""

import collections
import dataclasses
import datetime
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from catalogs.commit import StepResult, commit_batch, write_batch
from catalogs.errors import DamagedPackError
from catalogs.packs import ArraySlice, read_asset
from catalogs.planner import Plan, plan
from catalogs.releases import ReleaseExistsError, ReleaseSpec, create_release
from catalogs.sources import SkippedSource
from catalogs.tables import FactoryCatalog
from infra.errors import ConfigError
from pipelines import scratch
from pipelines.build_config import BuildConfig
from pipelines.executors import EncoderActor, RenderActor
from pipelines.ingest import ingest
from pipelines.local_render import asset_dir_name
from pipelines.steps import (
    ENCODE_STEPS,
    LH_RENDER_STEPS,
    RENDER_STEPS,
    SHADED_INPUTS,
    build_graph,
    model_weights,
)
from render_jobs.protocol import RenderRequest, RenderResult
from render_jobs.supervisor import RenderWorkerConfig

logger = logging.getLogger(__name__)

_CALL_STEPS = {
    "render_lh": ("render_lh", "normalize", *ENCODE_STEPS),  # the encode steps wait for this render
    "render_input": ("render_input",),
    "render_relight": ("render_relight",),
    "encode": ENCODE_STEPS,
    "latents": ("slat_lh", "slat_bc"),
    "voxelize": ("voxelize",),
    "shade": ("slat_shaded",),
}
"""Kind of actor call -> the steps whose results it was to produce (the todo ones among them fail with it)."""

RELEASE_ROLES = {
    "voxels": "voxelize",
    "features": "features",
    "slat_lh": "slat_lh",
    "slat_bc": "slat_bc",
    "slat_shaded": "slat_shaded",
    "input": "render_input",
    "relight": "render_relight",
}


@dataclasses.dataclass
class BuildRecord:
    """What one build did, counted by the build itself (the report's numbers)."""

    run_id: str
    planned: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    computed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    """(step, status) -> results committed by this build."""
    step_seconds: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    asset_seconds: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    voxels: dict[str, int] = dataclasses.field(default_factory=dict)
    """asset -> occupied voxels, for the assets voxelized by this build."""
    latent_moments: dict[str, list[list[float]]] = dataclasses.field(default_factory=dict)
    """slat step -> [count, per-channel sum, per-channel sum of squares] over this build's latents."""
    failures: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    skipped_sources: list[dict[str, str]] = dataclasses.field(default_factory=list)
    """Source entries ingest did not take, as `catalogs.sources.SkippedSource.to_dict` gives them."""
    sheets: list[str] = dataclasses.field(default_factory=list)
    release: dict[str, Any] | None = None
    seconds: float = 0.0

    def computed_by_step(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = collections.defaultdict(dict)
        for (step, status), count in sorted(self.computed.items()):
            out[step][status] = count
        return dict(out)

    def latent_stats(self) -> dict[str, dict[str, list[float]]]:
        """slat step -> per-channel mean and std over every voxel this build encoded."""
        out = {}
        for step, (count, sums, squares) in self.latent_moments.items():
            mean = np.asarray(sums) / count[0]
            std = np.sqrt(np.maximum(np.asarray(squares) / count[0] - mean**2, 0.0))
            out[step] = {"mean": mean.round(4).tolist(), "std": std.round(4).tolist()}
        return out

    def observe(self, step: str, asset: str, result: StepResult) -> None:
        """Count one committed result into the report's numbers."""
        self.computed[(step, "ok" if result.ok else "failed")] += 1
        self.step_seconds[step] += result.duration_s
        self.asset_seconds[asset] += result.duration_s
        if not result.ok:
            return
        if step == "voxelize" or step.startswith("slat_"):
            self.voxels[asset] = len(result.arrays["coords"])
        if step.startswith("slat_"):
            latent = result.arrays["latent"].astype(np.float64).reshape(-1, result.arrays["latent"].shape[-1])
            count, sums, squares = self.latent_moments.get(
                step, [[0.0], [0.0] * latent.shape[1], [0.0] * latent.shape[1]]
            )
            self.latent_moments[step] = [
                [count[0] + len(latent)],
                (np.asarray(sums) + latent.sum(0)).tolist(),
                (np.asarray(squares) + (latent**2).sum(0)).tolist(),
            ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "planned": self.planned,
            "computed": self.computed_by_step(),
            "step_seconds": dict(self.step_seconds),
            "asset_seconds": dict(self.asset_seconds),
            "voxels": self.voxels,
            "latent_stats": self.latent_stats(),
            "failures": self.failures,
            "skipped_sources": self.skipped_sources,
            "sheets": self.sheets,
            "release": self.release,
            "seconds": self.seconds,
        }


def new_run_id() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)


def prepare(
    config: BuildConfig, run_id: str
) -> tuple[FactoryCatalog, Any, pa.Table, list[SkippedSource]]:
    """Catalog, step graph (with the models' digests), this build's sources (registered) and the source
    entries ingest skipped."""
    catalog = FactoryCatalog(config.data_root, config.catalog_uri)
    sources, skipped = ingest(catalog, config, run_id)
    graph = build_graph(config, model_weights(config))
    catalog.register_specs(list(graph.specs))
    return catalog, graph, sources, skipped


def run_build(
    config: BuildConfig,
    *,
    retry_failed: bool = False,
    on_progress: Callable[[str, int, int], None] = lambda *_: None,
) -> BuildRecord:
    """Build, commit and release; `on_progress(message, done, total)` after each committed result."""
    started = time.perf_counter()
    run_id = new_run_id()
    catalog, graph, sources, skipped = prepare(config, run_id)
    work = plan(catalog, graph, sources, retry_failed=retry_failed)
    record = BuildRecord(run_id, planned=work.counts(), skipped_sources=[s.to_dict() for s in skipped])
    if work.todo.num_rows:
        _init_ray(config)
        _Executor(config, catalog, work, sources, record, on_progress).run()
    if config.release.name:
        record.release = _release(catalog, graph, config)
    record.seconds = time.perf_counter() - started
    return record


def _init_ray(config: BuildConfig) -> None:
    """The configured cluster, else `RAY_ADDRESS`'s (as `ray job submit` sets it), else a new local one."""
    if ray.is_initialized():
        return
    address = config.execution.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(
            resources={"render_slot": config.execution.render_slots},
            log_to_driver=False,
            include_dashboard=False,
        )


class _Executor:
    """The streaming loop: per asset, the calls its todo steps need, in dependency order, committed on arrival."""

    def __init__(
        self,
        config: BuildConfig,
        catalog: FactoryCatalog,
        work: Plan,
        sources: pa.Table,
        record: BuildRecord,
        on_progress: Callable[[str, int, int], None],
    ) -> None:
        self.config, self.catalog, self.work, self.record, self.on_progress = (
            config,
            catalog,
            work,
            record,
            on_progress,
        )
        self.uri = dict(zip(sources["asset_id"].to_pylist(), sources["uri"].to_pylist()))
        self.todo: dict[str, dict[str, str]] = collections.defaultdict(dict)  # asset -> step -> key
        for asset, step, key in zip(
            *(work.todo[c].to_pylist() for c in ("asset_id", "step", "artifact_key"))
        ):
            self.todo[asset][step] = key
        self.keys = {
            (a, s): k
            for a, s, k in zip(*(work.targets[c].to_pylist() for c in ("asset_id", "step", "artifact_key")))
        }
        self.source_id = dict(zip(sources["asset_id"].to_pylist(), sources["source_id"].to_pylist()))
        self.total, self.done = work.todo.num_rows, 0
        self.report_dir = Path(config.data_root) / "reports" / record.run_id
        worker = RenderWorkerConfig(
            timeout_s=config.execution.render_timeout_s,
            gpu_backend=config.execution.gpu_backend,
            allow_software_gl=config.execution.allow_software_gl,
        )
        slots = int(ray.cluster_resources().get("render_slot", 0))
        if slots < 1:
            raise ConfigError(
                "no node of the Ray cluster declares a render_slot resource (ray start --resources)"
            )
        self.run_dir = config.scratch_dir / record.run_id
        scratch.remove_stale_runs(config.scratch_dir)
        self.claim = scratch.claim(self.run_dir)
        actor = ray.remote(RenderActor)
        self.render_actors = [
            actor.options(
                name=f"render-{record.run_id}-{i}",
                resources={"render_slot": 1},
                num_cpus=1,
                num_gpus=config.execution.render_gpus,
                max_restarts=2,
                max_task_retries=1,
            ).remote(worker, str(self.run_dir))
            for i in range(slots)
        ]
        self.idle = list(self.render_actors)
        self.encoders: dict[str, list[Any]] = {}  # node id (or "any") -> its encoder actors
        self.pending: dict[ray.ObjectRef, tuple[str, str]] = {}  # call -> (asset, kind)
        self.queue: collections.deque[tuple[str, str]] = (
            collections.deque()
        )  # (asset, step) awaiting an actor
        self.active: collections.Counter = collections.Counter()  # asset -> calls in flight or queued
        self.actor_of: dict[ray.ObjectRef, Any] = {}  # render call -> its actor, idle again once it returns
        self.buffer: dict[str, list[tuple[str, StepResult, str]]] = collections.defaultdict(list)
        """step -> (asset, result, stderr tail) executed but not yet committed."""
        self.last_commit = time.monotonic()
        self.ok_before: dict[str, dict[str, Any]] | None = None  # artifact key -> pack_path, arrays
        self.shade_waiting: dict[str, dict[str, Any]] = {}
        """asset -> the inputs of its slat_shaded step that have arrived (input views' arrays, coords)."""

    def run(self) -> None:
        assets = collections.deque(sorted(self.todo))
        while assets or self.pending or self.queue:
            while assets and len(self.active) < self.config.execution.max_in_flight:
                self._start(assets.popleft())
            self._dispatch_renders()
            if not self.pending:
                continue
            ready, _ = ray.wait(
                list(self.pending), num_returns=1, timeout=self.config.execution.commit_interval_s
            )
            if ready:
                asset, kind = self.pending.pop(ready[0])
                self._finish(asset, kind, ready[0])
            self._flush(force=False)
        self._flush(force=True)
        for actor in self.render_actors:
            ray.get(actor.shutdown.remote())
        scratch.release(self.claim)
        if not self.config.execution.keep_renders:  # every set was consumed; only empty folders remain here
            shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- scheduling ---------------------------------------------------------------------------------------------

    def _start(self, asset: str) -> None:
        steps = self.todo[asset]
        if "slat_shaded" in steps:
            self.shade_waiting[asset] = {}
            for step in SHADED_INPUTS:
                if step not in steps:
                    try:
                        self._shade_input(asset, step, self._stored(asset, step))
                    except LookupError as err:
                        self._shade_input_failed(asset, f"{step} unavailable: {err}")
        for step in ("render_input", "render_relight"):
            if step in steps:
                self._queue_render(asset, step)
        needs_lh_render = any(step in steps for step in (*LH_RENDER_STEPS, "features"))
        if needs_lh_render:
            self._queue_render(asset, "render_lh")
        elif slats := {s: steps[s] for s in ("slat_lh", "slat_bc") if s in steps}:
            try:
                stored = self._stored_features(asset)
            except LookupError as err:
                self._commit(
                    asset, [StepResult(key, error=f"features unavailable: {err}") for key in slats.values()]
                )
            else:
                self._call(asset, "latents", self._encoder(None).encode_latents.remote(*stored, slats))
        if "voxelize" in steps and not needs_lh_render:
            try:
                vertices, faces = self._stored_mesh(asset)
            except LookupError as err:
                self._commit(
                    asset, [StepResult(steps["voxelize"], error=f"normalized mesh unavailable: {err}")]
                )
            else:
                self._call(
                    asset, "voxelize", self._encoder(None).voxelize.remote(vertices, faces, steps["voxelize"])
                )
        if not self.active[asset]:
            del self.active[asset]

    def _queue_render(self, asset: str, step: str) -> None:
        self.queue.append((asset, step))
        self.active[asset] += 1

    def _dispatch_renders(self) -> None:
        while self.queue and self.idle:
            asset, step = self.queue.popleft()
            actor = self.idle.pop()
            recipe = self.config.recipes[RENDER_STEPS[step]]
            source_id = self.source_id[asset]
            out_dir = self.run_dir / recipe.name / asset_dir_name(Path(asset), source_id)
            request = RenderRequest(self.uri[asset], str(out_dir), source_id, recipe.to_dict())
            sheet = str(self.report_dir / "sheets" / f"{out_dir.name}_{recipe.name}.png")
            if step == "render_lh":
                keys = {s: self.todo[asset][s] for s in LH_RENDER_STEPS if s in self.todo[asset]}
                ref = actor.render_lh.options(name=f"render_lh:{asset}").remote(request, keys, sheet)
            else:
                ref = actor.render_arrays.options(name=f"{step}:{asset}").remote(
                    request, self.keys[(asset, step)], sheet, self.config.execution.keep_renders
                )
            self.pending[ref] = (asset, step)
            self.actor_of[ref] = actor

    def _call(self, asset: str, kind: str, ref: ray.ObjectRef) -> None:
        self.pending[ref] = (asset, kind)
        self.active[asset] += 1

    def _encoder(self, node_id: str | None) -> Any:
        """An encoder actor on `node_id` (where an lh render set lies), up to `encoders_per_node` of them, created
        on first use and taken in turn. Calls that read no scratch (node_id None) share the first pool there is,
        else get their own, placed by the scheduler (so a head node without GPUs is no obstacle)."""
        pool = node_id or next(iter(self.encoders), "any")
        actors = self.encoders.setdefault(pool, [])
        if len(actors) < self.config.execution.encoders_per_node:
            placement = {}
            if pool != "any":
                placement["scheduling_strategy"] = NodeAffinitySchedulingStrategy(pool, soft=False)
            actor = ray.remote(EncoderActor).options(
                num_gpus=self.config.execution.encoder_gpus,
                num_cpus=1,
                name=f"encoder-{self.record.run_id}-{pool[:8]}-{len(actors)}",
                **placement,
            )
            config = self.config
            actors.append(actor.remote(config.dinov2, config.slat_encoder, config.slat_flow, config.shaded))
            return actors[-1]
        actors.append(actors.pop(0))  # round robin
        return actors[-1]

    # -- results ------------------------------------------------------------------------------------------------

    def _finish(self, asset: str, kind: str, ref: ray.ObjectRef) -> None:
        self.active[asset] -= 1
        steps = self.todo[asset]
        if kind in RENDER_STEPS:
            self.idle.append(self.actor_of.pop(ref))
        try:
            value = ray.get(ref)
        except ray.exceptions.RayError as err:  # a lost worker: recorded, retried by --retry-failed
            value = None
            failed = [step for step in _CALL_STEPS[kind] if step in steps]
            self._commit(
                asset,
                [
                    StepResult(steps[s], error=f"worker_crashed: {type(err).__name__}: {err}"[:2000])
                    for s in failed
                ],
            )
        if kind == "render_lh" and value is not None:
            results, render, node_id = value
            encode_keys = {s: steps[s] for s in ENCODE_STEPS if s in steps}
            if render.is_ok and encode_keys:
                self._call(
                    asset,
                    "encode",
                    self._encoder(node_id)
                    .encode.options(name=f"encode:{asset}")
                    .remote(render.out_dir, encode_keys, self.config.execution.keep_renders),
                )
            elif not render.is_ok:
                results += [
                    StepResult(key, error=f"render_lh failed: {render.reason}: {render.message}")
                    for key in encode_keys.values()
                ]
            self._commit(asset, results, render)
        elif kind in ("render_input", "render_relight") and value is not None:
            step_result, render = value
            self._commit(asset, [step_result], render)
        elif value is not None:
            self._commit(asset, value if isinstance(value, list) else [value])
        if self.active[asset] <= 0:
            del self.active[asset]

    def _commit(self, asset: str, results: list[StepResult], render: RenderResult | None = None) -> None:
        """Buffer executed results; `_flush` commits them in batches. Inputs of a waiting slat_shaded step are
        handed to it (or fail it)."""
        step_of = {key: step for step, key in self.todo[asset].items()}
        for result in results:
            step = step_of[result.artifact_key]
            self.buffer[step].append((asset, result, render.stderr_tail if render else ""))
            if step in SHADED_INPUTS and result.ok:
                self._shade_input(asset, step, result.arrays)
            elif step in SHADED_INPUTS:
                self._shade_input_failed(asset, f"{step} failed: {result.error}")

    def _shade_input(self, asset: str, step: str, arrays: dict[str, np.ndarray]) -> None:
        """Keep one input of the asset's slat_shaded step; with both, call an encoder actor."""
        waiting = self.shade_waiting.get(asset)
        if waiting is None:
            return
        waiting[step] = arrays
        if all(s in waiting for s in SHADED_INPUTS):
            del self.shade_waiting[asset]
            views = {k: waiting["render_input"][k] for k in ("beauty", "frame_view", "frame_lighting")}
            key = self.todo[asset]["slat_shaded"]
            call = self._encoder(None).shade.options(name=f"slat_shaded:{asset}")
            self._call(asset, "shade", call.remote(views, waiting["voxelize"]["coords"], key))

    def _shade_input_failed(self, asset: str, reason: str) -> None:
        """Fail the asset's slat_shaded step once, with the first failed input's reason."""
        if self.shade_waiting.pop(asset, None) is not None:
            self._commit(asset, [StepResult(self.todo[asset]["slat_shaded"], error=reason)])

    def _flush(self, *, force: bool) -> None:
        """Commit the buffer (per step: one pack, then one registry commit) once it holds `commit_every` results
        or `commit_interval_s` has passed: few Iceberg snapshots, and a crash loses only uncommitted work."""
        execution = self.config.execution
        buffered = sum(len(items) for items in self.buffer.values())
        due = (
            buffered >= execution.commit_every
            or time.monotonic() - self.last_commit >= execution.commit_interval_s
        )
        if not buffered or not (force or due):
            return
        for step, items in self.buffer.items():
            results = [result for _, result, _ in items]
            rows = self.work.todo.filter(
                pc.is_in(self.work.todo["artifact_key"], pa.array([r.artifact_key for r in results]))
            )
            packed = write_batch(self.config.data_root, rows, results, self.record.run_id)
            commit_batch(self.catalog, rows, results, packed, self.record.run_id)
            for asset, result, stderr_tail in items:
                self.record.observe(step, asset, result)
                if not result.ok:
                    self.record.failures.append(
                        {
                            "asset_id": asset,
                            "step": step,
                            "error": result.error,
                            "stderr_tail": stderr_tail[-2000:],
                        }
                    )
            self.done += len(items)
            self.on_progress(f"{step}: {items[-1][0]}", self.done, self.total)
        self.buffer.clear()
        self.last_commit = time.monotonic()

    # -- stored inputs ------------------------------------------------------------------------------------------

    def _stored(self, asset: str, step: str) -> dict[str, np.ndarray]:
        """An input committed before this build (what the plan found `ok`), read from its pack and checked
        against its content digest. LookupError when it is absent or damaged: only that asset's steps fail."""
        if self.ok_before is None:  # read once: per asset it would make a large rebuild quadratic
            ok = self.catalog.ok_artifacts()
            rows = ok.select(["pack_path", "arrays", "content_digest"]).to_pylist()
            self.ok_before = dict(zip(ok["artifact_key"].to_pylist(), rows))
        row = self.ok_before.get(self.keys[(asset, step)])
        if row is None:
            raise LookupError(f"no ok {step} artifact for {asset}")
        slices = [ArraySlice.from_dict(a) for a in row["arrays"]]
        try:
            return read_asset(self.config.data_root, row["pack_path"], slices, digest=row["content_digest"])
        except DamagedPackError as err:
            raise LookupError(str(err)) from err

    def _stored_features(self, asset: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        stored = self._stored(asset, "features")
        coords = self._stored(asset, "voxelize")["coords"]
        return coords, {name.removeprefix("feats_"): array for name, array in stored.items()}

    def _stored_mesh(self, asset: str) -> tuple[np.ndarray, np.ndarray]:
        stored = self._stored(asset, "normalize")
        return stored["vertices"], stored["faces"]


def _release(catalog: FactoryCatalog, graph: Any, config: BuildConfig) -> dict[str, Any]:
    spec = config.release
    low, high = spec.min_voxels, spec.max_voxels

    def within_limits(rows: pa.Table) -> pa.Array:
        voxels = [json.loads(s or "{}").get("num_voxels") for s in rows["stats_json"].to_pylist()]
        return pa.array([v is None or (v >= low and (high is None or v <= high)) for v in voxels])

    release = ReleaseSpec(
        spec.name,
        RELEASE_ROLES,
        val_percent=spec.val_percent,
        where=within_limits,
        selection=f"status ok; {low} <= voxels <= {high or 'any'}",
    )
    try:
        return create_release(catalog, graph, release)
    except ReleaseExistsError as err:
        logger.warning("%s", err)
        return {"name": spec.name, "exists": True}
