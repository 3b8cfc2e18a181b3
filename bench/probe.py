"""
Measurements taken inside a benchmark child process (standard library only: the baseline's venv uses it too).

A child creates a :class:`Probe` first thing, calls :meth:`Probe.mark` at the end of each phase and finally
:meth:`Probe.emit`, which prints one ``BENCH_RESULT {json}`` line on stdout for the launcher.

Peak memory is read from ``/proc/self/status`` (``VmHWM``), not from ``getrusage().ru_maxrss``: on Linux the
latter (``RUSAGE_SELF`` and ``RUSAGE_CHILDREN``) is carried over ``fork`` + ``exec``, so a child of a large
process would report its parent's size. ``VmHWM`` belongs to the address space the child got at ``exec``.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
from typing import Any

#: Prefix of the one stdout line a child writes for the launcher.
RESULT_PREFIX = "BENCH_RESULT "


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far, all threads included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def proc_status_mb(key: str) -> float:
    """A ``/proc/self/status`` memory line (``VmHWM``, ``VmRSS``) in MB (10^6 bytes); 0 when unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return 0.0


class Probe:
    """Wall time, CPU time and memory at named points of a child process's life."""

    def __init__(self) -> None:
        self.marks: dict[str, dict[str, float]] = {}
        self.gc_passes = [0, 0, 0]
        self.gc_seconds = 0.0
        self._gc_started = 0.0
        self._t0 = time.perf_counter()
        self.mark("start")

    def watch_gc(self) -> None:
        """From now on, count the garbage collector's passes (per generation) and the time they take."""
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_passes[info["generation"]] += 1
            self.gc_seconds += time.perf_counter() - self._gc_started

    def mark(self, name: str) -> None:
        """
        Record wall seconds since the probe was made, CPU seconds since exec and the current RSS; the mark
        ``imported`` also starts counting garbage-collector passes.
        """
        if name == "imported":
            self.watch_gc()
        self.marks[name] = {
            "wall": time.perf_counter() - self._t0,
            "cpu": cpu_seconds(),
            "rss_mb": proc_status_mb("VmRSS"),
        }

    def span(self, first: str, last: str) -> dict[str, float]:
        """Wall and CPU seconds between two marks."""
        a, b = self.marks[first], self.marks[last]
        return {"wall": b["wall"] - a["wall"], "cpu": b["cpu"] - a["cpu"]}

    def emit(self, **extra: Any) -> dict[str, Any]:
        """
        Print the result line: the marks, the import and pipeline spans, peak RSS and ``extra``.

        Expects the marks ``imported`` (imports done, before any work) and ``done`` (all work done).
        """
        result: dict[str, Any] = {
            "marks": self.marks,
            "import": self.span("start", "imported"),
            "pipeline": self.span("imported", "done"),
            "cpu_total": cpu_seconds(),
            "peak_rss_mb": proc_status_mb("VmHWM"),
            "rss_before_pipeline_mb": self.marks["imported"]["rss_mb"],
            "gc_passes": self.gc_passes,
            "gc_seconds": self.gc_seconds,
            "python": sys.version.split()[0],
            "pid": os.getpid(),
            **extra,
        }
        sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
        sys.stdout.flush()
        return result


def read_config() -> dict[str, Any]:
    """The child's configuration: a JSON object given as its only argument."""
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} '<json config>'")
    return json.loads(sys.argv[1])
