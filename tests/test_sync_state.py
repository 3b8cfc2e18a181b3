"""Tests of the per-sync state store (sync_mode="changed"), on a local path and on memory://."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest
from airflow.sdk import ObjectStoragePath
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sync_state_helpers import (
    REFERENCE_TRAITS,
    attach_memory_fs,
    attach_no_exclusive_fs,
    cohort_message,
    read_header,
    run_sync,
    stored_versions,
    traits_digest,
)

from airflow_provider_looker_segment import cohort_spool, sync_commit, sync_lock, sync_state
from airflow_provider_looker_segment.cohort_sync import CohortCounts, CohortEvents, CohortMessages, plan_exits
from airflow_provider_looker_segment.exceptions import (
    LookerSegmentError,
    SyncStateConflictError,
    SyncStateCorruptError,
    SyncStateError,
    SyncStateLockedError,
    SyncStateSaveError,
)
from airflow_provider_looker_segment.sync_commit import commit_run
from airflow_provider_looker_segment.sync_lock import LockOwner
from airflow_provider_looker_segment.sync_run import CohortStateStore, SyncRun
from airflow_provider_looker_segment.sync_state import (
    ANONYMOUS_ID_KEY,
    USER_ID_KEY,
    format_identity_hash,
    identity_hash,
    identity_hash_from_message_id,
    sync_key,
)

PACKAGE_LOGGER = "airflow_provider_looker_segment"
HELPERS = Path(__file__).resolve().parent / "sync_state_helpers.py"
KEY = "look-42-api.segment.io-0123456789abcdef"

NEW, CHANGED, UNCHANGED = "new", "changed", "unchanged"
# A small cohort: identity -> version (its traits are {"v": version}).
COHORT = {(USER_ID_KEY, f"user-{n}"): n % 5 for n in range(20)}
COHORT[(ANONYMOUS_ID_KEY, "anon-1")] = 9


@pytest.fixture(params=["local", "memory"])
def base(request, tmp_path) -> ObjectStoragePath:
    """The folder of the state files: a local path (file://) or a fresh memory:// folder."""
    if request.param == "local":
        return ObjectStoragePath(f"file://{tmp_path}/state")
    attach_memory_fs()
    return ObjectStoragePath(f"memory://state-tests/{uuid.uuid4().hex}")


@pytest.fixture
def store(base) -> CohortStateStore:
    return CohortStateStore(base, KEY)


@pytest.fixture
def small_flushes(monkeypatch) -> None:
    """Spool and read 3 rows at a time, so that several appends and reads happen."""
    monkeypatch.setattr(sync_commit, "_FLUSH_ROWS", 3)
    monkeypatch.setattr(cohort_spool, "CHUNK_RECORDS", 3)


def sync(
    store: CohortStateStore,
    cohort: dict[tuple[str, str], int],
    *,
    failed: set[tuple[str, str]] = frozenset(),
    run_id: str = "run",
    **options: object,
) -> tuple[dict[tuple[str, str], str], list[tuple[str, str]]]:
    """One committed run; return each identity's class and the departed identities."""
    result = run_sync(store, cohort, fail=failed, run_id=run_id, **options)
    classes = {key: result.classes.get(key, UNCHANGED) for key in cohort}
    return classes, [(e.kind, e.identity) for e in result.exits]


def finish(run: SyncRun, cohort: dict[tuple[str, str], int]) -> None:
    """Spool, decide, hand every message to a Segment that accepts them all, commit."""
    run.spool([cohort_message(kind, identity, version) for (kind, identity), version in cohort.items()])
    decision = run.decide()
    events = CohortEvents(membership_trait="m", sync_key=run.store.key)
    counts = CohortCounts()
    plan_exits(decision, counts, events, max_exit_ratio=1.0, possibly_truncated=False)
    messages = CohortMessages(run, events, counts)
    for _message in messages:
        pass
    commit_run(
        run,
        messages.handed,
        keep_departed=False,
        membership_trait=True,
        entered_event=False,
        exited_event=False,
    )


stored = stored_versions


def count(classes: dict[tuple[str, str], str], value: str) -> int:
    return sum(1 for result in classes.values() if result == value)


# --------------------------------------------------------------------------------------------- helpers


class TestHashes:
    def test_identity_hash_is_blake2b_of_kind_and_identity(self):
        expected = int.from_bytes(hashlib.blake2b(b"userId:42", digest_size=8).digest(), "big")
        assert identity_hash(USER_ID_KEY, "42") == expected

    def test_identity_hash_depends_on_kind(self):
        assert identity_hash(USER_ID_KEY, "42") != identity_hash(ANONYMOUS_ID_KEY, "42")

    @pytest.mark.parametrize("kind", ["email", "", None])
    def test_unknown_kind(self, kind):
        with pytest.raises(ValueError, match="identity kind"):
            identity_hash(kind, "42")

    @pytest.mark.parametrize("identity", ["", None, 42])
    def test_bad_identity(self, identity):
        with pytest.raises(ValueError, match="non-empty string"):
            identity_hash(USER_ID_KEY, identity)

    def test_message_id_round_trip(self):
        ihash = identity_hash(USER_ID_KEY, "00MWWFOLRcETcTCf")
        prefix = format_identity_hash(ihash)
        assert len(prefix) == 16
        assert identity_hash_from_message_id(f"{prefix}-dag-task-run") == ihash
        assert identity_hash_from_message_id(format_identity_hash(5)) == 5

    @pytest.mark.parametrize("message_id", ["", "not-a-hash-at-all", "0123456789abcde", None])
    def test_message_id_without_hash(self, message_id):
        assert identity_hash_from_message_id(message_id) is None

    def test_traits_digest_ignores_key_order(self):
        assert traits_digest({"a": 1, "b": {"x": 1, "y": 2}}) == traits_digest(
            {"b": {"y": 2, "x": 1}, "a": 1}
        )

    def test_traits_digest_sees_values_and_types(self):
        digests = {traits_digest(t) for t in ({"a": 1}, {"a": 1.0}, {"a": "1"}, {"a": True}, {"a": None})}
        assert len(digests) == 5

    def test_traits_digest_is_blake2b_of_sorted_json(self):
        data = orjson.dumps(REFERENCE_TRAITS, option=orjson.OPT_SORT_KEYS)
        expected = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")
        assert traits_digest(REFERENCE_TRAITS) == expected


class TestSyncKey:
    def test_filename_safe_short_and_readable(self):
        key = sync_key("42", "https://api.segment.io/", "s3cr3t-write-key")
        assert key.startswith("look-42-api.segment.io-")
        assert len(key) <= 110
        assert all(c.isalnum() or c in "._-" for c in key)

    def test_never_contains_the_write_key(self):
        assert "s3cr3t" not in sync_key("42", "api.segment.io", "s3cr3t-write-key")

    def test_stable_and_host_normalised(self):
        assert sync_key("42", "https://API.segment.io/", "wk") == sync_key("42", "api.segment.io", "wk")

    @pytest.mark.parametrize(
        "other",
        [
            ("43", "api.segment.io", "wk"),
            ("42", "events.eu1.segmentapis.com", "wk"),
            ("42", "api.segment.io", "wk2"),
        ],
    )
    def test_differs_per_look_and_destination(self, other):
        assert sync_key("42", "api.segment.io", "wk") != sync_key(*other)

    def test_unsafe_look_id(self):
        key = sync_key("../../etc/passwd", "api.segment.io", "wk")
        assert "/" not in key
        assert CohortStateStore("memory://x", key).key == key

    def test_store_rejects_unsafe_key(self):
        with pytest.raises(ValueError, match="filename-safe"):
            CohortStateStore("memory://x", "a/b")


# --------------------------------------------------------------------------------------------- runs


class TestRuns:
    def test_first_run_all_new(self, store):
        classes, exits = sync(store, COHORT)
        assert count(classes, NEW) == len(COHORT)
        assert exits == []
        assert stored(store) == COHORT
        assert read_header(store).generation == 1

    def test_second_run_same_data_all_unchanged_saves_nothing(self, store, small_flushes):
        sync(store, COHORT)
        size = store.state_path.stat().st_size
        result = run_sync(store, COHORT, run_id="run-2")
        assert result.classes == {} and result.sent == []
        assert (result.decision.previous, result.decision.unchanged, result.decision.departed) == (21, 21, 0)
        assert result.commit.saved is False and result.commit.generation == 1
        assert stored(store) == COHORT
        assert read_header(store).generation == 1 and store.state_path.stat().st_size == size

    def test_one_changed_digest(self, store):
        sync(store, COHORT)
        cohort = {**COHORT, (USER_ID_KEY, "user-3"): 7}
        classes, _ = sync(store, cohort)
        assert {k for k, v in classes.items() if v == CHANGED} == {(USER_ID_KEY, "user-3")}
        assert count(classes, UNCHANGED) == len(COHORT) - 1
        assert stored(store) == cohort
        assert read_header(store).generation == 2

    def test_removed_identity_exits(self, store):
        sync(store, COHORT)
        cohort = {
            k: v
            for k, v in COHORT.items()
            if k not in {(ANONYMOUS_ID_KEY, "anon-1"), (USER_ID_KEY, "user-7")}
        }
        result = run_sync(store, cohort, run_id="run-2")
        assert result.decision.departed == 2
        assert result.decision.exit_ratio == pytest.approx(2 / len(COHORT))
        assert sorted((e.kind, e.identity, e.ihash) for e in result.exits) == [
            (ANONYMOUS_ID_KEY, "anon-1", identity_hash(ANONYMOUS_ID_KEY, "anon-1")),
            (USER_ID_KEY, "user-7", identity_hash(USER_ID_KEY, "user-7")),
        ]
        assert sorted(m.get("userId") or m["anonymousId"] for m in result.sent) == ["anon-1", "user-7"]
        assert stored(store) == cohort  # delivered exits leave the state
        _, exits = sync(store, cohort)
        assert exits == []

    def test_failed_new_and_changed_are_sent_again(self, store, small_flushes):
        first = {k: v for k, v in COHORT.items() if k != (USER_ID_KEY, "user-1")}
        sync(store, first)
        cohort = {**COHORT, (USER_ID_KEY, "user-2"): 8}
        failed = {(USER_ID_KEY, "user-1"), (USER_ID_KEY, "user-2")}
        classes, _ = sync(store, cohort, failed=failed)
        assert classes[(USER_ID_KEY, "user-1")] == NEW
        assert classes[(USER_ID_KEY, "user-2")] == CHANGED
        assert (USER_ID_KEY, "user-1") not in stored(store)
        assert (
            stored(store)[(USER_ID_KEY, "user-2")] == COHORT[(USER_ID_KEY, "user-2")]
        )  # previous digest kept
        classes, _ = sync(store, cohort)
        assert classes[(USER_ID_KEY, "user-1")] == NEW
        assert classes[(USER_ID_KEY, "user-2")] == CHANGED
        assert count(classes, UNCHANGED) == len(COHORT) - 2
        assert stored(store) == cohort

    def test_failed_exit_stays_and_exits_again(self, store):
        sync(store, COHORT)
        cohort = {k: v for k, v in COHORT.items() if k != (USER_ID_KEY, "user-5")}
        _, exits = sync(store, cohort, failed={(USER_ID_KEY, "user-5")})
        assert exits == [(USER_ID_KEY, "user-5")]
        assert stored(store)[(USER_ID_KEY, "user-5")] == COHORT[(USER_ID_KEY, "user-5")]
        _, exits = sync(store, cohort)
        assert exits == [(USER_ID_KEY, "user-5")]
        assert stored(store) == cohort

    def test_unknown_failures_advance_nothing(self, store):
        sync(store, COHORT)
        cohort = {k: v for k, v in COHORT.items() if k != (USER_ID_KEY, "user-5")}
        cohort[(USER_ID_KEY, "user-6")] = 4
        cohort[(USER_ID_KEY, "newcomer")] = 2
        result = run_sync(store, cohort, unknown_failure=True, run_id="run-2")
        commit = result.commit
        assert (commit.added, commit.updated, commit.removed, commit.not_advanced, commit.saved) == (
            0,
            0,
            0,
            3,
            False,
        )
        assert stored(store) == COHORT

    def test_departed_identities_of_a_truncated_look_stay(self, store):
        sync(store, COHORT)
        cohort = {k: v for k, v in COHORT.items() if k != (USER_ID_KEY, "user-5")}
        cohort[(USER_ID_KEY, "newcomer")] = 2
        result = run_sync(store, cohort, possibly_truncated=True, run_id="run-2")
        assert result.counts.keep_departed and result.counts.exits_skipped
        assert [m["userId"] for m in result.sent] == ["newcomer"]
        assert stored(store) == {**COHORT, (USER_ID_KEY, "newcomer"): 2}

    def test_commit_result(self, store):
        sync(store, COHORT)
        cohort = {
            k: v for k, v in COHORT.items() if k not in {(USER_ID_KEY, "user-5"), (USER_ID_KEY, "user-8")}
        }
        cohort.update({(USER_ID_KEY, "user-6"): 7, (USER_ID_KEY, "a"): 1, (USER_ID_KEY, "b"): 1})
        result = run_sync(store, cohort, fail={(USER_ID_KEY, "b"), (USER_ID_KEY, "user-8")}, run_id="run-2")
        commit = result.commit
        assert (commit.added, commit.updated, commit.removed, commit.not_advanced) == (1, 1, 1, 2)
        assert commit.generation == 2 and commit.saved
        assert commit.identities == len(COHORT) - 1 + 1
        assert commit.bytes == store.state_path.stat().st_size

    def test_full_refresh_sends_everyone_and_lists_exits(self, store):
        sync(store, COHORT)
        same = (USER_ID_KEY, "user-1")
        cohort = {same: COHORT[same], (USER_ID_KEY, "user-2"): 5, (USER_ID_KEY, "fresh"): 6}
        result = run_sync(store, cohort, full_refresh=True, fail={(USER_ID_KEY, "fresh")}, run_id="run-2")
        assert result.decision.previous == len(COHORT)
        assert result.classes == {
            same: CHANGED,
            (USER_ID_KEY, "user-2"): CHANGED,
            (USER_ID_KEY, "fresh"): NEW,
        }
        assert {(e.kind, e.identity) for e in result.exits} == set(COHORT) - set(cohort)
        assert stored(store) == {same: COHORT[same], (USER_ID_KEY, "user-2"): 5}  # delivered exits left
        assert read_header(store).generation == 2

    @pytest.mark.parametrize("damage", ["garbage", "truncated", "earlier format"])
    def test_full_refresh_recovers_a_corrupted_file(self, store, caplog, damage):
        sync(store, COHORT)
        self.previous = store.state_path.read_bytes()
        _rewrite(store, CORRUPTIONS[damage][0])
        with caplog.at_level(logging.WARNING, logger=PACKAGE_LOGGER):
            classes, exits = sync(store, {(USER_ID_KEY, "user-1"): 1}, full_refresh=True)
        assert classes == {(USER_ID_KEY, "user-1"): NEW} and exits == []
        assert "full refresh without the previous state" in caplog.text
        assert "cannot be computed" in caplog.text and "it was kept as" in caplog.text
        assert stored(store) == {(USER_ID_KEY, "user-1"): 1}
        assert read_header(store).generation == 1
        kept = [p for p in store.base_path.iterdir() if ".state.unreadable-" in p.name]
        assert len(kept) == 1 and kept[0].read_bytes() == CORRUPTIONS[damage][0](self.previous)

    def test_duplicate_identity_keeps_the_first_row(self, store, small_flushes):
        rows = [
            cohort_message(USER_ID_KEY, "dup", 1),
            cohort_message(USER_ID_KEY, "other", 1),
            cohort_message(USER_ID_KEY, "other", 1),
            cohort_message(USER_ID_KEY, "dup", 2),
        ]
        result = run_sync(store, rows)
        assert (result.decision.rows, result.decision.identities, result.decision.duplicates) == (4, 2, 2)
        assert result.decision.duplicate_example == "userId dup"
        assert sorted(m["userId"] for m in result.sent) == ["dup", "other"]
        assert stored(store) == {(USER_ID_KEY, "dup"): 1, (USER_ID_KEY, "other"): 1}
        result = run_sync(
            store, [cohort_message(USER_ID_KEY, "dup", 1), cohort_message(USER_ID_KEY, "dup", 3)]
        )
        assert result.classes == {} and result.decision.departed == 1  # "other"; "dup" counts once
        assert stored(store) == {(USER_ID_KEY, "dup"): 1}

    def test_unicode_identity(self, store):
        cohort = {
            (USER_ID_KEY, "ünïcødé-👤"): 1,
            (ANONYMOUS_ID_KEY, "x" * 5000): 2,
        }
        sync(store, cohort)
        assert stored(store) == cohort
        classes, _ = sync(store, cohort)
        assert set(classes.values()) == {UNCHANGED}

    def test_a_message_without_a_message_id_is_refused(self, store):
        with store.begin("run") as run, pytest.raises(ValueError, match="needs a messageId"):
            run.spool([{"type": "identify", "userId": "a", "traits": {}}])

    def test_run_cannot_be_used_after_commit(self, store):
        with store.begin("run") as run:
            finish(run, {})
            with pytest.raises(SyncStateError, match="already committed"):
                run.spool([])
            with pytest.raises(SyncStateError, match="already committed"):
                run.decide()

    def test_no_commit_leaves_state_unchanged(self, store):
        sync(store, COHORT)
        with store.begin("run-2") as run:
            run.spool([cohort_message(USER_ID_KEY, "user-1", 77)])
            run.decide()
        assert stored(store) == COHORT
        assert read_header(store).generation == 1

    def test_empty_cohort(self, store):
        classes, _ = sync(store, {})
        assert classes == {}
        assert stored(store) == {}
        result = run_sync(store, {}, run_id="run-2")
        assert result.decision.previous == 0 and result.decision.exit_ratio == 0.0

    def test_state_file_is_sqlite_without_traits(self, store, tmp_path):
        sync(store, {(USER_ID_KEY, "42"): 1, (ANONYMOUS_ID_KEY, "a-1"): 2})
        data = store.state_path.read_bytes()
        assert data.startswith(b"SQLite format 3\x00") and data[68:72] == b"LSG\x01"  # application id
        assert b'"v"' not in data
        assert {p.name for p in store.base_path.iterdir()} == {f"{KEY}.state"}  # lock and tmp gone
        copy = tmp_path / "copy.db"
        copy.write_bytes(data)
        with closing(sqlite3.connect(copy)) as db:
            rows = set(db.execute("SELECT ihash, digest, kind, CAST(identity AS TEXT) FROM identities"))
            meta = dict(db.execute("SELECT key, value FROM meta"))
            user_version = db.execute("PRAGMA user_version").fetchone()[0]
            pending = db.execute("SELECT count(*) FROM pending").fetchone()[0]
        as_signed = lambda value: value - (1 << 64) if value >= 1 << 63 else value  # noqa: E731
        assert rows == {
            (
                as_signed(identity_hash(USER_ID_KEY, "42")),
                as_signed(traits_digest({"v": 1, "m": True})),
                0,
                "42",
            ),
            (
                as_signed(identity_hash(ANONYMOUS_ID_KEY, "a-1")),
                as_signed(traits_digest({"v": 2, "m": True})),
                1,
                "a-1",
            ),
        } or rows == {
            (as_signed(identity_hash(USER_ID_KEY, "42")), as_signed(traits_digest({"v": 1})), 0, "42"),
            (as_signed(identity_hash(ANONYMOUS_ID_KEY, "a-1")), as_signed(traits_digest({"v": 2})), 1, "a-1"),
        }
        assert pending == 0
        assert meta["sync_key"] == KEY and meta["generation"] == 1 and meta["run_id"] == "run"
        assert meta["state_id"] == f"{user_version:08x}" == read_header(store).state_id
        assert read_header(store).count == 2

    def test_many_exits(self, store, small_flushes):
        """More exits than one query reads at once, and identities that need every bit of a signed integer."""
        cohort = {(USER_ID_KEY, f"u{n}"): n % 50 for n in range(1200)}
        sync(store, cohort)
        keep = {(USER_ID_KEY, "u7"): 7}
        result = run_sync(store, keep, run_id="run-2")
        assert result.commit.removed == 1199
        assert {(e.kind, e.identity) for e in result.exits} == set(cohort) - set(keep)
        assert all(e.ihash == identity_hash(e.kind, e.identity) for e in result.exits)
        assert stored(store) == keep


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    runs=st.lists(
        st.tuples(
            st.dictionaries(
                st.integers(0, 15), st.integers(0, 2), max_size=16
            ),  # present identity -> version
            st.sets(st.integers(0, 15)),  # failed identities
            st.sampled_from(["known", "unknown", "truncated"]),
            st.booleans(),  # full refresh
        ),
        min_size=1,
        max_size=5,
    )
)
def test_state_follows_a_model(runs, tmp_path_factory):
    """Over random runs, classifications and the stored state match a plain dict model."""
    attach_memory_fs()
    store = CohortStateStore(f"memory://state-model/{uuid.uuid4().hex}", KEY)
    model: dict[tuple[str, str], int] = {}  # members whose call Segment accepted (the state)
    unsure: set[tuple[str, str]] = set()  # members whose exit call failed: Segment may have taken it
    maybe: set[tuple[str, str]] = set()  # not members, whose refused call may have reached Segment anyway
    saved = sync_commit._FLUSH_ROWS
    sync_commit._FLUSH_ROWS = 4
    try:
        for present, failed_numbers, delivery, full_refresh in runs:
            cohort = {(USER_ID_KEY, f"id-{n}"): version for n, version in present.items()}
            failed = {(USER_ID_KEY, f"id-{n}") for n in failed_numbers}
            result = run_sync(
                store,
                cohort,
                fail=failed,
                unknown_failure=delivery == "unknown",
                possibly_truncated=delivery == "truncated",
                full_refresh=full_refresh,
            )
            exits = {(e.kind, e.identity) for e in result.exits}
            assert exits == (set(model) | maybe) - set(cohort)
            for key, version in cohort.items():
                assert result.classes.get(key, UNCHANGED) == (
                    NEW
                    if key not in model
                    else "rejoined"
                    if key in unsure
                    else UNCHANGED
                    if model[key] == version and not full_refresh
                    else CHANGED
                )
            known = delivery != "unknown"
            for key, version in cohort.items():
                if not result.classes.get(key) or not known:
                    continue
                if key not in failed:
                    model[key] = version
                    unsure.discard(key)
                    maybe.discard(key)
                elif key not in model:
                    maybe.add(key)
            if delivery == "known":
                for key in exits:
                    if key not in failed:
                        model.pop(key, None)
                        unsure.discard(key)
                        maybe.discard(key)
                    elif key in model:
                        unsure.add(key)
            assert stored(store) == model
    finally:
        sync_commit._FLUSH_ROWS = saved


