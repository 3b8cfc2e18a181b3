"""
The Looker API and Segment stand-ins in their own processes, with their CPU time readable from /proc.

Both run from their command lines (``python -m standins.looker_standin`` and
``...segment_standin --record count --latency-ms N``, one Segment stand-in per round trip measured) through
:class:`standins.processes.StandInProcess`, so the measured child contains only the client side, and the
launcher knows their pids to charge each run the stand-ins' CPU seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

from standins.processes import StandInProcess

LOOKER_CLIENT_ID = "looker-demo-id"
LOOKER_CLIENT_SECRET = "looker-demo-secret"
SEGMENT_WRITE_KEY = "demo-write-key"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (all its threads), from ``/proc/PID/stat``."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rpartition(")")[2].split()
    # After the command name: state (field 3) ... utime (field 14), stime (field 15).
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def looker_standin(log_dir: Path) -> StandInProcess:
    """The Looker API 4.0 stand-in (credentials ``looker-demo-id`` / ``looker-demo-secret``)."""
    args = ["--port", "0", "--client-id", LOOKER_CLIENT_ID, "--client-secret", LOOKER_CLIENT_SECRET]
    return StandInProcess.module("looker-standin", "looker_standin", args, "listening on ", log_dir=log_dir)


def segment_standin(log_dir: Path, latency_ms: float = 0.0) -> StandInProcess:
    """
    The Segment Tracking API stand-in, counting events only (write key ``demo-write-key``), holding every
    answer ``latency_ms`` after its request arrived (Segment's round trip).
    """
    args = [
        "--port",
        "0",
        "--record",
        "count",
        "--write-key",
        SEGMENT_WRITE_KEY,
        "--latency-ms",
        f"{latency_ms:g}",
    ]
    name = "segment-standin" if not latency_ms else f"segment-standin-{latency_ms:g}ms"
    return StandInProcess.module(name, "segment_standin", args, "SEGMENT_STANDIN_URL=", log_dir=log_dir)
