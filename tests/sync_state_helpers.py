"""Helpers of the sync state tests; run as a script, the memory benchmark of a 1 M-identity state.

``python tests/sync_state_helpers.py BASE_URL COUNT [--numeric]`` runs two syncs of COUNT identities against
a state under BASE_URL (run 1: all new; run 2: 1 % left, 1 % joined, 2 % changed) and prints a JSON report
with the peak RSS of the process, its growth during the runs and the state file's size.

``python tests/sync_state_helpers.py hold-lock|try-lock BASE_URL KEY RUN_ID OPTIONS`` (OPTIONS: JSON with
``stale_after``, ``renew_interval``, ``host``) holds a sync's lock until stdin closes, or tries to take it
and prints ``acquired`` or ``refused``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import socket
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
import orjson
from airflow.sdk.io import attach
from fsspec.implementations.memory import MemoryFileSystem

from airflow_provider_looker_segment.cohort_sync import CohortCounts, CohortEvents, CohortMessages, plan_exits
from airflow_provider_looker_segment.cohort_units import (
    CHANGED,
    NEW,
    REJOINED,
    SWITCHED,
    Decision,
    Departure,
)
from airflow_provider_looker_segment.exceptions import SyncStateLockedError
from airflow_provider_looker_segment.sync_commit import CommitResult, commit_run
from airflow_provider_looker_segment.sync_run import CohortStateStore
from airflow_provider_looker_segment.sync_state import (
    ANONYMOUS_ID_KEY,
    IDENTITY_KINDS,
    USER_ID_KEY,
)

#: The traits digest of this mapping, computed in the test process and in the benchmark's subprocess.
#: Set by ``--numeric``: identities like database ids (``10000042``) instead of UUID-like hex.
NUMERIC_IDS = False

REFERENCE_TRAITS = {"name": "Ty Arthur", "email": "ty.arthur@segment.com", "sessions count": 2, "vip": True}


def traits_digest(traits: dict[str, Any]) -> int:
    """
    The traits digest a state stores, as the spool computes it: blake2b (8 bytes, big-endian, unsigned) of
    ``orjson.dumps(traits, option=OPT_SORT_KEYS)``.
    """
    return int.from_bytes(
        hashlib.blake2b(orjson.dumps(traits, option=orjson.OPT_SORT_KEYS), digest_size=8).digest(), "big"
    )


def attach_memory_fs() -> None:
    """Make ``memory://`` usable through ObjectStoragePath (Airflow registers no filesystem for it)."""
    attach(protocol="memory", fs=MemoryFileSystem())


class NoExclusiveCreateFileSystem(MemoryFileSystem):
    """An in-memory filesystem that cannot create a file exclusively (``open("xb")``), like some stores."""

    protocol = "lsgnoexcl"
    store: dict[str, Any] = {}  # its own files, not those of memory://
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        if isinstance(path, str) and path.startswith("lsgnoexcl://"):
            path = path[len("lsgnoexcl://") :]
        return super()._strip_protocol(path)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "x" in mode:
            raise NotImplementedError("no exclusive creation on this filesystem")
        return super()._open(path, mode, **kwargs)


def attach_no_exclusive_fs() -> None:
    """Make ``lsgnoexcl://`` (:class:`NoExclusiveCreateFileSystem`) usable through ObjectStoragePath."""
    fsspec.register_implementation("lsgnoexcl", NoExclusiveCreateFileSystem, clobber=True)
    attach(protocol="lsgnoexcl", fs=NoExclusiveCreateFileSystem())


def _lock_store(base_url: str, key: str, options: dict[str, Any]) -> CohortStateStore:
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, force=True, format="%(message)s")
    if options.get("host"):  # a holder on another machine, as far as the lock can tell
        socket.gethostname = lambda: options["host"]
    timing = {"stale_after": "lock_stale_after", "renew_interval": "lock_renew_interval"}
    return CohortStateStore(base_url, key, **{timing[k]: v for k, v in options.items() if k in timing})


def hold_lock(base_url: str, key: str, run_id: str, options: dict[str, Any]) -> None:
    """Take the sync's lock, print ``locked``, hold it until stdin closes, release it, print ``released``."""
    with _lock_store(base_url, key, options).begin(run_id):
        print("locked", flush=True)
        sys.stdin.read()
    print("released", flush=True)


def try_lock(base_url: str, key: str, run_id: str, options: dict[str, Any]) -> str:
    """Try to take the sync's lock (releasing it at once); return ``acquired`` or ``refused``."""
    try:
        with _lock_store(base_url, key, options).begin(run_id):
            return "acquired"
    except SyncStateLockedError:
        return "refused"


def bench_identity(number: int) -> tuple[str, str]:
    """Return a UUID-like identity (32 random-looking hex digits: a worst case for compression)."""
    kind = ANONYMOUS_ID_KEY if number % 10 == 0 else USER_ID_KEY
    if NUMERIC_IDS:
        return kind, str(10_000_000 + number)
    return kind, hashlib.md5(str(number).encode(), usedforsecurity=False).hexdigest()