# --------------------------------------------------------------------------------------------- atomicity


class _Crash(Exception):
    pass


class TestAtomicWrite:
    def test_crash_mid_write_keeps_previous_state(self, base, monkeypatch):
        store = CohortStateStore(base, KEY, save_retry_delays=(0.0,))
        sync(store, COHORT)
        copy = sync_state._copy

        def crash_halfway(source, target):
            target.write(source.read(1000))
            raise _Crash

        with pytest.raises(SyncStateSaveError) as raised, store.begin("run-2") as run:
            monkeypatch.setattr(sync_state, "_copy", crash_halfway)  # the upload (the download is done)
            finish(run, {(USER_ID_KEY, "other"): 1})
        monkeypatch.setattr(sync_state, "_copy", copy)
        message = str(raised.value)
        assert "delivered to Segment, but the state of sync" in message and "2 attempts" in message
        assert "generation 1" in message and "same messageIds" in message
        assert stored(store) == COHORT
        names = {p.name for p in store.base_path.iterdir()}
        assert names == {f"{KEY}.state", f"{KEY}.state.unsaved"}  # no tmp, no lock; the next run is told
        result = run_sync(store, COHORT)
        assert result.classes == {} and result.commit.saved is False

    def test_a_save_that_fails_once_is_retried(self, base, monkeypatch, caplog):
        sleeps: list[float] = []
        store = CohortStateStore(base, KEY, save_retry_delays=(1.0, 4.0), sleep=sleeps.append)
        copy, failures = sync_state._copy, []

        def no_space_once(source, target):
            if not failures:
                failures.append(1)
                raise OSError(28, "No space left on device")
            copy(source, target)

        monkeypatch.setattr(sync_state, "_copy", no_space_once)
        with caplog.at_level(logging.WARNING, logger=PACKAGE_LOGGER):
            sync(store, COHORT)
        assert (
            sleeps == [1.0]
            and "No space left on device" in caplog.text
            and "trying again in 1 s" in caplog.text
        )
        assert stored(store) == COHORT

    def test_process_killed_mid_write(self, tmp_path):
        """A process dying mid-write leaves the previous state readable; the next run removes its tmp file."""
        store = CohortStateStore(f"file://{tmp_path}/state", KEY)
        sync(store, COHORT)
        script = textwrap.dedent(
            f"""
            import os
            from airflow_provider_looker_segment import sync_state as s
            from airflow_provider_looker_segment.sync_run import CohortStateStore
            from sync_state_helpers import run_sync

            copy = s._copy

            def die_halfway(source, target):
                if ".state.tmp-" not in str(getattr(target, "path", "")):
                    return copy(source, target)
                target.write(source.read(1000))
                target.flush()
                os._exit(3)

            s._copy = die_halfway  # the upload
            store = CohortStateStore({store.base_path.as_uri()!r}, {KEY!r})
            run_sync(store, {{("userId", "someone"): 1}}, run_id="killed-run")
            """
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert done.returncode == 3, done.stderr
        names = {p.name for p in Path(tmp_path, "state").iterdir()}
        assert f"{KEY}.state" in names
        assert any(name.startswith(f"{KEY}.state.tmp-") for name in names)
        assert f"{KEY}.lock" in names  # the dead run's lock stays...
        assert stored(store) == COHORT
        classes, _ = sync(store, COHORT, run_id="killed-run")  # ...and is taken over by its retry
        assert set(classes.values()) == {UNCHANGED}
        assert {p.name for p in Path(tmp_path, "state").iterdir()} == {f"{KEY}.state"}


# --------------------------------------------------------------------------------------------- concurrency


class TestConcurrency:
    def test_concurrent_run_refused(self, store):
        with store.begin("scheduled__2024-01-01") as run:
            with pytest.raises(SyncStateLockedError) as raised:
                store.begin("manual__2024-01-01")
            message = str(raised.value)
            assert KEY in message
            assert "scheduled__2024-01-01" in message
            assert str(store.lock_path) in message
            assert raised.value.owner.run_id == "scheduled__2024-01-01"
            assert isinstance(raised.value, LookerSegmentError)
            finish(run, COHORT)
        sync(store, COHORT, run_id="manual__2024-01-01")  # released: the next run goes ahead

    def test_lock_released_on_error(self, store):
        with pytest.raises(RuntimeError), store.begin("run-1"):
            raise RuntimeError("boom")
        assert not store.lock_path.exists()
        sync(store, COHORT, run_id="run-2")

    def test_lock_content(self, store):
        with store.begin("run-1"):
            owner = LockOwner.from_bytes(store.lock_path.read_bytes(), None)
            assert owner.run_id == "run-1"
            assert owner.pid == os.getpid()
            assert abs(owner.acquired_at - datetime.now(timezone.utc)) < timedelta(minutes=1)
            assert owner.renewed_at == owner.acquired_at
            assert owner.pid_space == sync_lock._pid_space()

    def test_stale_lock_taken_over(self, store):
        old = LockOwner("crashed-run", "t", "h", 1, datetime.now(timezone.utc) - timedelta(hours=7))
        store.base_path.mkdir(parents=True, exist_ok=True)
        store.lock_path.write_bytes(old.to_bytes())
        sync(store, COHORT, run_id="next-run")
        assert not store.lock_path.exists()

    def test_recent_lock_respected_with_configured_age(self, base):
        store = CohortStateStore(base, KEY, lock_stale_after=timedelta(hours=8))
        old = LockOwner("slow-run", "t", "h", 1, datetime.now(timezone.utc) - timedelta(hours=7))
        store.base_path.mkdir(parents=True, exist_ok=True)
        store.lock_path.write_bytes(old.to_bytes())
        with pytest.raises(SyncStateLockedError, match="slow-run"):
            store.begin("next-run")
        with CohortStateStore(base, KEY, lock_stale_after=3600).begin("next-run") as run:
            assert run.previous_count == 0

    def test_unreadable_lock(self, store):
        store.base_path.mkdir(parents=True, exist_ok=True)
        store.lock_path.write_bytes(b"\x00not json")
        with pytest.raises(SyncStateLockedError, match="unreadable lock file") as raised:
            store.begin("run")
        assert "delete" in str(raised.value)

    def test_unreadable_lock_not_renewed_is_taken_over(self, tmp_path):
        """Without a readable time, a lock's age is its file's modification time."""
        store = CohortStateStore(f"file://{tmp_path}/state", KEY)
        store.base_path.mkdir(parents=True, exist_ok=True)
        store.lock_path.write_bytes(b"\x00not json")
        two_minutes_ago = time.time() - 120
        os.utime(store.lock_path.path, (two_minutes_ago, two_minutes_ago))
        sync(store, COHORT, run_id="next-run")

    @pytest.mark.parametrize(("age", "taken"), [(timedelta(minutes=2), True), (timedelta(seconds=5), False)])
    def test_lock_file_of_an_earlier_version(self, store, age, taken):
        """A lock without renewed_at (written by an earlier version) ages from acquired_at."""
        acquired = (datetime.now(timezone.utc) - age).isoformat()
        content = {"run_id": "old-run", "token": "t", "host": "h", "pid": 1, "acquired_at": acquired}
        store.base_path.mkdir(parents=True, exist_ok=True)
        store.lock_path.write_bytes(orjson.dumps(content))
        if taken:
            sync(store, COHORT, run_id="next-run")
        else:
            with pytest.raises(SyncStateLockedError, match="old-run"):
                store.begin("next-run")

    def test_lock_timing_arguments(self, base):
        store = CohortStateStore(base, KEY, lock_stale_after=30)
        assert (store.lock_stale_after, store.lock_renew_interval) == (
            timedelta(seconds=30),
            timedelta(seconds=10),
        )
        assert CohortStateStore(base, KEY).lock_stale_after == timedelta(seconds=60)
        with pytest.raises(ValueError, match="lock_renew_interval"):
            CohortStateStore(base, KEY, lock_stale_after=10, lock_renew_interval=10)

    def test_other_writer_detected_at_commit(self, store):
        sync(store, COHORT)
        run = store.begin("run-a")
        try:
            store.lock_path.unlink()  # e.g. a lock broken as stale while run-a was still running
            sync(store, {**COHORT, (USER_ID_KEY, "b"): 1}, run_id="run-b")
            with pytest.raises(SyncStateConflictError, match="changed since this run loaded it"):
                finish(run, {**COHORT, (USER_ID_KEY, "a"): 1})
        finally:
            run.close()
        assert stored(store) == {**COHORT, (USER_ID_KEY, "b"): 1}

    def test_other_writer_detected_on_full_refresh(self, store):
        run = store.begin("run-a", full_refresh=True)
        try:
            store.lock_path.unlink()
            sync(store, COHORT, run_id="run-b")
            with pytest.raises(SyncStateConflictError):
                finish(run, COHORT)
        finally:
            run.close()


# --------------------------------------------------------------------------------------------- lease


class _Holder:
    """Another process holding the sync's lock (``sync_state_helpers.py hold-lock``) until it is released."""

    def __init__(self, base_url: str, run_id: str, **options: object) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HELPERS), "hold-lock", base_url, KEY, run_id, json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.pid = self.process.pid
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for("locked")

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, text: str) -> str:
        """Return the output up to the first line containing ``text``."""
        seen: list[str] = []
        while (line := self._lines.get(timeout=300)) is not None:
            seen.append(line)
            if text in line:
                return "".join(seen)
        raise AssertionError(f"the holder ended without printing {text!r}:\n{''.join(seen)}")

    def release(self) -> str:
        self.process.stdin.close()
        output = self.wait_for("released")
        self.process.wait(timeout=300)
        return output

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a lost worker does; wait for it (its pid then names no process)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=300)


