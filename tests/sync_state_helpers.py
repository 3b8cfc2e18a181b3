"""Helpers of the sync state tests; run as a script, the memory benchmark of a 1 M-identity state.

``python tests/sync_state_helpers.py BASE_URL COUNT [--numeric]`` runs two syncs of COUNT identities against
a state under BASE_URL (run 1: all new; run 2: 1 % left, 1 % joined, 2 % changed) and prints a JSON report
with the peak RSS of the process, its growth during the runs and the state file's size.
"""

from __future__ import annotations

import hashlib
import json
import resource
import sys
import time
from collections.abc import Iterator

from airflow.sdk.io import attach
from fsspec.implementations.memory import MemoryFileSystem

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


def bench_identity(number: int) -> tuple[str, str]:
    """Return a UUID-like identity (32 random-looking hex digits: a worst case for compression)."""
    kind = ANONYMOUS_ID if number % 10 == 0 else USER_ID
    if NUMERIC_IDS:
        return kind, str(10_000_000 + number)
    return kind, hashlib.md5(str(number).encode(), usedforsecurity=False).hexdigest()


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
        first_counts = run.counts()
    with store.begin("bench-run-2") as run:
        _classify_range(run, iter(range(count // 100, count + count // 100)), 50)
        exits = sum(1 for _ in run.iter_exits())
        second = run.commit(set())
        second_counts = run.counts()
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
    NUMERIC_IDS = "--numeric" in sys.argv[3:]
    print(json.dumps(run_benchmark(sys.argv[1], int(sys.argv[2]))))
