"""One call per identity: the pure duplicate filter and its compact set."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_provider_looker_segment import dedupe
from airflow_provider_looker_segment.dedupe import (
    DuplicateCounts,
    IdentitySet,
    SpilledIdentities,
    drop_duplicates,
)


def _through_a_small_table(messages: list[dict]) -> tuple[list[dict], DuplicateCounts, IdentitySet]:
    """Drop the duplicates with a table of 4 slots at first (grown as it fills); return it too."""
    tables: list[IdentitySet] = []
    counts = DuplicateCounts()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dedupe, "IdentitySet", lambda: tables.append(IdentitySet(slots=4)) or tables[-1])
        kept = list(drop_duplicates(messages, counts))
    return kept, counts, tables[0]


@given(
    st.lists(st.integers(min_value=-(2**60), max_value=2**60).filter(lambda value: value != -1), max_size=300)
)
def test_identity_table_agrees_with_a_python_set(values):
    """Integers hash to themselves (but -1): free slots (0), negative values and growth all meet a set."""
    kept, counts, _table = _through_a_small_table([{"anonymousId": value} for value in values])
    assert [message["anonymousId"] for message in kept] == list(dict.fromkeys(values))
    assert counts.duplicates == len(values) - len(set(values))


def test_identity_table_stays_at_most_half_full_and_compact():
    kept, _counts, table = _through_a_small_table([{"userId": f"user-{number}"} for number in range(100_000)])
    assert len(kept) == 100_000
    assert len(table._table) == 262_144 and table._table.itemsize == 8  # 16 bytes per member: 2 MB in all


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
    warning = counts.warning("Look 42")
    assert warning.startswith("Look 42: 2 rows repeat an identity of an earlier row (e.g. userId u1)")


def test_no_duplicates_no_warning():
    counts = DuplicateCounts()
    assert len(list(drop_duplicates(({"userId": str(n)} for n in range(1000)), counts))) == 1000
    assert counts.duplicates == 0 and counts.warning("Look 1") is None


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 400), max_size=1500),
    st.sampled_from([1, 4, 16, 64]),
)
def test_spilling_to_disk_finds_the_same_duplicates(numbers, memory):
    """With a table of a few identities (so most of them go to disk) the same rows are kept and dropped."""
    rows = [{"userId": f"u{n}"} if n % 3 else {"anonymousId": f"u{n}"} for n in numbers]
    in_memory, spilling = DuplicateCounts(), DuplicateCounts()
    expected = list(drop_duplicates(rows, in_memory))
    assert list(drop_duplicates(rows, spilling, max_memory_identities=memory)) == expected
    assert (spilling.duplicates, spilling.example) == (in_memory.duplicates, in_memory.example)


def test_spilled_identities_are_looked_up_exactly(tmp_path):
    """Every identity of several runs is found, and hashes next to them are not (the Bloom filter may say
    maybe; the blocks on disk decide)."""
    import random
    from array import array

    values = sorted({random.Random(7).getrandbits(64) - (1 << 63) for _ in range(5000)})
    spilled = SpilledIdentities(str(tmp_path))
    try:
        spilled.add_sorted_run([array("q", values[:2000]), array("q", values[2000:3000])])
        spilled.add_sorted_run([array("q", values[3000:])])
        assert spilled.count == len(values) and list(tmp_path.iterdir())
        assert all(value in spilled for value in values)
        present = set(values)
        neighbours = [v + 1 for v in values if v + 1 not in present and v + 1 < 2**63]
        assert not any(value in spilled for value in neighbours)
    finally:
        spilled.close()
    assert not list(tmp_path.iterdir())


def test_many_identities_through_a_small_table():
    """150,000 identities through a table that holds 2**16, spilled twice: every duplicate found."""
    counts = DuplicateCounts()
    kept = sum(
        1
        for _message in drop_duplicates(
            ({"userId": f"u{n % 150_000}"} for n in range(200_000)), counts, max_memory_identities=1 << 16
        )
    )
    assert (kept, counts.duplicates) == (150_000, 50_000)