def _eventually(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        assert time.monotonic() < deadline, "the condition never became true"
        time.sleep(0.02)


def _lock_of(store: CohortStateStore) -> LockOwner:
    return LockOwner.from_bytes(store.lock_path.read_bytes(), None)


class TestLease:
    def test_live_holder_refused_then_dead_holder_taken_over_at_once(self, tmp_path, caplog):
        url = f"file://{tmp_path}/state"
        store = CohortStateStore(url, KEY)  # default: taken over after 60 s without renewal
        holder = _Holder(url, "holder-run")
        try:
            with pytest.raises(SyncStateLockedError) as raised:
                store.begin("next-run")
        finally:
            holder.kill()
        message = str(raised.value)
        assert raised.value.owner.pid == holder.pid and "holder-run" in message
        assert "last renewed" in message and "once not renewed for 60 seconds" in message
        with caplog.at_level(logging.WARNING, logger=PACKAGE_LOGGER), store.begin("next-run") as run:
            assert _lock_of(store).run_id == "next-run"
            finish(run, {})
        assert "its process is gone" in caplog.text and "holder-run" in caplog.text

    @pytest.mark.parametrize(
        ("host", "pid_space", "taken"),
        [
            ("this host", "this namespace", True),
            ("this host", None, True),  # a lock that does not say (earlier version, not Linux)
            ("worker-2.example", "this namespace", False),  # pids of other hosts prove nothing
            ("this host", "another namespace", False),  # nor those of another container of this name
        ],
    )
    def test_only_a_dead_pid_of_this_host_proves_the_holder_dead(self, store, host, pid_space, taken):
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()  # reaped: its pid names no process any more
        now = datetime.now(timezone.utc)
        owner = LockOwner(
            "crashed-run",
            "t",
            socket.gethostname() if host == "this host" else host,
            child.pid,
            now,
            now,
            sync_lock._pid_space() if pid_space == "this namespace" else pid_space,
        )
        store.base_path.mkdir(parents=True, exist_ok=True)
        store.lock_path.write_bytes(owner.to_bytes())
        if taken:
            sync(store, COHORT, run_id="next-run")
        else:
            with pytest.raises(SyncStateLockedError, match="crashed-run"):
                store.begin("next-run")

    def test_a_lease_not_renewed_is_taken_over(self, tmp_path, caplog):
        """A holder on another host that stops renewing (a hung worker) loses the lock after the expiry."""
        url = f"file://{tmp_path}/state"
        timing = {"stale_after": 1.0, "renew_interval": 0.2}
        store = CohortStateStore(url, KEY, lock_stale_after=1.0, lock_renew_interval=0.2)
        holder = _Holder(url, "hung-run", host="worker-2.example", **timing)
        try:
            with pytest.raises(SyncStateLockedError, match="hung-run"):
                store.begin("next-run")
            os.kill(holder.pid, signal.SIGSTOP)
            time.sleep(2)  # twice the expiry without renewal
            with caplog.at_level(logging.WARNING, logger=PACKAGE_LOGGER), store.begin("next-run"):
                assert "not renewed for more than 1 s)" in caplog.text
                os.kill(holder.pid, signal.SIGCONT)
                holder.wait_for("this run lost its lock")  # its renewal checks the token first
                assert "was taken over by run 'next-run'" in holder.release()
                assert _lock_of(store).run_id == "next-run"  # the old holder left it alone
            assert not store.lock_path.exists()
        finally:
            holder.kill()

    def test_renewal_keeps_a_long_run_locked(self, tmp_path):
        url = f"file://{tmp_path}/state"
        timing = {"stale_after": 1.0, "renew_interval": 0.2}
        store = CohortStateStore(url, KEY, lock_stale_after=1.0, lock_renew_interval=0.2)
        with store.begin("long-run"):
            time.sleep(3)  # three times the expiry
            contender = subprocess.run(
                [sys.executable, str(HELPERS), "try-lock", url, KEY, "next-run", json.dumps(timing)],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert contender.stdout.splitlines()[-1:] == ["refused"], contender.stdout + contender.stderr
            owner = _lock_of(store)
            assert owner.run_id == "long-run" and owner.renewed_at > owner.acquired_at
        assert not store.lock_path.exists()

    def test_renewal_stops_on_release_and_when_the_lock_is_lost(self, base, caplog):
        store = CohortStateStore(base, KEY, lock_stale_after=1.0, lock_renew_interval=0.05)
        now = datetime.now(timezone.utc)
        with caplog.at_level(logging.WARNING, logger=PACKAGE_LOGGER):
            with store.begin("run-1"):
                pass
            with store.begin("run-2"):
                other = LockOwner("other-run", "other-token", "worker-2.example", 1, now, now)
                store.lock_path.write_bytes(other.to_bytes())  # e.g. taken over while this run hung
                _eventually(lambda: "this run lost its lock" in caplog.text)
        assert "was taken over by run 'other-run'" in caplog.text
        assert _lock_of(store).token == "other-token"  # neither renewed nor removed by run-2
        assert not [thread for thread in threading.enumerate() if thread.name.startswith("lsg-lock-")]

    @pytest.mark.filterwarnings("ignore:UPath 'lsgnoexcl' filesystem not explicitly implemented")
    def test_without_exclusive_creation_the_lock_warns(self, caplog):
        attach_no_exclusive_fs()
        store = CohortStateStore(f"lsgnoexcl://state-tests/{uuid.uuid4().hex}", KEY)
        with caplog.at_level(logging.WARNING, logger=PACKAGE_LOGGER):
            with store.begin("run-1"), pytest.raises(SyncStateLockedError):
                store.begin("run-2")
        assert "cannot create a file exclusively" in caplog.text and "weaker" in caplog.text
        sync(store, COHORT)
        assert stored(store) == COHORT


# --------------------------------------------------------------------------------------------- corruption


def _rewrite(store: CohortStateStore, change) -> None:
    store.state_path.write_bytes(change(store.state_path.read_bytes()))


def _edit(store: CohortStateStore, *statements: str) -> None:
    """Change the stored state with SQL (on a local copy)."""
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder, "copy.db")
        copy.write_bytes(store.state_path.read_bytes())
        with closing(sqlite3.connect(copy)) as db:
            for statement in statements:
                db.execute(statement)
            db.commit()
        store.state_path.write_bytes(copy.read_bytes())


def _overwrite_page(data: bytes) -> bytes:
    """Garbage over a page in the middle of the file (4096-byte pages)."""
    middle = len(data) // 4096 // 2 * 4096
    return data[:middle] + bytes(range(256)) * 16 + data[middle + 4096 :]


def _other_sqlite_database(data: bytes) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "other.db")
        with closing(sqlite3.connect(path)) as db:
            db.execute("CREATE TABLE t (x)")
        return path.read_bytes()


