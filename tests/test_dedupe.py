"""One call per identity: the pure duplicate filter and its compact set."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_provider_looker_segment.dedupe import (
    DuplicateCounts,
    IdentitySet,
    SpilledIdentities,
    drop_duplicates,
)


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
