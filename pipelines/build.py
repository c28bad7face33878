"""The build: ingest, plan, execute the plan on Ray, commit, release, report.

The step table (`pipelines.steps`) says what to make; the scheduler (`pipelines.scheduler`, pure) says which
call runs next; this module is the thin Ray loop around them. Actors write their outputs as packs into the data
root and return descriptors; the driver only schedules and commits registry rows in batches (every
`commit_every` results or `commit_interval_s`), so its memory and network traffic are metadata only, and a
crash loses nothing committed: a rerun plans only the rest, and packs written but never committed are orphans
for `gc`.
"""

import collections
import dataclasses
import datetime
import hashlib
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

from catalogs.commit import ArtifactRecord, commit_batch
from catalogs.keys import sha256_file
from catalogs.packs import ArraySlice, PackedAsset
from catalogs.planner import Plan, plan
from catalogs.releases import ReleaseExistsError, ReleaseSpec, SampleFilter, create_release
from catalogs.sources import SkippedSource
from catalogs.tables import FactoryCatalog
from encoders.dinov2 import load_dinov2
from encoders.slat_encoder import load_slat_encoder
from encoders.trellis_checkpoint import load_checkpoint
from encoders.weights import WeightsInfo
from infra.environments import render_env_facts
from infra.errors import ConfigError
from pipelines import scratch
from pipelines.build_config import BuildConfig, ReleaseConfig
from pipelines.compute import CallReply, CallRequest
from pipelines.executors import EncoderActor, RenderActor
from pipelines.ingest import ingest, register_env_maps
from pipelines.scheduler import STORED, Dispatch, Failure, Scheduler, Settled
from pipelines.steps import EnvMaps, StepTable, build_table
from render_jobs.recipes import EVAL_RECIPE, env_map_files
from render_jobs.supervisor import RenderWorkerConfig

logger = logging.getLogger(__name__)


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
    """asset -> occupied voxels, for the assets voxelized or encoded by this build."""
    latent_moments: dict[str, list] = dataclasses.field(default_factory=dict)
    """step -> [count, per-channel sum, per-channel sum of squares] over this build's latents."""
    failures: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """One per failed artifact: asset_id, step, reason (`infra.errors.Reason` value), message, stderr_tail."""
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
        """step -> per-channel mean and std over every latent this build made."""
        out = {}
        for step, (count, sums, squares) in self.latent_moments.items():
            mean = np.asarray(sums) / count
            std = np.sqrt(np.maximum(np.asarray(squares) / count - mean**2, 0.0))
            out[step] = {"mean": mean.round(4).tolist(), "std": std.round(4).tolist()}
        return out

    def observe(self, step: str, asset: str, record: ArtifactRecord) -> None:
        """Count one committed artifact into the report's numbers (its stats only: no array reaches here)."""
        self.computed[(step, "ok" if record.ok else "failed")] += 1
        self.step_seconds[step] += record.duration_s
        self.asset_seconds[asset] += record.duration_s
        if not record.ok:
            self.failures.append({"asset_id": asset, "step": step, "reason": record.reason,
                                  "message": record.message, "stderr_tail": record.stderr_tail})
            return
        if "num_voxels" in record.stats:
            self.voxels[asset] = int(record.stats["num_voxels"])
        moments = record.stats.get("latent_moments")
        if moments:
            count, sums, squares = self.latent_moments.get(step, [0, 0.0, 0.0])
            self.latent_moments[step] = [count + moments["count"], (np.asarray(sums) + moments["sum"]).tolist(),
                                         (np.asarray(squares) + moments["sum_sq"]).tolist()]

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


def model_weights(config: BuildConfig) -> dict[str, WeightsInfo]:
    """Digests of the configured models, read through the same code the encoder actors load them with."""
    _, slat = load_slat_encoder(config.slat_encoder, device="cpu")
    flow = load_checkpoint(config.slat_flow)[2]  # the tensors suffice: no 600M-parameter model is built
    return {"dinov2": load_dinov2(config.dinov2)[1], "slat_encoder": slat, "slat_flow": flow}


def find_env_maps(config: BuildConfig, bundled: Path) -> EnvMaps:
    """The maps each env-map-lit recipe draws (its `env_maps_dir`, else the ones bpy ships), hashed."""
    files: dict[str, tuple[Path, str]] = {}
    by_recipe = {}
    for recipe in config.recipes.values():
        if not recipe.needs_env_maps:
            continue
        folder = Path(recipe.env_maps_dir) if recipe.env_maps_dir else bundled
        found = env_map_files(folder) if folder.is_dir() else {}
        if not found:
            raise ConfigError(f"recipe {recipe.name}: no .exr or .hdr environment maps in {folder}")
        for name, path in found.items():
            digest = sha256_file(path)
            if files.setdefault(name, (path, digest))[1] != digest:
                raise ConfigError(f"two env maps named {name} differ ({files[name][0]}, {path}); rename one")
        by_recipe[recipe.name] = tuple(sorted(found))
    held_out = held_out_env_maps(config.release, by_recipe["relight"])
    if held_out:
        by_recipe[EVAL_RECIPE] = held_out
    return EnvMaps(files, by_recipe)


