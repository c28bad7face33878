"""What the catalogs refuse, by name: every error names the object (root, catalog, pack, release) and the reason.

Like zarr's `BaseZarrError`, each class also subclasses the builtin a caller would catch (`FileNotFoundError`
for what is absent, `ValueError` for what is malformed), under the project's `FactoryError`.
"""

import re

from infra.errors import FactoryError

RELEASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A release name is one plain path component: no separators, no leading dot, at most 128 characters."""


class CatalogError(FactoryError):
    """Base of the catalogs' errors."""


class NotADataRoot(CatalogError, FileNotFoundError):
    """The folder does not exist or holds no data root (a mistyped `--root`)."""


class CatalogMismatch(CatalogError):
    """The catalog does not belong to this data root: another root's, an empty one, or a moved legacy root's."""


class DamagedPackError(CatalogError):
    """Bytes a read needs are missing or do not decode: never returned as fill values."""

    def __init__(self, pack_path: str, array: str, detail: str, where: str = "") -> None:
        super().__init__(pack_path, array, detail, where)  # every field in .args: survives pickling through Ray
        self.pack_path, self.array, self.detail, self.where = pack_path, array, detail, where

    def __str__(self) -> str:
        sample = f"{self.where}: " if self.where else ""
        array = f", array {self.array!r}" if self.array else ""
        return f"{sample}pack {self.pack_path}{array}: {self.detail}"


class ReleaseNotFound(CatalogError, FileNotFoundError):
    """No published release of that name."""


class ReleaseIntegrityError(CatalogError):
    """The release on disk is not the one pinned or recorded: a changed or unreadable manifest or record."""


class ReleaseExistsError(CatalogError, FileExistsError):
    """A release of this name was already published."""


class InvalidReleaseName(CatalogError, ValueError):
    """A release name that is not one plain path component."""


class GcRefused(CatalogError):
    """What is live cannot be established, so nothing may be deleted."""


class StaleVersionError(CatalogError):
    """A step's code changed but its explicit version did not."""


def check_release_name(name: object) -> str:
    """`name` if it is a plain release name (`RELEASE_NAME`), else InvalidReleaseName."""
    if not isinstance(name, str) or not RELEASE_NAME.fullmatch(name):
        raise InvalidReleaseName(
            f"invalid release name {name!r}: use letters, digits, '.', '_' and '-' (not first), at most 128"
        )
    return name
