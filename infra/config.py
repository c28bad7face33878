"""Frozen config dataclasses that serialise to plain JSON and hash canonically (STYLE rule 2)."""

import dataclasses
import hashlib
import json
from typing import Any, Self


@dataclasses.dataclass(frozen=True)
class FrozenConfig:
    """Base of every config: immutable, JSON round-trip, canonical hash."""

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples become lists, as in JSON

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise TypeError(f"{cls.__name__} has no fields {unknown}; fields are {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)

    def digest(self) -> str:
        """sha256 of the canonical JSON: equal configs hash equal in every process."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()