def _bench_messages(numbers: Iterator[int], changed_every: int | None) -> Iterator[dict[str, Any]]:
    for number in numbers:
        kind, identity = bench_identity(number)
        version = 2 if changed_every and number % changed_every == 0 else 1
        traits = {"plan": "pro", "number": number, "version": version}
        yield {"type": "identify", kind: identity, "traits": traits, "messageId": f"lsg-{number:032x}"}


def _bench_run(store: CohortStateStore, run_id: str, messages: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """One run that hands every message to a Segment that accepts them all; its counts."""
    events = CohortEvents(membership_trait="m", sync_key=store.key)
    with store.begin(run_id) as run:
        run.spool(messages)
        decision = run.decide()
        counts = CohortCounts()
        plan_exits(decision, counts, events, max_exit_ratio=1.0, possibly_truncated=False)
        cohort_messages = CohortMessages(run, events, counts)
        sent = sum(1 for _message in cohort_messages)
        result = commit_run(
            run,
            cohort_messages.handed,
            keep_departed=False,
            membership_trait=True,
            entered_event=False,
            exited_event=False,
        )
    return {
        "previous": decision.previous,
        "new": decision.new,
        "changed": decision.changed,
        "unchanged": decision.unchanged,
        "exits": decision.departed,
        "sent": sent,
        "size": result.bytes,
        "spool_bytes": run.spool_bytes,
    }


def _max_rss_mb() -> float:
    """
    The peak RSS of this process image (Linux ``VmHWM``). ``ru_maxrss`` is not used: Linux carries it over
    ``fork`` + ``exec``, so a child of a large pytest process would report the parent's size.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _current_rss_mb() -> float:
    """The current RSS (Linux); elsewhere the peak so far."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return _max_rss_mb()


def run_benchmark(base_url: str, count: int) -> dict[str, object]:
    """Two runs of ``count`` identities; return counts, sizes and memory figures."""
    store = CohortStateStore(base_url, "bench-sync")
    baseline = _current_rss_mb()
    started = time.monotonic()
    first = _bench_run(store, "bench-run-1", _bench_messages(iter(range(count)), None))
    second = _bench_run(
        store, "bench-run-2", _bench_messages(iter(range(count // 100, count + count // 100)), 50)
    )
    peak = _max_rss_mb()
    return {
        "count": count,
        "first_run": {k: v for k, v in first.items() if k not in ("size", "spool_bytes", "sent")},
        "second_run": {k: v for k, v in second.items() if k not in ("size", "spool_bytes", "sent")},
        "sent": [first["sent"], second["sent"]],
        "spool_bytes": first["spool_bytes"],
        "state_size_bytes": second["size"],
        "first_state_size_bytes": first["size"],
        "baseline_rss_mb": round(baseline, 1),
        "peak_rss_mb": round(peak, 1),
        "growth_mb": round(peak - baseline, 1),
        "seconds": round(time.monotonic() - started, 1),
        "reference_digest": traits_digest(REFERENCE_TRAITS),
    }


if __name__ == "__main__":
    if sys.argv[1] == "hold-lock":
        hold_lock(*sys.argv[2:5], json.loads(sys.argv[5]))
    elif sys.argv[1] == "try-lock":
        print(try_lock(*sys.argv[2:5], json.loads(sys.argv[5])), flush=True)
    else:
        NUMERIC_IDS = "--numeric" in sys.argv[3:]
        print(json.dumps(run_benchmark(sys.argv[1], int(sys.argv[2]))))


# ------------------------------------------------------------------------------ changed-only runs, end to end


class RunResult(NamedTuple):
    """What :func:`run_sync` did: per identity its class, the exits, the messages handed and accepted."""

    classes: dict[tuple[str, str], str]
    exits: list[Departure]
    sent: list[dict[str, Any]]
    accepted: list[dict[str, Any]]
    counts: CohortCounts
    decision: Decision
    commit: CommitResult | None


VERDICT_NAMES = {NEW: "new", CHANGED: "changed", SWITCHED: "switched", REJOINED: "rejoined"}


def cohort_message(
    kind: str, identity: str, version: int, run_id: str = "run", **extra: Any
) -> dict[str, Any]:
    """An identify call of the cohort: ``traits`` ``{"v": version}``, a messageId of this run."""
    digest = hashlib.md5(f"{run_id}/{kind}/{identity}/{version}".encode(), usedforsecurity=False).hexdigest()
    return {
        "type": "identify",
        kind: identity,
        "traits": {"v": version},
        **extra,
        "messageId": f"lsg-{digest}",
    }


def run_sync(
    store: CohortStateStore,
    cohort: dict[tuple[str, str], int] | list[dict[str, Any]],
    *,
    events: CohortEvents | None = None,
    fail: Callable[[dict[str, Any]], bool] | set[tuple[str, str]] = frozenset(),
    unknown_failure: bool = False,
    run_id: str = "run",
    full_refresh: bool = False,
    max_exit_ratio: float = 1.0,
    possibly_truncated: bool = False,
    stop_after: int | None = None,
) -> RunResult:
    """
    One changed-only run as the pipeline makes it: spool the cohort's calls, decide, hand the messages to a
    simulated Segment (``fail`` says which are refused: a predicate, or (kind, identity) pairs whose every
    message fails; ``stop_after`` stops reading after that many), commit.
    """
    events = events or CohortEvents(membership_trait="m", sync_key=store.key)
    if isinstance(cohort, dict):
        messages = [
            cohort_message(kind, identity, version, run_id) for (kind, identity), version in cohort.items()
        ]
    else:
        messages = cohort
    if isinstance(fail, (set, frozenset)):
        failing = set(fail)
        fail = lambda message: any(message.get(kind) == identity for kind, identity in failing)  # noqa: E731
    with store.begin(run_id, full_refresh=full_refresh) as run:
        messages = list(messages) if not isinstance(messages, list) else messages
        run.spool(messages, by_group=bool(messages) and messages[0].get("type") == "group")
        decision = run.decide()
        counts = CohortCounts(new=decision.new, changed=decision.changed, unchanged=decision.unchanged)
        plan_exits(
            decision, counts, events, max_exit_ratio=max_exit_ratio, possibly_truncated=possibly_truncated
        )
        classes = {(unit.kind, unit.identity): VERDICT_NAMES[unit.verdict] for unit in run.iter_units()}
        exits = list(run.iter_exits())
        if counts.exit_guard:
            return RunResult(classes, exits, [], [], counts, decision, None)
        cohort_messages = CohortMessages(run, events, counts)
        sent, accepted = [], []
        for message in cohort_messages:
            if stop_after is not None and len(sent) >= stop_after:
                # Read but never sent, as a stopped delivery accounts for the batch being filled.
                run.record_undelivered([message["messageId"]])
                break
            sent.append(message)
            if fail(message):
                run.record_undelivered([message["messageId"]])
            else:
                accepted.append(message)
        if unknown_failure:
            run.record_undelivered(["not-one-of-ours"])
        result = commit_run(
            run,
            cohort_messages.handed,
            keep_departed=counts.keep_departed,
            membership_trait=bool(events.membership_trait),
            entered_event=bool(events.entered_event),
            exited_event=bool(events.exited_event),
        )
    return RunResult(classes, exits, sent, accepted, counts, decision, result)


def stored_versions(store: CohortStateStore) -> dict[tuple[str, str], int]:
    """The stored state as (kind, identity) → version (the ``v`` whose traits digest it holds, up to 99)."""
    by_digest = {traits_digest({"v": version}): version for version in range(100)}
    by_digest |= {traits_digest({"v": version, "m": True}): version for version in range(100)}
    return {(e.kind, e.identity): by_digest.get(e.digest, -1) for e in stored_entries(store)}


class StateHeader(NamedTuple):
    """What a stored state says about itself: its ``meta`` table and its number of identities."""

    sync_key: str
    generation: int
    state_id: str
    run_id: str
    written_at: str
    count: int


class StateEntry(NamedTuple):
    """One identity of a stored state: identity hash and traits digest (unsigned), kind and identity."""

    ihash: int
    digest: int
    kind: str
    identity: str


@contextmanager
def _stored_state(store: CohortStateStore) -> Iterator[sqlite3.Connection | None]:
    """The stored state file, read directly (no lock, no check), or ``None`` when there is none."""
    with tempfile.TemporaryDirectory(prefix="lsg-test-state-") as folder:
        local = Path(folder) / "state.db"
        try:
            local.write_bytes(store.state_path.read_bytes())
        except FileNotFoundError:
            yield None
            return
        with closing(sqlite3.connect(local)) as db:
            yield db


def read_header(store: CohortStateStore) -> StateHeader | None:
    """What the stored state says about itself, or ``None`` if there is none."""
    with _stored_state(store) as db:
        if db is None:
            return None
        meta = dict(db.execute("SELECT key, value FROM meta"))
        return StateHeader(**meta, count=db.execute("SELECT count(*) FROM identities").fetchone()[0])


def stored_entries(store: CohortStateStore) -> list[StateEntry]:
    """The stored state's identities."""
    with _stored_state(store) as db:
        rows = [] if db is None else db.execute("SELECT ihash, digest, kind, identity FROM identities")
        return [
            StateEntry(
                ihash % 2**64, digest % 2**64, IDENTITY_KINDS[kind], identity.decode("utf-8", "surrogatepass")
            )
            for ihash, digest, kind, identity in rows
        ]
