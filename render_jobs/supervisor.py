"""The render supervisor (main env): runs the render child, enforces limits, turns crashes into records.

Usable as-is inside a Ray actor: it holds one child process, renders one asset per `render` call, and
never raises for a bad asset. A wall-clock limit per asset kills the child's whole process group; the
child is restarted after `max_assets_per_child` assets or when its RSS passes `max_rss_gb`; the tail of
its stderr goes into every failure record. Each child gets a private temp folder (its TMPDIR) that the
supervisor removes when the child ends: a SIGKILLed child cannot clean up after itself.
"""

import collections
import dataclasses
import logging
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from infra.config import FrozenConfig
from infra.environments import find_render_python
from infra.errors import Reason
from render_jobs.protocol import (
    GPU_BACKEND_ENV_VAR,
    GPU_BACKENDS,
    GpuBackend,
    RenderRequest,
    RenderResult,
    WorkerInfo,
    decode,
    encode,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RenderWorkerConfig(FrozenConfig):
    """Limits and environment of one supervised render child."""

    render_python: str | None = None
    """The render env's interpreter; None finds it by configuration (`infra.environments`)."""
    timeout_s: float = 600.0
    """Wall-clock limit per asset, from request to result."""
    startup_timeout_s: float = 300.0
    """Limit for a fresh child to import bpy and render its warm-up frame (shader compilation included)."""
    max_assets_per_child: int = 100
    max_rss_gb: float = 8.0
    stderr_tail_lines: int = 80
    allow_software_gl: bool = False
    """Render on a software rasterizer (Mesa llvmpipe). Off: every asset fails with gl_software_fallback."""
    gpu_backend: GpuBackend = "opengl"
    """Blender's GPU backend. Vulkan renders faster on NVIDIA data-centre GPUs and needs far less CPU; where
    Blender cannot start it (no Vulkan driver), every asset fails with gpu_backend_unavailable."""

    def __post_init__(self) -> None:
        if self.gpu_backend not in GPU_BACKENDS:
            raise ValueError(f"gpu_backend must be one of {GPU_BACKENDS}, got {self.gpu_backend!r}")


class _Child:
    """One render child process, its result pipe and temp folder, and a thread that keeps its stderr tail.

    The temp folder (`near-render-*` in the system temp dir) is the child's TMPDIR, so the worker's scratch
    and Blender's `blender_*` session folder land in it; `kill` removes it.
    """

    def __init__(self, python: Path, tail_lines: int, env: dict[str, str]) -> None:
        self.temp_dir = Path(tempfile.mkdtemp(prefix="near-render-"))
        temp = str(self.temp_dir)
        try:
            self.proc = subprocess.Popen(
                [str(python), "-u", "-m", "render_jobs.worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group: a kill takes every helper it spawned
                env={**env, "TMPDIR": temp, "TEMP": temp, "TMP": temp},
            )
        except OSError:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            raise
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._reader = threading.Thread(target=self._drain_stderr, name=f"render-child-{self.proc.pid}-stderr", daemon=True)
        self._reader.start()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)
        self._buffer = b""
        self.assets_done = 0

    def _drain_stderr(self) -> None:
        for raw in self.proc.stderr:
            self.tail.append(raw.decode(errors="replace").rstrip())

    def stderr_tail(self) -> str:
        time.sleep(0.05)  # let the reader thread catch the last lines of a dying child
        return "\n".join(self.tail)

    def send(self, request: RenderRequest) -> None:
        self.proc.stdin.write(encode(request))
        self.proc.stdin.flush()

    def receive(self, timeout_s: float) -> Any:
        """The next message; None when the deadline passes; EOFError when the child exits first."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._selector.select(timeout=remaining):
                return None
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
            if not chunk:
                raise EOFError(f"render child {self.proc.pid} closed its result pipe")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return decode(line)

    def rss_bytes(self) -> int:
        try:
            return psutil.Process(self.proc.pid).memory_info().rss
        except psutil.Error:
            return 0

    def kill(self) -> None:
        """Kill the child's process group and remove its temp folder; every way a child ends comes here."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self._selector.close()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self._reader.join(timeout=5)


class RenderSupervisor:
    """Renders assets one at a time in a supervised child; a context manager.

    Examples:
        >>> with RenderSupervisor(RenderWorkerConfig(allow_software_gl=True)) as supervisor:  # doctest: +SKIP
        ...     result = supervisor.render(request)
    """

    def __init__(self, cfg: RenderWorkerConfig = RenderWorkerConfig(), *, env: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        self.python = find_render_python(cfg.render_python)
        self.env = {**os.environ, **(env or {}), GPU_BACKEND_ENV_VAR: cfg.gpu_backend}
        self._child: _Child | None = None
        self.info: WorkerInfo | None = None
        self.restarts = 0

    def __enter__(self) -> "RenderSupervisor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def child_pid(self) -> int | None:
        return self._child.proc.pid if self._child else None

    def child_rss_bytes(self) -> int:
        return self._child.rss_bytes() if self._child else 0

    def start(self) -> WorkerInfo:
        """Start a child (if none runs) and wait until it has rendered its warm-up frame."""
        if self._child is not None:
            return self.info
        child = _Child(self.python, self.cfg.stderr_tail_lines, self.env)
        try:
            message = child.receive(self.cfg.startup_timeout_s)
        except EOFError:
            message = None
        if not isinstance(message, WorkerInfo):
            tail = child.stderr_tail()
            child.kill()
            raise RuntimeError(f"render child did not start within {self.cfg.startup_timeout_s:.0f}s:\n{tail}")
        self._child, self.info = child, message
        logger.info("render child pid=%d ready in %.1fs on %s", message.pid, message.startup_s, message.gl_renderer)
        return message

    def close(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child = None

    def render(self, request: RenderRequest) -> RenderResult:
        """Render one asset. Never raises for a bad asset: failures come back as results with a reason."""
        try:
            info = self.start()
        except RuntimeError as err:
            return RenderResult(request.asset_path, "failed", reason=Reason.WORKER_CRASHED.value, message=str(err))
        if info.gpu_backend != self.cfg.gpu_backend:
            return RenderResult(
                request.asset_path, "failed", reason=Reason.GPU_BACKEND_UNAVAILABLE.value,
                message=f"asked for the {self.cfg.gpu_backend} GPU backend but Blender started {info.gpu_backend} "
                        f"(on {info.gl_renderer!r}); is a Vulkan driver (ICD) installed?",
            )
        if info.is_software_gl and not self.cfg.allow_software_gl:
            return RenderResult(
                request.asset_path, "failed", reason=Reason.GL_SOFTWARE_FALLBACK.value,
                message=f"EEVEE would render on {info.gl_renderer!r}; allow software GL explicitly to accept that",
            )
        child = self._child
        started = time.monotonic()
        try:
            child.send(request)
        except BrokenPipeError:
            return self._fail_and_restart(request, Reason.WORKER_CRASHED, "render child exited before the request")
        try:
            result = child.receive(self.cfg.timeout_s)
        except EOFError:
            code = child.proc.wait()
            reason = Reason.OOM if code == -signal.SIGKILL and _oom_killed(child) else Reason.WORKER_CRASHED
            return self._fail_and_restart(request, reason, f"render child exited with {_describe_exit(code)}")
        elapsed = time.monotonic() - started
        if result is None:
            return self._fail_and_restart(request, Reason.TIMEOUT, f"no result within {self.cfg.timeout_s:.0f}s; child killed")
        child.assets_done += 1
        if not result.is_ok:
            result = dataclasses.replace(result, stderr_tail=child.stderr_tail())
        result = dataclasses.replace(result, timings_s={**result.timings_s, "wall_s": elapsed})
        self._recycle_if_due(child)
        return result

    def _fail_and_restart(self, request: RenderRequest, reason: Reason, message: str) -> RenderResult:
        child = self._child
        child.kill()
        tail = child.stderr_tail()
        self._child = None
        self.restarts += 1
        _remove_partials(Path(request.out_dir), child.proc.pid)
        logger.warning("asset=%s %s: %s", request.asset_path, reason.value, message)
        return RenderResult(request.asset_path, "failed", reason=reason.value, message=message, stderr_tail=tail)

    def _recycle_if_due(self, child: _Child) -> None:
        rss_gb = child.rss_bytes() / 2**30
        if child.assets_done >= self.cfg.max_assets_per_child or rss_gb > self.cfg.max_rss_gb:
            logger.info("recycling render child pid=%d after %d assets at %.2f GB RSS", child.proc.pid, child.assets_done, rss_gb)
            self.close()
            self.restarts += 1


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def _oom_killed(child: _Child) -> bool:
    return any("Out of memory" in line or "MemoryError" in line for line in child.tail)


def _remove_partials(out_dir: Path, pid: int) -> None:
    """A killed child cannot clean up: remove its half-written folder so nothing partial stays visible."""
    shutil.rmtree(out_dir.with_name(f"{out_dir.name}.partial-{pid}"), ignore_errors=True)
