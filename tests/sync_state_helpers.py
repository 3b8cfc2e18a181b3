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
import sys
import time
from collections.abc import Iterator
from typing import Any

import fsspec
from airflow.sdk.io import attach
from fsspec.implementations.memory import MemoryFileSystem

from airflow_provider_looker_segment.exceptions import SyncStateLockedError
from airflow_provider_looker_segment.sync_state import (
    ANONYMOUS_ID,
    USER_ID,
    CohortStateStore,
    SyncRun,
    traits_digest,
)

#: The traits digest of this mapping, computed in the test process and in the benchmark's subprocess.
#: Set by ``--numeric``: identities like database ids (``10000042``) instead of UUID-like hex.
NUMERIC_IDS = False

REFERENCE_TRAITS = {"name": "Ty Arthur", "email": "ty.arthur@segment.com", "sessions count": 2, "vip": True}


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
    kind = ANONYMOUS_ID if number % 10 == 0 else USER_ID
    if NUMERIC_IDS:
        return kind, str(10_000_000 + number)
    return kind, hashlib.md5(str(number).encode(), usedforsecurity=False).hexdigest()


def run_counts(run: SyncRun) -> dict[str, int]:
    """The counters of a run: previous, new, changed, unchanged and exits."""
    return {
        "previous": run.previous_count,
        "new": run.new_count,
        "changed": run.changed_count,
        "unchanged": run.unchanged_count,
        "exits": run.exit_count,
    }


def _classify_range(run: SyncRun, numbers: Iterator[int], changed_every: int | None) -> None:
    for number in numbers:
        kind, identity = bench_identity(number)
        version = 2 if changed_every and number % changed_every == 0 else 1
        run.classify(kind, identity, traits_digest({"plan": "pro", "number": number, "version": version}))


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
    with store.begin("bench-run-1") as run:
        _classify_range(run, iter(range(count)), None)
        first = run.commit(set())
        first_counts = run_counts(run)
    with store.begin("bench-run-2") as run:
        _classify_range(run, iter(range(count // 100, count + count // 100)), 50)
        exits = sum(1 for _ in run.iter_exits())
        second = run.commit(set())
        second_counts = run_counts(run)
    peak = _max_rss_mb()
    return {
        "count": count,
        "first_run": first_counts,
        "second_run": second_counts,
        "exits_listed": exits,
        "state_size_bytes": second.size,
        "first_state_size_bytes": first.size,
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