def held_out_env_maps(release: ReleaseConfig, relight_maps: tuple[str, ...]) -> tuple[str, ...]:
    """The relight maps Stage 2 never trains on: the configured names, else `num_held_out_env_maps` of them
    chosen by the sha256 of their names (a fixed choice that a new map rarely changes), in name order."""
    if release.held_out_env_maps:
        missing = sorted(set(release.held_out_env_maps) - set(relight_maps))
        if missing:
            raise ConfigError(f"release.held_out_env_maps: {missing} are not among the relight maps "
                              f"{list(relight_maps)}")
        chosen = release.held_out_env_maps
    else:
        chosen = sorted(relight_maps, key=lambda name: hashlib.sha256(name.encode()).hexdigest())
        chosen = chosen[: release.num_held_out_env_maps]
    if chosen and len(chosen) >= len(relight_maps):
        raise ConfigError(f"release: holding out {len(chosen)} of the {len(relight_maps)} relight env maps leaves "
                          f"none to train on; add maps or set release.num_held_out_env_maps lower")
    return tuple(sorted(chosen))


def prepare(config: BuildConfig, run_id: str, customize: Callable[[StepTable], StepTable] | None = None
            ) -> tuple[FactoryCatalog, StepTable, pa.Table, list[SkippedSource]]:
    """Catalog, step table (keyed by the models, the Blender version and the env maps), this build's sources
    (assets and env maps, registered) and the source entries ingest skipped."""
    catalog = FactoryCatalog(config.data_root, config.catalog_uri)
    facts = render_env_facts()
    env_maps = find_env_maps(config, facts.bundled_env_maps)
    table = build_table(config, model_weights(config), facts.blender_version, env_maps)
    table = customize(table) if customize else table
    assets, skipped = ingest(catalog, config, run_id)
    sources = pa.concat_tables([assets, register_env_maps(catalog, env_maps, run_id)])
    catalog.register_specs(list(table.graph.specs))
    return catalog, table, sources, skipped


def run_build(
    config: BuildConfig,
    *,
    retry_failed: bool = False,
    on_progress: Callable[[str, int, int], None] = lambda *_: None,
    customize: Callable[[StepTable], StepTable] | None = None,
) -> BuildRecord:
    """Build, commit and release; `on_progress(message, done, total)` after each commit. `customize` changes the
    paper's step table (a new step is one declaration and its compute function: `lambda t: t.with_steps(step)`)."""
    started = time.perf_counter()
    run_id = new_run_id()
    catalog, table, sources, skipped = prepare(config, run_id, customize)
    work = plan(catalog, table.graph, sources, retry_failed=retry_failed)
    record = BuildRecord(run_id, planned=work.counts(), skipped_sources=[s.to_dict() for s in skipped])
    if work.todo.num_rows:
        _init_ray(config)
        _Driver(config, catalog, table, work, sources, record, on_progress).run()
    if config.release.name:
        record.release = _release(catalog, table, config)
    record.seconds = time.perf_counter() - started
    return record


def _init_ray(config: BuildConfig) -> None:
    """The configured cluster, else `RAY_ADDRESS`'s (as `ray job submit` sets it), else a new local one (also
    for the address `local`, which never joins a cluster another process started)."""
    if ray.is_initialized():
        return
    address = config.execution.ray_address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address=address, resources={"render_slot": config.execution.render_slots}, log_to_driver=False,
                 include_dashboard=False)