CORRUPTIONS = {
    "garbage": (lambda data: b"hello world\n" * 10, "not a sync state file"),
    "empty": (lambda data: b"", "not a sync state file"),
    "another SQLite database": (_other_sqlite_database, "not a sync state file"),
    "newer version": (lambda data: data[:71] + b"\x02" + data[72:], "of this format version"),
    "earlier format": (
        lambda data: b'LSG-SYNC-STATE 1\n{"format": "airflow-provider-looker-segment sync state"}\n',
        "format of an earlier, unreleased version of this provider",
    ),
    "truncated": (lambda data: data[: len(data) // 2], "damaged"),
    "overwritten page": (_overwrite_page, "damaged"),
}


class TestCorruption:
    @pytest.mark.parametrize("name", [*CORRUPTIONS, "other sync"])
    def test_clear_error(self, store, name):
        sync(store, {(USER_ID_KEY, f"user-{n}"): n for n in range(2000)})  # a few pages
        if name == "other sync":
            reason = "belongs to sync look-1-x-0"
            _edit(store, "UPDATE meta SET value = 'look-1-x-0' WHERE key = 'sync_key'")
        else:
            change, reason = CORRUPTIONS[name]
            _rewrite(store, change)
        with pytest.raises(SyncStateCorruptError) as raised:
            store.begin("run")
        message = str(raised.value)
        assert str(store.state_path) in message
        assert reason in message
        assert "Delete it" in message
        assert "full_refresh=True" in message
        assert not store.lock_path.exists()  # a failed begin releases the lock

    def test_damaged_identity_found_when_it_exits(self, store):
        """A sound database whose identity no longer matches its hash (a bad edit, bit rot) is reported."""
        sync(store, COHORT)
        _edit(
            store,
            "UPDATE identities SET identity = CAST('x' AS BLOB) WHERE identity = CAST('user-3' AS BLOB)",
        )
        with store.begin("run") as run, pytest.raises(SyncStateCorruptError, match="is damaged") as raised:
            run.spool([])
            run.decide()
            list(run.iter_exits())
        assert "full_refresh=True" in str(raised.value)

    def test_full_refresh_skips_a_damaged_identity(self, store, caplog):
        sync(store, COHORT)
        _edit(
            store,
            "UPDATE identities SET identity = CAST('x' AS BLOB) WHERE identity = CAST('user-3' AS BLOB)",
        )
        cohort = {(USER_ID_KEY, "user-1"): 1}
        with caplog.at_level(logging.WARNING, logger=PACKAGE_LOGGER):
            _classes, exits = sync(store, cohort, full_refresh=True)
        assert set(exits) == set(COHORT) - set(cohort) - {(USER_ID_KEY, "user-3")}
        assert "no exit is sent for it" in caplog.text
        assert stored(store) == cohort


# --------------------------------------------------------------------------------------------- memory


def test_one_million_identities_in_bounded_memory(tmp_path):
    """Two 1 M-identity runs (load, classify, exits, write) in a subprocess: peak RSS and file size."""
    done = subprocess.run(
        [sys.executable, str(HELPERS), f"file://{tmp_path}/state", "1000000"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\n1 M-identity state benchmark: {report}")
    assert report["first_run"]["new"] == 1_000_000
    assert report["second_run"] == {
        "previous": 1_000_000,
        "new": 10_000,
        "changed": 19_800,
        "unchanged": 970_200,
        "exits": 10_000,
    }
    assert report["sent"] == [1_000_000, 10_000 + 19_800 + 10_000]  # the second: new, changed, exits
    assert report["state_size_bytes"] < 64 * 1024 * 1024  # 58 MB for these 32-character identities
    assert report["peak_rss_mb"] < 250
    assert report["growth_mb"] < 60
    # The traits digest is the same in another process (no per-process hash seed).
    assert report["reference_digest"] == traits_digest(REFERENCE_TRAITS)


class TestLockEdges:
    def test_a_lock_renewed_in_the_future_says_the_clocks_disagree(self, store):
        ahead = datetime.now(timezone.utc) + timedelta(minutes=5)
        owner = LockOwner("skewed-run", "t", "worker-2.example", 1, ahead, ahead)
        store.base_path.mkdir(parents=True, exist_ok=True)
        store.lock_path.write_bytes(owner.to_bytes())
        with pytest.raises(SyncStateLockedError) as raised:
            store.begin("next-run")
        message = str(raised.value)
        assert "last renewed 0:04:5" in message and "in the future" in message
        assert "clock is ahead" in message and "ago" not in message.split("skewed-run")[1].split(":")[0]

    def test_a_folder_where_the_lock_should_be_is_named(self, tmp_path):
        store = CohortStateStore(f"file://{tmp_path}/state", KEY)
        Path(store.lock_path.path).mkdir(parents=True)
        with pytest.raises(SyncStateError, match="is a folder, where the lock file should be") as raised:
            store.begin("run")
        assert "Remove that folder" in str(raised.value)
        assert not isinstance(raised.value, SyncStateLockedError)


def test_slices_decide_exactly_as_whole_partitions(tmp_path, monkeypatch):
    """Partitions compared in slices of a few records (as a 10 M cohort is) find the same new, changed,
    unchanged, departed and failed identities as whole partitions, run after run."""
    runs = [
        ({(USER_ID_KEY, f"u{n}"): n % 3 for n in range(600)}, set()),
        (
            {(USER_ID_KEY, f"u{n}"): (n + (n % 7 == 0)) % 3 for n in range(50, 700)},
            {(USER_ID_KEY, "u60"), (USER_ID_KEY, "u650")},
        ),
        ({(USER_ID_KEY, f"u{n}"): 1 for n in range(0, 700, 2)}, set()),
    ]
    results = {}
    for name, slice_records in (("whole", 1 << 20), ("sliced", 1)):
        monkeypatch.setattr(cohort_spool, "SLICE_RECORDS", slice_records)
        store = CohortStateStore(f"file://{tmp_path}/{name}", KEY)
        steps = []
        for cohort, failed in runs:
            result = run_sync(store, cohort, fail=failed, max_exit_ratio=1.0)
            steps.append(
                (
                    sorted(result.classes.items()),
                    sorted((e.kind, e.identity) for e in result.exits),
                    result.decision,
                    stored(store),
                )
            )
        results[name] = steps
    assert results["sliced"] == results["whole"]
