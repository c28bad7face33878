"""Model weights: resolve a local path or a Hugging Face hub id, digest them, and tell random test weights apart.

No weights can be downloaded on the factory's CI machines, so tests and the demo build models with random
weights and save them through the same files a user loads real weights from. Such files carry a marker beside
them (`mark_random_init`); everything computed from them is flagged `random_weights` downstream, and their
digest (part of every cache key, DESIGN section 7) keeps them apart from real ones.
"""

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

RANDOM_INIT_MARKER = "near-random-init.json"
"""Marker file name: inside a model folder, or `<file stem>.near-random-init.json` beside a weights file."""


@dataclasses.dataclass(frozen=True)
class WeightsInfo:
    """Where a model's weights came from and what they are."""

    reference: str
    """The local path or hub id the user gave."""
    digest: str
    """sha256 over the state dict (names, dtypes, shapes, bytes): equal weights, equal digest, any file format."""
    is_random_init: bool
    """True for random weights made by `mark_random_init`'s callers (tests, the demo): outputs are not real."""


def marker_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    return path / RANDOM_INIT_MARKER if path.is_dir() else path.with_name(f"{path.stem}.{RANDOM_INIT_MARKER}")


def mark_random_init(path: str | os.PathLike[str], *, seed: int) -> None:
    """Mark the weights saved at `path` (a file or a model folder) as random, made with `seed`."""
    marker_path(path).write_text(json.dumps({"random_init": True, "seed": seed}) + "\n")


def is_random_init(path: str | os.PathLike[str]) -> bool:
    return marker_path(path).exists()


def is_local(reference: str) -> bool:
    """A reference names a local file or folder when it exists on disk; otherwise it is a hub id."""
    return Path(reference).expanduser().exists()


def state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
