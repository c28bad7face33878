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


class FactoryError(Exception):
    """Base of every error the factory raises on purpose."""


class AssetRejected(FactoryError):
    """Bad input: never retried, recorded with its reason."""

    def __init__(self, asset_id: str, reason: Reason, detail: str = "") -> None:
        super().__init__(asset_id, reason, detail)  # every field in .args: survives pickling through Ray
        self.asset_id, self.reason, self.detail = asset_id, Reason(reason), detail

    def __str__(self) -> str:
        return f"{self.asset_id}: {self.reason.value} {self.detail}".rstrip()


class TransientError(FactoryError):
    """Worth retrying with backoff (a lost worker, a storage hiccup)."""


class NotFound(FactoryError, FileNotFoundError):
    """A file or folder that a command or configuration names does not exist."""


class ConfigError(FactoryError, ValueError):
    """A configuration that cannot work; raised at start-up, before any asset is touched."""
