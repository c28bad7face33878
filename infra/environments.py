"""Where the render env lives (DESIGN section 3): found by configuration, never by a path baked in."""

import dataclasses
import functools
import json
import os
import subprocess
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


RENDER_ENV_QUERY = (
    "import bpy, json; print(json.dumps({'blender_version': bpy.app.version_string, "
    "'bundled_env_maps': bpy.utils.system_resource('DATAFILES', path='studiolights/world')}))"
)


@dataclasses.dataclass(frozen=True)
class RenderEnvFacts:
    """What the render env contributes to render outputs: its Blender and the env maps that bpy ships."""

    blender_version: str
    bundled_env_maps: Path


@functools.cache
def render_env_facts(python: Path | None = None) -> RenderEnvFacts:
    """Asked once per process of the render env's interpreter (only it has bpy; about a second)."""
    python = python or find_render_python()
    result = subprocess.run([str(python), "-c", RENDER_ENV_QUERY], capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(f"render env {python} cannot import bpy: {result.stderr.strip()[-500:]}")
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    return RenderEnvFacts(facts["blender_version"], Path(facts["bundled_env_maps"]))
