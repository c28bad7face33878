"""Frozen config dataclasses, and the one loader every config file goes through (STYLE rule 2).

A config is a tree of frozen dataclasses; its annotations are its schema. `load_config` builds one from a
mapping (a YAML file's, a section's, `to_dict()`'s) and checks every value against its field's annotation,
so a bad value fails at start-up with its key path, e.g. `recipes.lh.samples: expected an integer, got '16'`:

    steps: PositiveInt = 1000                          # Annotated[int, Range(ge=1)]: checked on construction
    out_dir: LocalPath = "runs"                        # relative to the YAML file's folder
    base_model: ModelReference = "microsoft/TRELLIS"   # a local file beside the YAML, else a hub id
    sampler: FlowSamplerConfig = ...                   # a mapping in YAML; its keys override the default's

A hand-written walker rather than pydantic: the render env (bpy) loads recipes through it and has no
pydantic, and the walker is the one place that knows YAML's quirks (`1e-4` is a string) and our path rules.
"""

import dataclasses
import enum
import functools
import hashlib
import json
import math
import operator
import os
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar, Union, get_args, get_origin, get_type_hints

from infra.errors import ConfigError

T = TypeVar("T")

MAX_CONFIG_BYTES = 1 << 20
"""Config files are a few kilobytes: a larger one is something else."""


class ConfigFieldError(ConfigError):
    """A bad value at `key`, a dotted path such as `recipes.lh.samples`. Raised by a config for its own field
    name; the loader prefixes the path of that config in the file."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(key, detail)  # every field in .args: survives pickling through Ray
        self.key, self.detail = key, detail

    def __str__(self) -> str:
        return f"{self.key}: {self.detail}"


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a number field, declared on it (`Annotated[int, Range(ge=1)]`), checked on construction."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def check(self, key: str, value: float) -> None:
        bounds = ((">=", self.ge, operator.ge), (">", self.gt, operator.gt), ("<=", self.le, operator.le),
                  ("<", self.lt, operator.lt))  # fmt: skip
        declared = [(symbol, bound, holds) for symbol, bound, holds in bounds if bound is not None]
        if not all(holds(value, bound) for _, bound, holds in declared):  # NaN holds none
            wanted = " and ".join(f"{symbol} {bound}" for symbol, bound, _ in declared)
            raise ConfigFieldError(key, f"must be {wanted}, got {value!r}")


class Resolve(enum.Enum):
    """How a string field names a file when the config comes from a file."""

    PATH = "path"
    """Always a local path: a relative one is relative to the config file's folder."""
    MODEL = "model"
    """A local path (made absolute) when it names something beside the file (or `<it>.safetensors`) or starts
    with `.`, `/` or `~`; anything else is a hub id, kept as written."""
    LOCATION = "location"
    """A local path (as PATH) or a URL with a scheme (`s3://bucket/prefix`), kept as written."""


PositiveInt = Annotated[int, Range(ge=1)]
"""A count, size or period: zero or less is a mistake."""
NonNegativeInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegativeFloat = Annotated[float, Range(ge=0)]
Percent = Annotated[int, Range(ge=0, le=100)]
LocalPath = Annotated[str, Resolve.PATH]
Location = Annotated[str, Resolve.LOCATION]
"""Where data lives: a local folder or an object-store URL (`catalogs.storage`)."""
ModelReference = Annotated[str, Resolve.MODEL]


@dataclasses.dataclass(frozen=True)
class FrozenConfig:
    """Base of every config: immutable, checked ranges, JSON round-trip, canonical hash."""

    def __post_init__(self) -> None:
        """Check the declared ranges: on loading, and on every construction and `replace` in code too.
        A subclass with its own `__post_init__` calls this first."""
        for name, hint in _field_hints(type(self)).items():
            value = getattr(self, name)
            if value is not None:
                for bounds in _ranges(hint):
                    bounds.check(name, value)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples become lists, as in JSON

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base: Path | None = None) -> Self:
        """See `load_config`."""
        return load_config(cls, data, base=base)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)

    def digest(self) -> str:
        """sha256 of the canonical JSON: equal configs hash equal in every process."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def check_field(key: str, check: Callable[[Any], object], value: Any) -> None:
    """`check(value)`, its ValueError re-raised as a ConfigFieldError naming `key` (for `__post_init__`)."""
    try:
        check(value)
    except ValueError as err:
        raise ConfigFieldError(key, str(err)) from err


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping a YAML config file holds (an empty file holds none).

    Raises:
        ConfigError: the file is unreadable, larger than `MAX_CONFIG_BYTES`, not YAML, or not a mapping.
    """
    import yaml  # here: the render env imports this module for its recipes and has no PyYAML

    path = Path(path)
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)  # a bounded read: a FIFO or /dev/zero cannot hang it
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB, which no config file is")
        data = yaml.safe_load(raw.decode())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {_show(data)}")
    return data


