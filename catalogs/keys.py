"""Identity of steps and artifacts: SHA-256 over canonical JSON, derived without reading any tensor.

    source_id          = sha256(source bytes)                                  (computed where sources are read)
    spec_hash(step)    = H(step, explicit version, params, model weight digests, opted-in environment)
    artifact_key(s, a) = H("artifact/v1", spec_hash(s), {input role: input id})
    input id           = source_id for the raw source, else the upstream step's artifact_key, or, for content
                         a step draws per asset (the env maps a render's frames use), that content's sha256

so changing one step's spec changes its keys and, through the input ids, the keys of everything downstream
of it, and nothing else; new bytes of one env map change only the keys of the renders that drew it. A step
may run for some sources only (`StepSpec.only`: render_eval for test assets); it and the steps reading it then
have no key for the others, and the keys it has do not depend on that choice. Canonical JSON: sorted keys, no
whitespace, floats by `repr`, NaN refused.
"""

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

SOURCE = "source"
"""The input role naming the raw asset file."""
ENV_MAP_KIND = "env_map"
"""`sources.kind` of an environment map: steps run over assets or over env maps (`StepSpec.over`)."""


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes: a source's `source_id`, a manifest's pin."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(value: Any) -> str:
    return _CANONICAL.encode(value)


def digest(value: Any) -> str:
    """Hex SHA-256 of a JSON-able value's canonical form."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What a step computes. Everything that enters `spec_hash` is explicit; code is tracked by `version`."""

    name: str
    version: str
    """Bumped by hand when the step's output changes meaning (Dagster's `code_version`)."""
    inputs: tuple[str, ...] = (SOURCE,)
    """Input roles: `source` and/or names of upstream steps."""
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    models: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Model role -> sha256 of its weights."""
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Opted-in environment facts that change outputs (for example the Blender major version)."""
    implementation: tuple[str, ...] = ()
    """Modules whose source defines the step: fingerprinted to catch a forgotten version bump, not hashed."""
    over: str = "asset"
    """Which sources the step runs over: `asset` (every source that is not an env map) or `env_map`."""
    draws: Callable[[str], Mapping[str, str]] | None = dataclasses.field(default=None, compare=False)
    """source_id -> {input role: content sha256} of the content this asset's output is made from besides its
    inputs (the env maps its frames draw): part of the artifact key, not of the spec hash."""
    only: Callable[[str], bool] | None = dataclasses.field(default=None, compare=False)
    """source_id -> whether the step runs for that source (render_eval: test assets only, `SplitRule.is_test`);
    None runs it for every source. Steps reading a skipped step are skipped too. Not part of the spec hash: it
    selects targets, it does not change content (an asset's key is the same whatever the rule)."""

    def __post_init__(self) -> None:
        if not self.name or self.name == SOURCE:
            raise ValueError(f"invalid step name {self.name!r}")
        if not self.version:
            raise ValueError(f"step {self.name!r} needs an explicit version")
        if len(set(self.inputs)) != len(self.inputs) or not self.inputs:
            raise ValueError(f"step {self.name!r}: inputs must be distinct and non-empty, got {self.inputs}")
        if self.over not in ("asset", ENV_MAP_KIND):
            raise ValueError(f"step {self.name!r}: over must be 'asset' or {ENV_MAP_KIND!r}, got {self.over!r}")
        for name in ("draws", "only"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise TypeError(f"step {self.name!r}: {name} must be a function of the source_id or None, "
                                f"got {getattr(self, name)!r}")
        canonical_json(self.key_fields())  # params, models and env must be plain JSON

    def key_fields(self) -> dict[str, Any]:
        return {"step": self.name, "version": self.version, "inputs": sorted(self.inputs), "params": dict(self.params),
                "models": dict(self.models), "env": dict(self.env)}

    @property
    def spec_hash(self) -> str:
        return digest(self.key_fields())


def artifact_key(spec_hash: str, inputs: Mapping[str, str]) -> str:
    """The key of one step's output for one asset: its spec plus the ids of what went in."""
    return digest({"kind": "artifact/v1", "spec": spec_hash, "inputs": dict(inputs)})


class StepGraph:
    """Steps in dependency order; every input names `source` or an earlier step."""

    def __init__(self, specs: Iterable[StepSpec]) -> None:
        by_name: dict[str, StepSpec] = {}
        for spec in specs:
            if spec.name in by_name:
                raise ValueError(f"step {spec.name!r} defined twice")
            by_name[spec.name] = spec
        self.specs = _topological(by_name)
        self.spec_hashes = {s.name: s.spec_hash for s in self.specs}

    def __getitem__(self, name: str) -> StepSpec:
        for spec in self.specs:
            if spec.name == name:
                return spec
        raise KeyError(f"no step {name!r}; steps: {[s.name for s in self.specs]}")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def downstream(self, name: str) -> set[str]:
        """`name` and every step that depends on it, directly or not."""
        found = {name}
        for spec in self.specs:
            if found.intersection(spec.inputs):
                found.add(spec.name)
        return found

    def asset_keys(self, source_id: str) -> dict[str, tuple[str, dict[str, str]]]:
        """step -> (artifact_key, {input role: input id}) for one asset (the steps that run for it)."""
        return self.keys_of(source_id, self.specs)

    def keys_of(self, source_id: str, specs: Iterable[StepSpec]) -> dict[str, tuple[str, dict[str, str]]]:
        """step -> (artifact_key, {input role: input id}) of `specs` (closed under inputs) for one source.

        A spec whose `only` rejects the source is left out, and so is every spec that reads a left-out one."""
        keys: dict[str, tuple[str, dict[str, str]]] = {}
        skipped: set[str] = set()
        for spec in specs:
            if skipped.intersection(spec.inputs) or (spec.only is not None and not spec.only(source_id)):
                skipped.add(spec.name)
                continue
            inputs = {role: source_id if role == SOURCE else keys[role][0] for role in spec.inputs}
            if spec.draws is not None:
                inputs.update(spec.draws(source_id))
            keys[spec.name] = (artifact_key(self.spec_hashes[spec.name], inputs), inputs)
        return keys

    def over(self, kind: str) -> list[StepSpec]:
        """The steps that run over sources of `kind` (`asset` for every source that is not an env map)."""
        return [spec for spec in self.specs if spec.over == (ENV_MAP_KIND if kind == ENV_MAP_KIND else "asset")]


def _topological(by_name: dict[str, StepSpec]) -> list[StepSpec]:
    ordered: list[StepSpec] = []
    state: dict[str, str] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ValueError(f"steps form a cycle: {' -> '.join(path + (name,))}")
        state[name] = "visiting"
        for role in by_name[name].inputs:
            if role == SOURCE:
                continue
            if role not in by_name:
                raise ValueError(f"step {name!r} reads {role!r}, which is neither 'source' nor a step")
            visit(role, path + (name,))
        state[name] = "done"
        ordered.append(by_name[name])

    for name in sorted(by_name):
        visit(name, ())
    return ordered


def implementation_fingerprint(spec: StepSpec) -> str:
    """Hash of the step's modules' source plus the installed package version ('' when nothing is tracked)."""
    if not spec.implementation:
        return ""
    sources = {}
    for module in spec.implementation:
        found = importlib.util.find_spec(module)
        if found is None or found.origin is None:
            raise ModuleNotFoundError(f"step {spec.name!r} tracks module {module!r}, which cannot be found")
        with open(found.origin, "rb") as f:
            sources[module] = hashlib.sha256(f.read()).hexdigest()
    return digest({"modules": sources, "package": package_version()})


def package_version() -> str:
    try:
        return importlib.metadata.version("near-factory")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
