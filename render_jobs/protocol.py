"""The supervisor <-> render child protocol: one JSON object per line over a private pipe.

Both sides import this module (main env and render env), so it is stdlib only.
"""

import dataclasses
import json
from typing import Any, Literal, Self, get_args

Status = Literal["ok", "failed"]
GpuBackend = Literal["opengl", "vulkan"]
GPU_BACKENDS: tuple[str, ...] = get_args(GpuBackend)
GPU_BACKEND_ENV_VAR = "NEAR_GPU_BACKEND"
"""How the supervisor tells a child which GPU backend to start Blender with (render_jobs.gpu_backend)."""


@dataclasses.dataclass(frozen=True)
class RenderRequest:
    """Render one asset with one recipe into `out_dir` (created atomically: it appears only when complete)."""

    asset_path: str
    out_dir: str
    source_id: str
    """sha256 of the asset's bytes; seeds cameras and lights."""
    recipe: dict[str, Any]
    """A `RecipeConfig` as a dict."""
    frame_format: str = "exr"
    """How frames are stored (`render_set.FRAME_FORMATS`): `npy` for a set only the next step reads back."""


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """What the child reports once it is ready: which Blender, GPU backend and GL implementation it renders with."""

    pid: int
    bpy_version: str
    gpu_backend: str
    """'opengl' or 'vulkan', as Blender reports it after the warm-up render."""
    gl_renderer: str
    gl_vendor: str
    gl_device_type: str
    """'SOFTWARE' when EEVEE runs on a CPU rasterizer (Mesa llvmpipe)."""
    startup_s: float
    anisotropic_filter: str
    """Blender's anisotropic texture filter preference every render of this child uses: 'FILTER_0' (off) on
    software GL, else Blender's default."""

    @property
    def is_software_gl(self) -> bool:
        return is_software_gl(self.gl_renderer, self.gl_device_type)


def is_software_gl(gl_renderer: str, gl_device_type: str) -> bool:
    """Whether EEVEE draws on a CPU rasterizer (Mesa llvmpipe), as Blender reports it after a first render."""
    return gl_device_type == "SOFTWARE" or "llvmpipe" in gl_renderer.lower()


@dataclasses.dataclass(frozen=True)
class RenderResult:
    """The outcome for one asset. Failures are data: a reason code, a message and the child's stderr tail."""

    asset_path: str
    status: Status
    reason: str | None = None
    message: str = ""
    out_dir: str | None = None
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    timings_s: dict[str, float] = dataclasses.field(default_factory=dict)
    stderr_tail: str = ""

    @property
    def is_ok(self) -> bool:
        return self.status == "ok"


def encode(message: Any) -> bytes:
    """One line of JSON for a protocol dataclass, tagged with its type."""
    return (json.dumps({"type": type(message).__name__, **dataclasses.asdict(message)}) + "\n").encode()


_TYPES = {cls.__name__: cls for cls in (RenderRequest, WorkerInfo, RenderResult)}


def decode(line: bytes | str) -> RenderRequest | WorkerInfo | RenderResult:
    """The protocol dataclass encoded on `line`; ValueError on anything else."""
    try:
        data = json.loads(line)
        cls: type[Self] = _TYPES[data.pop("type")]
        return cls(**data)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"not a protocol message: {line[:200]!r}") from err