class _Driver:
    """The Ray loop around the scheduler: submit its calls to actors, feed it their replies, commit what settles."""

    def __init__(self, config: BuildConfig, catalog: FactoryCatalog, table: StepTable, work: Plan, sources: pa.Table,
                 record: BuildRecord, on_progress: Callable[[str, int, int], None]) -> None:
        self.config, self.catalog, self.table, self.work = config, catalog, table, work
        self.record, self.on_progress = record, on_progress
        columns = ("asset_id", "step", "artifact_key", "inputs", "status")
        targets = dict(zip(columns, (work.targets[c].to_pylist() for c in columns)))
        self.keys = {(a, s): k for a, s, k in zip(targets["asset_id"], targets["step"], targets["artifact_key"])}
        self.lineage = {key: {i["role"]: i["key"] for i in inputs}
                        for key, inputs in zip(targets["artifact_key"], targets["inputs"])}
        todo: dict[str, dict[str, str]] = collections.defaultdict(dict)
        for asset, step, key in zip(*(work.todo[c].to_pylist() for c in ("asset_id", "step", "artifact_key"))):
            todo[asset][step] = key
        stored: dict[str, set[str]] = collections.defaultdict(set)
        for asset, step, status in zip(targets["asset_id"], targets["step"], targets["status"]):
            if status == "ok":
                stored[asset].add(step)
        columns = (sources[c].to_pylist() for c in ("asset_id", "source_id", "uri"))
        self.source = {asset: (source_id, uri) for asset, source_id, uri in zip(*columns)}
        self.total, self.done = work.todo.num_rows, 0
        self.report_dir = config.root / "reports" / record.run_id
        self.run_dir = config.scratch_dir / record.run_id
        scratch.remove_stale_runs(config.scratch_dir)
        self.claim = scratch.claim(self.run_dir)
        self.render_actors = self._render_actors()
        self.idle = list(self.render_actors)
        self.encoders: dict[str, list[Any]] = {}  # node id (or "any") -> its encoder actors
        self.scheduler = Scheduler(table.topology(), todo, stored, max_in_flight=config.execution.max_in_flight,
                                   capacity={"render": len(self.render_actors)})
        self.pending: dict[ray.ObjectRef, tuple[Dispatch, Any]] = {}  # call -> (its dispatch, its actor)
        self.producer: dict[int, Any] = {}  # call id -> the actor holding its transient output
        self.buffer: list[Settled] = []
        self.last_commit = time.monotonic()
        self.ok_before: dict[str, PackedAsset] | None = None

    def _render_actors(self) -> list[Any]:
        slots = int(ray.cluster_resources().get("render_slot", 0))
        if slots < 1:
            raise ConfigError("no node of the Ray cluster declares a render_slot resource (ray start --resources)")
        execution, worker = self.config.execution, self.table.workers["render"]
        supervisor = RenderWorkerConfig(timeout_s=execution.render_timeout_s, gpu_backend=execution.gpu_backend,
                                        allow_software_gl=execution.allow_software_gl)
        actor = ray.remote(RenderActor)
        return [
            actor.options(name=f"render-{self.record.run_id}-{i}", num_cpus=worker.num_cpus, num_gpus=worker.num_gpus,
                          resources=dict(worker.resources), max_restarts=2, max_task_retries=1)
            .remote(supervisor, str(self.config.data_root), str(self.run_dir), str(self.report_dir),
                    execution.keep_renders)
            for i in range(slots)
        ]

    def run(self) -> None:
        scheduler = self.scheduler
        while not scheduler.finished:
            for dispatch in scheduler.dispatch():
                self._submit(dispatch)
            if self.pending:
                ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=self.config.execution.commit_interval_s)
                if ready:
                    self._arrive(ready[0])
            for discard in scheduler.take_discards():
                self.producer.pop(discard.call_id).discard.remote(discard.transient)
            self.buffer += scheduler.take_settled()
            self._flush(force=False)
        self._flush(force=True)
        ray.get([actor.shutdown.remote() for actor in self.render_actors])
        scratch.release(self.claim)
        if not self.config.execution.keep_renders:  # every set was consumed; only empty folders remain here
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _submit(self, dispatch: Dispatch) -> None:
        call = self.table.calls[dispatch.call]
        source_id, uri = self.source[dispatch.asset]
        request = CallRequest(
            call=call.name, compute=call.compute, config=call.config, asset_id=dispatch.asset, source_id=source_id,
            uri=uri, keys=dispatch.keys,
            spec_hashes={step: self.table.graph.spec_hashes[step] for step in dispatch.keys},
            schemas={step: self.table[step].arrays for step in dispatch.keys},
            inputs={step: self._input(dispatch.asset, step, value) for step, value in dispatch.inputs.items()},
            lineage={step: self.lineage[key] for step, key in dispatch.keys.items()},
            run_id=self.record.run_id, transient=dispatch.transient,
        )
        actor = self.idle.pop() if call.worker == "render" else self._encoder(dispatch.node)
        ref = actor.run.options(name=f"{call.name}:{dispatch.asset}").remote(request)
        self.pending[ref] = (dispatch, actor)
        if call.transient:
            self.producer[dispatch.call_id] = actor

    def _arrive(self, ref: ray.ObjectRef) -> None:
        dispatch, actor = self.pending.pop(ref)
        if dispatch.worker == "render":
            self.idle.append(actor)
        try:
            reply: CallReply = ray.get(ref)
        except ray.exceptions.RayError as err:  # a lost worker: recorded, retried by --retry-failed
            self.scheduler.lost(dispatch.call_id, f"{type(err).__name__}: {err}"[:2000])
            self.producer.pop(dispatch.call_id, None)
            return
        failure = reply.failure and Failure(reply.failure.reason, reply.failure.message)
        self.scheduler.arrived(dispatch.call_id, reply.records, transient=reply.transient, node=reply.node,
                               failure=failure)
        if reply.transient is None:
            self.producer.pop(dispatch.call_id, None)

    def _input(self, asset: str, step: str, value: Any) -> PackedAsset:
        """Where an input's bytes are: written in this build (its record) or committed before (the catalog)."""
        if value != STORED:
            return value.packed
        if self.ok_before is None:  # read once: per asset it would make a large rebuild quadratic
            ok = self.catalog.ok_artifacts()
            rows = ok.select(["artifact_key", "pack_path", "arrays", "content_digest"]).to_pylist()
            self.ok_before = {
                r["artifact_key"]: PackedAsset(r["artifact_key"], r["pack_path"],
                                               tuple(ArraySlice.from_dict(a) for a in r["arrays"]), r["content_digest"])
                for r in rows
            }
        return self.ok_before[self.keys[(asset, step)]]

    def _encoder(self, node_id: str | None) -> Any:
        """An encoder actor on `node_id` (where a transient `lh` set lies), up to `encoders_per_node` of them,
        created on first use and taken in turn. A call that reads no transient (node_id None) goes to the first
        pool there is; with none yet, Ray places a new actor (so a head node without GPUs is no obstacle) and its
        pool is that of the node it landed on."""
        if node_id is None and not self.encoders:
            actor = self._new_encoder(None, 0)
            self.encoders[ray.get(actor.node_id.remote())] = [actor]
            return actor
        pool = node_id or next(iter(self.encoders))
        actors = self.encoders.setdefault(pool, [])
        if len(actors) < self.config.execution.encoders_per_node:
            actors.append(self._new_encoder(pool, len(actors)))
            return actors[-1]
        actors.append(actors.pop(0))  # round robin
        return actors[-1]

    def _new_encoder(self, node_id: str | None, index: int) -> Any:
        placement = {}
        if node_id is not None:
            placement["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
        worker = self.table.workers["encoder"]
        actor = ray.remote(EncoderActor).options(
            num_gpus=worker.num_gpus, num_cpus=worker.num_cpus, resources=dict(worker.resources),
            name=f"encoder-{self.record.run_id}-{(node_id or 'any')[:8]}-{index}", **placement)
        return actor.remote(worker.config, self.config.slat_flow, str(self.config.data_root),
                            self.config.execution.keep_renders)

    def _flush(self, *, force: bool) -> None:
        """Commit what has settled (per step one registry commit) once `commit_every` results wait or
        `commit_interval_s` has passed: few Iceberg snapshots, and a crash loses only uncommitted work."""
        execution = self.config.execution
        waited = time.monotonic() - self.last_commit
        due = len(self.buffer) >= execution.commit_every or waited >= execution.commit_interval_s
        if not self.buffer or not (force or due):
            return
        by_step: dict[str, list[Settled]] = collections.defaultdict(list)
        for settled in self.buffer:
            by_step[settled.step].append(settled)
        for step, items in by_step.items():
            records = [_record(item) for item in items]
            keys = pa.array([r.artifact_key for r in records])
            rows = self.work.todo.filter(pc.is_in(self.work.todo["artifact_key"], keys))
            commit_batch(self.catalog, rows, records, self.record.run_id)
            for item, record in zip(items, records):
                self.record.observe(step, item.asset, record)
            self.done += len(items)
            self.on_progress(f"{step}: {items[-1].asset}", self.done, self.total)
        self.buffer = []
        self.last_commit = time.monotonic()


def _record(settled: Settled) -> ArtifactRecord:
    """The registry record of a settled artifact: the worker's, or one for a failure the scheduler decided."""
    outcome = settled.outcome
    if isinstance(outcome, ArtifactRecord):
        return outcome
    return ArtifactRecord(settled.key, reason=outcome.reason.value, message=outcome.message, worker="driver")


def _release(catalog: FactoryCatalog, table: StepTable, config: BuildConfig) -> dict[str, Any]:
    spec = config.release
    voxels = table.step_recording("num_voxels")
    filters = [SampleFilter(voxels, "num_voxels", min=spec.min_voxels, max=spec.max_voxels)]
    filters += [SampleFilter(table.step_recording(f.stat), f.stat, min=f.min, max=f.max, equals=f.equals)
                for f in spec.filters]
    release = ReleaseSpec(spec.name, table.roles, split=spec.split, shared_roles=frozenset(table.shared_roles),
                          test_roles=frozenset(table.test_roles), filters=tuple(filters),
                          held_out_env_maps=table.held_out_env_maps)
    try:
        return create_release(catalog, table.graph, release)
    except ReleaseExistsError as err:
        logger.warning("%s", err)
        return {"name": spec.name, "exists": True}
