"""One call per identity: the pure duplicate filter and its compact set."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from airflow_provider_looker_segment.dedupe import DuplicateCounts, IdentitySet, drop_duplicates


@given(st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=300))
def test_identity_set_agrees_with_a_python_set(values):
    compact, reference = IdentitySet(slots=4), set()
    for value in values:
        key = value or -1  # 0 is the free-slot marker, stored as -1 (never a hash() value)
        assert compact.add(value) is (key not in reference)
        reference.add(key)
    assert len(compact) == len(reference)
    assert all(not compact.add(value) for value in values)


def test_identity_set_stays_at_most_half_full_and_compact():
    values = IdentitySet(slots=4)
    for number in range(100_000):
        values.add(hash(f"user-{number}"))
    assert len(values) == 100_000
    table = values._table
    assert len(table) == 262_144 and table.itemsize == 8  # 16 bytes per member at 100 k: 2 MB in all


def test_first_row_of_each_identity_wins():
    rows = [
        {"userId": "u1", "traits": {"plan": "pro"}},
        {"anonymousId": "u1", "traits": {"plan": "anon"}},  # another identity kind: not a duplicate
        {"userId": "u2", "traits": {}},
        {"userId": "u1", "anonymousId": "a9", "traits": {"plan": "free"}},
        {"anonymousId": "u1", "traits": {"plan": "anon again"}},
    ]
    counts = DuplicateCounts()
    kept = list(drop_duplicates(rows, counts))
    assert kept == rows[:3]
    assert (counts.duplicates, counts.example) == (2, "userId u1")
    warning = counts.warning("42")
    assert warning.startswith("Look 42: 2 rows repeat an identity of an earlier row (e.g. userId u1)")


def test_no_duplicates_no_warning():
    counts = DuplicateCounts()
    assert len(list(drop_duplicates(({"userId": str(n)} for n in range(1000)), counts))) == 1000
    assert counts.duplicates == 0 and counts.warning("1") is None
