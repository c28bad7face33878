"""Where the render env lives (DESIGN section 3): found by configuration, never by a path baked in."""

import os
import sys
import tomllib
from pathlib import Path

from infra.errors import ConfigError

RENDER_PYTHON_ENV_VAR = "NEAR_RENDER_PYTHON"


def config_file() -> Path:
    """The per-environment config that `infra/setup.sh` writes into the main env."""
    return Path(sys.prefix) / "etc" / "near-factory.toml"


def find_render_python(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The render env's interpreter: the explicit value, else $NEAR_RENDER_PYTHON, else the main env's config.

    Raises:
        ConfigError: nothing configured, or the configured interpreter does not exist.
    """
    if explicit:
        candidate, origin = str(explicit), "the explicit argument"
    elif os.environ.get(RENDER_PYTHON_ENV_VAR):
        candidate, origin = os.environ[RENDER_PYTHON_ENV_VAR], f"${RENDER_PYTHON_ENV_VAR}"
    elif config_file().is_file():
        candidate, origin = tomllib.loads(config_file().read_text()).get("render_python", ""), str(config_file())
    else:
        raise ConfigError(
            f"no render env configured: run infra/setup.sh, or set ${RENDER_PYTHON_ENV_VAR} to the python of an "
            f"env with bpy==5.0.1 (looked in {config_file()})"
        )
    path = Path(candidate).expanduser()
    if not path.is_file():
        raise ConfigError(f"render env python {path} (from {origin}) does not exist; re-run infra/setup.sh")
    return path
