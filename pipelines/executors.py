"""Ray actors that run the step table's calls and write their outputs as packs straight into the data root.

An actor runs a call's compute function (`pipelines.compute`), checks each output against its step's declared
arrays, writes one pack per step and returns only `ArtifactRecord`s (pack descriptors, digests, stats): the
driver commits them. A pack whose call dies before the driver commits it is an orphan that `gc` collects.

A render actor holds one `RenderSupervisor`, so its child (and its compiled shaders) lives across assets; it
asks for one `render_slot`, a resource every node declares by how many renders it can run. Renders land on
node-local scratch; an `lh` set stays there (transient) until the encode call on the same node has read it.
"""

import os
import shutil
import socket
import time
import traceback
from pathlib import Path
from typing import Any

import ray
import torch

from catalogs.commit import ArtifactRecord
from catalogs.packs import write_pack
from catalogs.storage import root_path
from encoders.asset_encoder import AssetEncoder
from encoders.slat_flow import SlatFlowModel, load_slat_flow
from encoders.weights import WeightsInfo
from infra.errors import ConfigError, Reason, StepFailed
from pipelines import scratch
from pipelines.compute import CallReply, CallRequest, Inputs
from pipelines.local_render import asset_dir_name
from pipelines.steps import EncoderRuntime
from render_jobs.protocol import RenderRequest, RenderResult
from render_jobs.render_set import RenderSet
from render_jobs.supervisor import RenderSupervisor, RenderWorkerConfig


class StepWorker:
    """What both actors share: run a call, write its packs, return records."""

    def __init__(self, data_root: str, keep_transient: bool) -> None:
        self.data_root, self.keep_transient = root_path(data_root), keep_transient
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else socket.gethostname()
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def node_id(self) -> str:
        return self.node

    def run(self, request: CallRequest) -> CallReply:
        clock = time.perf_counter()
        try:
            output = request.compute(self, request, Inputs(self.data_root, request))
        except Exception as err:  # noqa: BLE001 - one asset's failure is data, whatever raised it
            if not isinstance(err, StepFailed):
                err = StepFailed(Reason.INTERNAL_ERROR, "".join(traceback.format_exception(err))[-2000:])
            seconds = (time.perf_counter() - clock) / max(len(request.keys), 1)
            return CallReply({step: self._failed(key, err, seconds) for step, key in request.keys.items()}, self.node,
                             failure=err)
        seconds = (time.perf_counter() - clock) / max(len(request.keys), 1)
        records = {}
        for step, key in request.keys.items():
            made = output.steps.get(step)
            problems = (_schema_problems(request.schemas[step], made.arrays) if made
                        else [f"{request.call} made no {step}"])
            if problems:
                records[step] = self._failed(key, StepFailed(Reason.INVALID_OUTPUT, "; ".join(problems)), seconds)
                continue
            clock = time.perf_counter()
            (packed,) = write_pack(self.data_root, step, request.spec_hashes[step], request.run_id,
                                   [(key, made.arrays)])
            writing = time.perf_counter() - clock  # charged to the step: it holds the worker like the compute
            records[step] = ArtifactRecord(key, packed, stats={**made.stats, "pack_write_s": round(writing, 4)},
                                           worker=self.name,
                                           duration_s=writing + (seconds if made.seconds is None else made.seconds))
        return CallReply(records, self.node, output.transient)

    def discard(self, path: str | None) -> None:
        """Delete a transient output on this node (unless the build keeps renders)."""
        if path and not self.keep_transient:
            shutil.rmtree(path, ignore_errors=True)

    def _failed(self, key: str, err: StepFailed, seconds: float) -> ArtifactRecord:
        return ArtifactRecord(key, reason=err.reason.value, message=err.message[:2000],
                              stderr_tail=err.stderr_tail[-2000:], worker=self.name, duration_s=seconds)


def _schema_problems(declared: tuple, arrays: Any) -> list[str]:
    names = {spec.name for spec in declared}
    problems = [f"undeclared array {name!r}" for name in sorted(set(arrays) - names)]
    problems += [f"missing array {name!r}" for name in sorted(names - set(arrays))]
    return problems + [p for spec in declared if spec.name in arrays and (p := spec.check(arrays[spec.name]))]


class RenderActor(StepWorker):
    """Renders one asset at a time through its own supervised render child, into the run's folder of this node's
    scratch, which it claims (and where it first removes what killed builds left: `pipelines.scratch`); keeps a
    contact sheet of every set in the build's report."""

    def __init__(self, worker: RenderWorkerConfig, data_root: str, run_dir: str, report_dir: str,
                 keep_renders: bool) -> None:
        super().__init__(data_root, keep_renders)
        scratch.remove_stale_runs(Path(run_dir).parent)
        self.claim = scratch.claim(Path(run_dir))
        self.run_dir, self.report_dir = Path(run_dir), root_path(report_dir)
        self.supervisor = RenderSupervisor(worker)

    def render(self, request: CallRequest) -> tuple[RenderResult, RenderSet]:
        """Render the request's recipe (`request.config`) of its asset; raises StepFailed with the render's reason."""
        recipe = request.config
        out_dir = self.run_dir / recipe.name / asset_dir_name(Path(request.asset_id), request.source_id)
        # Every set a build renders is read back once on this node, then packed or encoded: uncompressed frames.
        result = self.supervisor.render(
            RenderRequest(request.uri, str(out_dir), request.source_id, recipe.to_dict(), frame_format="npy")
        )
        if not result.is_ok:
            known = result.reason in Reason._value2member_map_
            reason = Reason(result.reason) if known else Reason.RENDER_ERROR
            raise StepFailed(reason, result.message, result.stderr_tail)
        sheet = Path(result.out_dir) / "contact_sheets" / "beauty.png"
        if sheet.exists():
            (self.report_dir / "sheets").mkdir(parents=True, exist_ok=True)
            (self.report_dir / "sheets" / f"{out_dir.name}_{recipe.name}.png").write_bytes(sheet.read_bytes())
        try:
            return result, RenderSet.open(result.out_dir)
        except (OSError, ValueError) as err:
            raise StepFailed(Reason.INVALID_RENDER_SET, str(err)) from err

    def shutdown(self) -> None:
        self.supervisor.close()
        scratch.release(self.claim)


class EncoderActor(StepWorker):
    """Holds DINOv2 and the SLAT encoder (and, from its first shaded SLAT on, the flow model) on the device and in
    the dtype the step table's keys say (`pipelines.steps.EncoderRuntime`)."""

    def __init__(self, runtime: EncoderRuntime, slat_flow: str, data_root: str, keep_renders: bool) -> None:
        super().__init__(data_root, keep_renders)
        if runtime.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"encoder actor on {self.name}: the keys say cuda, but this process sees no GPU")
        self.device = torch.device(runtime.device)
        self.encoder = AssetEncoder(runtime.encoder, device=self.device)
        self.slat_flow = slat_flow
        self._flow: tuple[SlatFlowModel, WeightsInfo] | None = None

    def weights(self) -> dict[str, str]:
        return {name: info.digest for name, info in self.encoder.weights.items()}

    def flow(self) -> tuple[SlatFlowModel, WeightsInfo]:
        if self._flow is None:
            self._flow = load_slat_flow(self.slat_flow, device=self.device)
        return self._flow
