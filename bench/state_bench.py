"""
Benchmark of the ``sync_mode="changed"`` state store at a given cohort size (default 1 M identities).

Runs, each in a fresh child process (so that its peak memory is its own):

1. a first run: every identity new, committed;
2. a second run with the same cohort: every identity unchanged, exits listed, committed;
3. a full refresh of the same cohort: every identity sent again, committed.

For each run it reports the wall time of ``begin``, of the ``classify`` calls (and per row; the rows are
prepared outside the timed loop), of listing the exits and of ``commit``; their total (with ``close``); the
state file's size; the process's peak RSS so far (``VmHWM``, MB of 10^6 bytes), and at the end its growth
over the RSS before the first run. Identities are UUID-like (32 random-looking hex digits, one in ten an
anonymousId: a worst case for compression) or ``--numeric`` (like database ids).

``python bench/state_bench.py`` measures the package's ``sync_state``; ``--module PATH`` measures another
copy of the module, e.g. the previous implementation::

    git show HEAD:airflow_provider_looker_segment/sync_state.py > /tmp/old_sync_state.py
    python bench/state_bench.py --module /tmp/old_sync_state.py --module package

Each ``--module`` is run in its own child process; a Markdown table compares them. Timings on a shared
machine vary by ±20 %: compare runs made together.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

PACKAGE = "package"


def _peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _status_mb(key: str) -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / 1e6
    return 0.0


def _load(module: str) -> ModuleType:
    if module == PACKAGE:
        return importlib.import_module("airflow_provider_looker_segment.sync_state")
    spec = importlib.util.spec_from_file_location("bench_sync_state", module)
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded  # dataclasses look their module up
    spec.loader.exec_module(loaded)
    return loaded


def _identity(number: int, numeric: bool) -> tuple[str, str]:
    kind = "anonymousId" if number % 10 == 0 else "userId"
    if numeric:
        return kind, str(10_000_000 + number)
    return kind, hashlib.md5(str(number).encode(), usedforsecurity=False).hexdigest()


def _digest(number: int) -> int:
    return int.from_bytes(hashlib.blake2b(number.to_bytes(8, "big"), digest_size=8).digest(), "big")


def _classify_all(state: ModuleType, count: int, numeric: bool, classify: Any) -> float:
    """
    Classify ``count`` identities as the operator does (identity hash given); return the time spent in
    ``classify`` alone: the arguments are prepared 10,000 at a time, outside the timed loop.
    """
    spent = 0.0
    for start in range(0, count, 10_000):
        chunk = []
        for number in range(start, min(start + 10_000, count)):
            kind, identity = _identity(number, numeric)
            chunk.append((kind, identity, _digest(number), state.identity_hash(kind, identity)))
        started = time.perf_counter()
        for kind, identity, digest, ihash in chunk:
            classify(kind, identity, digest, ihash=ihash)
        spent += time.perf_counter() - started
    return spent


def _one_run(state: ModuleType, store: Any, name: str, count: int, numeric: bool, **begin: bool) -> dict:
    started = time.perf_counter()
    with store.begin(name, **begin) as run:
        began = time.perf_counter()
        classify = _classify_all(state, count, numeric, run.classify)
        classified = time.perf_counter()
        exits = sum(1 for _ in run.iter_exits())
        listed = time.perf_counter()
        result = run.commit(set())
        committed = time.perf_counter()
        counts = {"new": run.new_count, "changed": run.changed_count, "unchanged": run.unchanged_count}
    closed = time.perf_counter()
    return {
        "counts": counts,
        "exits": exits,
        "begin_s": round(began - started, 2),
        "classify_s": round(classify, 2),
        "classify_us_per_row": round(classify / count * 1e6, 2),
        "exits_s": round(listed - classified, 2),
        "commit_s": round(committed - listed, 2),
        "close_s": round(closed - committed, 2),
        # Everything but preparing the rows: begin, classify, exits, commit, close.
        "total_s": round((began - started) + classify + (closed - classified), 2),
        "state_bytes": store.state_path.stat().st_size,
        "entries": result.entries,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }


def child(module: str, count: int, numeric: bool) -> dict:
    """Measure one implementation in this process; return the figures."""
    state = _load(module)
    with tempfile.TemporaryDirectory(prefix="lsg-state-bench-") as folder:
        store = state.CohortStateStore(f"file://{folder}/state", "bench-sync", tmp_dir=folder)
        baseline = _rss_mb()
        runs = {
            "first (all new)": _one_run(state, store, "run-1", count, numeric),
            "second (all unchanged)": _one_run(state, store, "run-2", count, numeric),
            "full refresh": _one_run(state, store, "run-3", count, numeric, full_refresh=True),
        }
    return {
        "module": module,
        "count": count,
        "numeric": numeric,
        "baseline_rss_mb": round(baseline, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "growth_mb": round(_peak_rss_mb() - baseline, 1),
        "runs": runs,
    }


def table(results: list[dict]) -> str:
    """Return a Markdown table of the children's figures."""
    lines = [
        "| module | run | state MB | begin s | classify s (µs/row) | exits s | commit s | run total s | "
        "peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for name, run in result["runs"].items():
            lines.append(
                f"| {result['module']} | {name} | {run['state_bytes'] / 1e6:.1f} | {run['begin_s']} | "
                f"{run['classify_s']} ({run['classify_us_per_row']}) | {run['exits_s']} | "
                f"{run['commit_s']} | {run['total_s']} | {run['peak_rss_mb']} |"
            )
        lines.append(
            f"| {result['module']} | (process) | | | | | | | {result['peak_rss_mb']} "
            f"(growth {result['growth_mb']}) |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run each module in a child process and print the comparison (or, as a child, one JSON line)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", help=f"a sync_state.py path or {PACKAGE!r}")
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--numeric", action="store_true", help="identities like database ids")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    modules = args.module or [PACKAGE]
    if args.child:
        print(json.dumps(child(modules[0], args.count, args.numeric)))
        return
    results = []
    for module in modules:
        command = [sys.executable, __file__, "--child", "--module", module, "--count", str(args.count)]
        done = subprocess.run(
            command + (["--numeric"] if args.numeric else []), capture_output=True, text=True, check=False
        )
        if done.returncode:
            sys.exit(f"{module} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
