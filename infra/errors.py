"""Typed errors with reason codes: failures are data (DESIGN section 5, STYLE rule 5)."""

import enum


class Reason(str, enum.Enum):
    """Why an asset failed; stored verbatim in reports and catalogs."""

    IMPORT_ERROR = "import_error"
    UNSUPPORTED_FORMAT = "unsupported_format"
    EMPTY_SCENE = "empty_scene"
    BLANK_RENDER = "blank_render"
    MISSING_TEXTURES = "missing_textures"
    TIMEOUT = "timeout"
    OOM = "oom"
    WORKER_CRASHED = "worker_crashed"
    GL_SOFTWARE_FALLBACK = "gl_software_fallback"
    GPU_BACKEND_UNAVAILABLE = "gpu_backend_unavailable"
    NAN_BBOX = "nan_bbox"
    RENDER_ERROR = "render_error"
    INVALID_RENDER_SET = "invalid_render_set"
    NON_FINITE = "non_finite"
    INVALID_NAME = "invalid_name"
    UNREADABLE_FILE = "unreadable_file"
    CORRUPT_ARCHIVE = "corrupt_archive"
    MISSING_MEMBER = "missing_member"
    UNSAFE_ARCHIVE_MEMBER = "unsafe_archive_member"
    TOO_LARGE = "too_large"
    UPSTREAM_FAILED = "upstream_failed"
    """An input of the step failed (in this build or before): the step cannot run."""
    TOO_FEW_VIEWS = "too_few_views"
    INPUT_CHANGED = "input_changed"
    """An input's bytes differ from the content its key was derived from (an env map rewritten mid-build)."""
    DAMAGED_INPUT = "damaged_input"
    """A stored input's pack is missing or damaged."""
    INTERNAL_ERROR = "internal_error"
    """A step's code raised an unexpected exception (a bug to report: the message holds the traceback's tail)."""
    INVALID_OUTPUT = "invalid_output"
    """A step produced arrays that do not match its role's declared schema."""


class FactoryError(Exception):
    """Base of every error the factory raises on purpose."""


class AssetRejected(FactoryError):
    """Bad input: never retried, recorded with its reason."""

    def __init__(self, asset_id: str, reason: Reason, detail: str = "") -> None:
        super().__init__(asset_id, reason, detail)  # every field in .args: survives pickling through Ray
        self.asset_id, self.reason, self.detail = asset_id, Reason(reason), detail

    def __str__(self) -> str:
        return f"{self.asset_id}: {self.reason.value} {self.detail}".rstrip()


class StepFailed(FactoryError):
    """One step of one asset could not be made: recorded as a failed artifact with its reason, never retried
    by the same build."""

    def __init__(self, reason: Reason, message: str = "", stderr_tail: str = "") -> None:
        super().__init__(reason, message, stderr_tail)  # every field in .args: survives pickling through Ray
        self.reason, self.message, self.stderr_tail = Reason(reason), message, stderr_tail

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.message}".rstrip(": ")


class TransientError(FactoryError):
    """Worth retrying with backoff (a lost worker, a storage hiccup)."""


class NotFound(FactoryError, FileNotFoundError):
    """A file or folder that a command or configuration names does not exist."""


class ConfigError(FactoryError, ValueError):
    """A configuration that cannot work; raised at start-up, before any asset is touched."""
