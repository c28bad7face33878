"""TRELLIS checkpoint files: `<name>.safetensors` (release names, shapes and dtypes, no metadata) beside
`<name>.json` = `{"name": <class>, "args": {...}}`, from a local path or a hub id.

Shared by every TRELLIS-compatible model (the SLAT encoder, the SLAT flow model), so they resolve references,
check tensors and mark random weights the same way.
"""

import json
import os
from pathlib import Path
from typing import Any, TypeVar

import safetensors.torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from torch import Tensor

from encoders.weights import (
    RANDOM_INIT_MARKER,
    WeightsInfo,
    is_local,
    is_random_init,
    mark_random_init,
    marker_path,
    state_dict_digest,
)
from infra.config import FrozenConfig
from infra.errors import ConfigError

ConfigT = TypeVar("ConfigT", bound=FrozenConfig)


def save_checkpoint(
    state_dict: dict[str, Tensor],
    path: str | os.PathLike[str],
    *,
    trellis_json: dict[str, Any],
    random_init_seed: int | None,
) -> None:
    """Write `path` (`<dir>/<name>.safetensors`) and `<dir>/<name>.json`; random weights get the marker and a
    stale marker of earlier random weights at `path` is removed. Tensors are written as given."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"expected a path ending in .safetensors, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({name: t.contiguous() for name, t in state_dict.items()}, path)
    path.with_suffix(".json").write_text(json.dumps(trellis_json, indent=4))
    marker_path(path).unlink(missing_ok=True)
    if random_init_seed is not None:
        mark_random_init(path, seed=random_init_seed)


def load_checkpoint(
    reference: str,
) -> tuple[dict[str, Tensor], dict[str, Any] | None, WeightsInfo, int | None]:
    """The stored tensors of a reference, its TRELLIS JSON (None when absent), where they came from, and the
    seed of random weights (None for real ones).

    Args:
        reference: a local `<name>.safetensors`, the same path without the suffix (as TRELLIS's
            `pipeline.json` writes `ckpts/<name>`), or a hub id `owner/repo/path/in/repo/<name>`.
    """
    weights_path, config_path = _fetch(reference)
    state_dict = safetensors.torch.load_file(weights_path)
    trellis_json = json.loads(config_path.read_text()) if config_path is not None else None
    info = WeightsInfo(reference, state_dict_digest(state_dict), is_random_init(weights_path))
    seed = json.loads(marker_path(weights_path).read_text())["seed"] if info.is_random_init else None
    return state_dict, trellis_json, info, seed


def config_from_trellis_json(
    trellis_json: dict[str, Any],
    config_class: type[ConfigT],
    *,
    name: str,
    fixed_args: dict[str, Any],
    ignored_args: tuple[str, ...],
    source: str,
) -> ConfigT:
    """The config of a TRELLIS JSON: its args, less those with one supported value (checked) and those ignored.

    `name` or its training variant `Elastic<name>` (same weights) is accepted; `mlp_ratio`, written as an int
    when integral, is read as a float.
    """
    if trellis_json.get("name") not in (name, f"Elastic{name}"):
        raise ConfigError(f"{source}: expected a {name} config, got name {trellis_json.get('name')!r}")
    args = dict(trellis_json.get("args", {}))
    for arg, value in fixed_args.items():
        if args.pop(arg, value) != value:
            raise ConfigError(
                f"{source}: only {arg}={value!r} is supported, got {trellis_json['args'][arg]!r}"
            )
    for arg in ignored_args:
        args.pop(arg, None)
    try:
        return config_class.from_dict(args)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err


def check_state_dict(state_dict: dict[str, Tensor], *, expected: dict[str, Tensor], source: str) -> None:
    """Raise a ConfigError naming every missing, unexpected and mis-shaped tensor."""
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    mis_shaped = [
        f"{name} {tuple(state_dict[name].shape)} (expected {tuple(tensor.shape)})"
        for name, tensor in expected.items()
        if name in state_dict and state_dict[name].shape != tensor.shape
    ]
    if missing or unexpected or mis_shaped:
        raise ConfigError(
            f"{source} does not fit the model config: missing {missing}, unexpected {unexpected}, "
            f"mis-shaped {mis_shaped}"
        )


def _fetch(reference: str) -> tuple[Path, Path | None]:
    """The local `.safetensors` of a reference (downloaded for a hub id) and its `.json`, if any."""
    stem = reference.removesuffix(".safetensors")
    local = Path(stem + ".safetensors").expanduser()
    if local.is_file():
        config_path = local.with_suffix(".json")
        return local, config_path if config_path.is_file() else None
    parts = stem.split("/")
    if is_local(reference) or stem.startswith(("/", ".", "~")) or len(parts) < 3 or "" in parts:
        raise ConfigError(f"{reference!r}: no file {local}, and not a hub id owner/repo/path/in/repo/name")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    weights_path = Path(hf_hub_download(repo_id=repo_id, filename=f"{filename}.safetensors"))
    config_path = _hub_download_optional(repo_id, f"{filename}.json")
    _hub_download_optional(repo_id, f"{filename}.{RANDOM_INIT_MARKER}")  # lands beside the weights
    return weights_path, config_path


def _hub_download_optional(repo_id: str, filename: str) -> Path | None:
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except EntryNotFoundError:
        return None
