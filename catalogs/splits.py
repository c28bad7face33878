"""Splits: which of `train`, `val` and `test` a sample is in, fixed by its content before anything is trained.

A sample's split is a function of its `source_id` (the sha256 of the asset's bytes) alone, never of its name or
of which other samples a release holds: the same asset is in the same split in every release, so a test asset
never leaks into the training data of a later release. Keying by content rather than by `asset_id` also puts
duplicates (the same bytes registered under two names) in the same split, so a copy of a test asset cannot
train the model it is tested on.

    bucket(source_id) = int.from_bytes(sha256(f"near-split/1:{source_id}"), "big") % 10000
    test  = the top test_percent of the buckets:     bucket >= 10000 - 100 * test_percent
    val   = the bottom val_percent of the buckets:   bucket <  100 * val_percent
    train = the rest

Test membership depends on `test_percent` alone: changing `val_percent` never moves an asset into or out of
test. Changing `test_percent` does move assets across the test boundary (raising it turns train or val
assets, which earlier models saw, into test assets), so keep it fixed across releases; every release records
its rule (`SplitRule.to_dict`) in release.json, and `verify` re-derives each sample's split from it.
"""

import dataclasses
import hashlib
import math
import string
from collections.abc import Mapping
from typing import Any

TRAIN, VAL, TEST = "train", "val", "test"
"""The splits a sample can be in (a release's shared rows, such as its env maps, are in none of them)."""
RULE_VERSION = "near-split/1"
"""Salt and version of the hash; a different hash would be a new version, never a silent change."""
BUCKETS = 10_000
"""Buckets per 100 %: percents have a resolution of 0.01 (the paper holds out 800 of 87K assets, 0.92 %)."""
RULE = (f"{RULE_VERSION}: bucket = int.from_bytes(sha256(('{RULE_VERSION}:' + source_id).encode()).digest(), "
        f"'big') % {BUCKETS}; test if bucket >= {BUCKETS} - round(test_percent * {BUCKETS // 100}), "
        f"else val if bucket < round(val_percent * {BUCKETS // 100}), else train")
"""The rule as release.json records it: enough to re-derive every split without this code."""
_HEX = frozenset(string.hexdigits.lower())


@dataclasses.dataclass(frozen=True)
class SplitRule:
    """Percent of samples in `test` and in `val`, assigned by a salted hash of their source_id.

    Examples:
        >>> rule = SplitRule(test_percent=1.0, val_percent=5.0)
        >>> rule.split_of("ab" * 32)
        'train'
        >>> SplitRule(test_percent=100.0, val_percent=0.0).is_test("ab" * 32)
        True
        >>> SplitRule(test_percent=60, val_percent=50)
        Traceback (most recent call last):
        ...
        ValueError: test_percent 60.0 + val_percent 50.0 is above 100
    """

    test_percent: float = 1.0
    """Share of samples held out for the final evaluation, the same assets in every release: keep it fixed."""
    val_percent: float = 5.0
    """Share of samples for validation during training; changing it never moves an asset into or out of test."""

    def __post_init__(self) -> None:
        for name in ("test_percent", "val_percent"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number of percent, got {value!r}")
            if math.isnan(value) or not 0 <= value <= 100:
                raise ValueError(f"{name} must be between 0 and 100, got {value}")
            buckets = value * (BUCKETS // 100)
            if abs(buckets - round(buckets)) > 1e-6:
                raise ValueError(f"{name} must be a multiple of {100 / BUCKETS} (the rule's resolution), got {value}")
            object.__setattr__(self, name, float(value))  # 1 and 1.0 are one rule, recorded alike
        if _buckets(self.test_percent) + _buckets(self.val_percent) > BUCKETS:  # exact, unlike 33.33 + 66.67
            raise ValueError(f"test_percent {self.test_percent} + val_percent {self.val_percent} is above 100")

    def split_of(self, source_id: str) -> str:
        """`test`, `val` or `train` for the asset whose bytes hash to `source_id`.

        Raises:
            ValueError: `source_id` is not a sha256 in hex (an asset id passed by mistake, for example).
        """
        bucket = _bucket(source_id)
        if bucket >= BUCKETS - _buckets(self.test_percent):
            return TEST
        if bucket < _buckets(self.val_percent):
            return VAL
        return TRAIN

    def is_test(self, source_id: str) -> bool:
        """Whether the asset is held out for testing (`StepSpec.only` of the steps made for test assets only)."""
        return self.split_of(source_id) == TEST

    def to_dict(self) -> dict[str, Any]:
        """The rule as release.json records it: the hash, in words, and both percents."""
        return {"rule": RULE, "test_percent": self.test_percent, "val_percent": self.val_percent}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "SplitRule":
        """The rule a release recorded. Raises ValueError for a rule this code does not implement."""
        if record.get("rule") != RULE:
            raise ValueError(f"unknown split rule {record.get('rule')!r}; this code implements {RULE!r}")
        return cls(test_percent=record["test_percent"], val_percent=record["val_percent"])


def _buckets(percent: float) -> int:
    return round(percent * (BUCKETS // 100))


def _bucket(source_id: str) -> int:
    if len(source_id) != 64 or not _HEX.issuperset(source_id):
        raise ValueError(f"a split is drawn from a source_id (the sha256 of the asset's bytes, 64 hex digits), "
                         f"got {source_id!r}")
    salted = hashlib.sha256(f"{RULE_VERSION}:{source_id}".encode()).digest()
    return int.from_bytes(salted, "big") % BUCKETS
