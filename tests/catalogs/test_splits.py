"""Split rules: train / val / test fixed by the source_id, test membership by test_percent alone."""

import collections
import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catalogs.splits import BUCKETS, RULE, TEST, TRAIN, VAL, SplitRule

source_ids = st.binary(min_size=1, max_size=64).map(lambda b: hashlib.sha256(b).hexdigest())
percents = st.integers(0, 100 * 100).map(lambda n: n / 100)
"""Every percent the rule can express: multiples of 0.01 from 0 to 100."""


def _random_ids(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [hashlib.sha256(rng.randbytes(16)).hexdigest() for _ in range(n)]


@settings(max_examples=300, deadline=None)
@given(source_ids, percents, percents)
def test_the_split_is_the_documented_hash_of_the_source_id(source_id, test_percent, val_percent):
    """release.json records the rule in words; it must stay what the code computes."""
    if test_percent + val_percent > 100:
        val_percent = 100 - test_percent
    rule = SplitRule(test_percent=test_percent, val_percent=val_percent)
    bucket = int.from_bytes(hashlib.sha256(f"near-split/1:{source_id}".encode()).digest(), "big") % 10000
    expected = (TEST if bucket >= 10000 - round(test_percent * 100)
                else VAL if bucket < round(val_percent * 100) else TRAIN)
    assert rule.split_of(source_id) == expected == SplitRule(test_percent, val_percent).split_of(source_id)
    assert rule.is_test(source_id) == (expected == TEST)


def test_the_split_of_an_asset_is_pinned():
    """Splits persist in releases: the same bytes must land in the same split in every future release."""
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in (0, 26, 70)]
    assert [SplitRule().split_of(s) for s in ids] == ["train", "val", "test"]
    assert [SplitRule(test_percent=50, val_percent=50).split_of(s) for s in ("ab" * 32, "0" * 64, "f" * 64)] == [
        "val", "test", "val"]


@settings(max_examples=200, deadline=None)
@given(source_ids, percents, percents, percents)
def test_changing_val_percent_never_moves_an_asset_into_or_out_of_test(source_id, test_percent, val_a, val_b):
    val_a, val_b = (min(v, 100 - test_percent) for v in (val_a, val_b))
    a, b = SplitRule(test_percent, val_a), SplitRule(test_percent, val_b)
    assert a.is_test(source_id) == b.is_test(source_id)
    if val_a <= val_b and a.split_of(source_id) == VAL:
        assert b.split_of(source_id) == VAL, "more val takes val assets from train, never the reverse"


@settings(max_examples=200, deadline=None)
@given(source_ids, percents, percents)
def test_raising_test_percent_only_adds_to_test(source_id, low, high):
    low, high = sorted((low, high))
    if SplitRule(low, 0).is_test(source_id):
        assert SplitRule(high, 0).is_test(source_id)


@pytest.mark.parametrize("test_percent, val_percent", [(1.0, 5.0), (0.92, 5.0), (0.0, 10.0), (10.0, 0.0), (30.0, 70.0)])
def test_proportions_follow_the_percents(test_percent, val_percent):
    ids = _random_ids(20_000)
    counts = collections.Counter(SplitRule(test_percent, val_percent).split_of(s) for s in ids)
    for split, percent in ((TEST, test_percent), (VAL, val_percent), (TRAIN, 100 - test_percent - val_percent)):
        share = counts[split] / len(ids)
        p = percent / 100
        assert abs(share - p) <= 5 * (p * (1 - p) / len(ids)) ** 0.5 + 1e-9, (split, share, p)


def test_the_rule_is_recorded_precisely_and_read_back():
    rule = SplitRule(test_percent=0.92, val_percent=5)
    assert rule.to_dict() == {"rule": RULE, "test_percent": 0.92, "val_percent": 5.0}
    assert "near-split/1:" in RULE and str(BUCKETS) in RULE
    assert SplitRule.from_dict(rule.to_dict()) == rule
    assert SplitRule(1, 5) == SplitRule(1.0, 5.0) and SplitRule(1, 5).to_dict() == SplitRule().to_dict()
    with pytest.raises(ValueError, match="unknown split rule"):
        SplitRule.from_dict({**rule.to_dict(), "rule": "near-split/0: something else"})


@pytest.mark.parametrize("fields, error, message", [
    ({"test_percent": -1}, ValueError, "test_percent must be between 0 and 100, got -1"),
    ({"val_percent": 101}, ValueError, "val_percent must be between 0 and 100"),
    ({"test_percent": 60, "val_percent": 41}, ValueError, "is above 100"),
    ({"test_percent": float("nan")}, ValueError, "between 0 and 100"),
    ({"test_percent": 0.915}, ValueError, "multiple of 0.01"),
    ({"val_percent": True}, TypeError, "must be a number"),
    ({"val_percent": "5"}, TypeError, "must be a number"),
])
def test_bad_percents_are_refused_clearly(fields, error, message):
    with pytest.raises(error, match=message):
        SplitRule(**fields)


def test_an_asset_id_is_not_a_source_id():
    with pytest.raises(ValueError, match="sha256 of the asset's bytes"):
        SplitRule().split_of("objaverse:0123")
    with pytest.raises(ValueError, match="64 hex digits"):
        SplitRule().split_of("AB" * 32)