def load_config_file(cls: type[T], path: str | os.PathLike[str]) -> T:
    """`cls` from a YAML file, whose relative paths are relative to its folder; errors name the file."""
    path = Path(path)
    data = read_config_file(path)
    try:
        return load_config(cls, data, base=path.parent)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def load_config(cls: type[T], data: Mapping[str, Any], *, base: Path | None = None) -> T:
    """`cls` (a dataclass) from a mapping, every value checked against its field's annotation.

    int, float (YAML's `1e-4` strings read as numbers, ints widened), bool, str, Path, Literal, tuples (from
    lists), Optional, nested configs (from mappings, over the field's default: a partial mapping changes only
    its keys; null keeps the default) and dicts of configs. Unknown and missing keys are refused.

    Args:
        base: folder that relative `LocalPath`s and `ModelReference`s are resolved against (the YAML file's);
            None keeps them as written.

    Raises:
        ConfigFieldError: naming the key path and the bad value (a ConfigError when `data` is no mapping).

    Examples:
        >>> from render_jobs.recipes import RecipeConfig
        >>> load_config(RecipeConfig, {"name": "lh", "num_views": "many"})
        Traceback (most recent call last):
        infra.config.ConfigFieldError: num_views: expected an integer, got 'many'
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"a {cls.__name__} is a mapping of keys, got {_show(data)}")
    return _config(cls, data, "", base, None)


def _value(value: Any, hint: Any, key: str, base: Path | None, default: Any) -> Any:
    """`value` checked against (and converted to) `hint`; `default` is what the field holds without it."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        resolve = next((mark for mark in hint.__metadata__ if isinstance(mark, Resolve)), None)
        if resolve is not None and isinstance(value, os.PathLike):
            value = os.fspath(value)
        value = _value(value, args[0], key, base, default)
        return value if resolve is None or base is None else _resolve(value, resolve, base)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [arm for arm in args if arm is not type(None)]
        for arm in arms[:-1]:
            try:
                return _value(value, arm, key, base, default)
            except ConfigFieldError:
                continue
        return _value(value, arms[-1], key, base, default)
    if origin is Literal:
        if not any(value == choice and type(value) is type(choice) for choice in args):
            raise ConfigFieldError(key, f"must be one of {list(args)}, got {_show(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigFieldError(key, f"expected a list, got {_show(value)}")
        items = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(items) != len(value):
            raise ConfigFieldError(key, f"expected a list of {len(items)} items, got {_show(value)}")
        pairs = enumerate(zip(value, items))
        return tuple(_value(item, item_hint, f"{key}[{i}]", base, None) for i, (item, item_hint) in pairs)
    if origin is dict:
        return _dict(value, args, key, base, default)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return _config(hint, {} if value is None else value, key, base, default)
    return _scalar(value, hint, key)


def _scalar(value: Any, hint: type, key: str) -> Any:
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value)  # 2 and 2.0 are one config: one digest
            raise ConfigFieldError(key, f"expected a finite number, got {_show(value)}")
        raise ConfigFieldError(key, f"expected a number, got {_show(value)}")
    if hint is int and isinstance(value, bool):
        raise ConfigFieldError(key, f"expected an integer, got {_show(value)}")
    if isinstance(hint, type) and issubclass(hint, os.PathLike) and isinstance(value, (str, os.PathLike)):
        return hint(value)
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    wanted = {int: "an integer", bool: "true or false", str: "a string"}.get(hint, hint.__name__)
    raise ConfigFieldError(key, f"expected {wanted}, got {_show(value)}")


def _config(cls: type, data: Any, key: str, base: Path | None, default: Any) -> Any:
    """`cls` from `data` over `default` (an instance of `cls`; None: the class's own defaults)."""
    if not isinstance(data, Mapping):
        raise ConfigFieldError(key, f"expected a mapping of keys, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            known = f"{cls.__name__} keys: {list(fields)}"
            raise ConfigFieldError(_join(key, name), f"unknown key {name!r}; {known}")
    hints, kwargs = _field_hints(cls), {}
    for name, field in fields.items():
        held = getattr(default, name) if default is not None else _field_default(field)
        if name in data:
            kwargs[name] = _value(data[name], hints[name], _join(key, name), base, held)
        elif held is dataclasses.MISSING:
            raise ConfigFieldError(_join(key, name), "missing, and it has no default")
        else:
            kwargs[name] = held
    try:
        return cls(**kwargs)
    except ConfigFieldError as err:
        raise ConfigFieldError(_join(key, err.key), err.detail) from err
    except ValueError as err:  # a config that checks its fields without naming them: place it by its path
        raise ConfigFieldError(key or cls.__name__, str(err)) from err


def _field_default(field: dataclasses.Field) -> Any:
    """What the field holds when not given; MISSING when it has no default."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _dict(value: Any, args: tuple, key: str, base: Path | None, default: Any) -> dict:
    """A dict whose entries override the default's, entry by entry."""
    if value is None:
        return dict(default or {})
    if not isinstance(value, Mapping):
        raise ConfigFieldError(key, f"expected a mapping of keys, got {_show(value)}")
    key_hint, value_hint = args
    out = dict(default or {})
    for name, item in value.items():
        try:
            name = _value(name, key_hint, key, base, None)
        except ConfigFieldError as err:
            raise ConfigFieldError(_join(key, str(name)), f"unknown key; {err.detail}") from err
        out[name] = _value(item, value_hint, _join(key, name), base, out.get(name))
    return out


def _resolve(value: str | os.PathLike[str], resolve: Resolve, base: Path) -> Any:
    if resolve == Resolve.LOCATION and "://" in str(value):
        return value
    path = Path(value).expanduser()
    absolute = (path if path.is_absolute() else base / path).resolve()
    if resolve == Resolve.MODEL:
        is_local = absolute.exists() or absolute.with_suffix(".safetensors").exists()
        if not (is_local or str(value).startswith((".", "/", "~"))):
            return value  # a hub id
    return type(value)(absolute)


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _ranges(hint: Any) -> list[Range]:
    """The ranges declared on `hint` or on an arm of it (`PositiveInt | None`)."""
    if get_origin(hint) is Annotated:
        return [mark for mark in hint.__metadata__ if isinstance(mark, Range)]
    if get_origin(hint) in (Union, types.UnionType):
        return [bounds for arm in get_args(hint) for bounds in _ranges(arm)]
    return []


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else f"{text[:200]}..."
