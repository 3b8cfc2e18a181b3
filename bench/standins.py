"""
The Looker API and Segment stand-ins in their own processes, with their CPU time readable from /proc.

Both run from their command lines (``python -m airflow_provider_looker_segment.testing.looker_standin`` and
``...segment_standin --record count``, the same command :class:`SegmentStandInProcess` runs), so the measured
child contains only the client side, and the launcher knows their pids to charge each run the stand-ins'
CPU seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from airflow_provider_looker_segment.testing.processes import stop_process

LOOKER_MODULE = "airflow_provider_looker_segment.testing.looker_standin"
SEGMENT_MODULE = "airflow_provider_looker_segment.testing.segment_standin"
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


class StandInProcess:
    """
    A stand-in started from its command line; its base URL is read from what it prints.

    :param name: a name for messages and the log file.
    :param command: the command line.
    :param url_marker: the text after which the first line it prints with the URL gives it.
    :param log_dir: folder of its stdout/stderr file.
    """

    def __init__(self, name: str, command: list[str], url_marker: str, log_dir: Path) -> None:
        self.name = name
        self.command = command
        self.url_marker = url_marker
        self.log_path = log_dir / f"{name}.log"
        self.base_url = ""
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The process id."""
        if self._process is None:
            raise RuntimeError(f"the {self.name} stand-in is not running")
        return self._process.pid

    def cpu_seconds(self) -> float:
        """CPU seconds the stand-in has used so far."""
        return process_cpu_seconds(self.pid)

    def start(self, timeout: float = 60.0) -> str:
        """Start it and wait until it prints its URL; return the URL."""
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
                if self.url_marker in line:
                    self.base_url = line.partition(self.url_marker)[2].strip()
                    return self.base_url
            if self._process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the {self.name} stand-in did not start; see {self.log_path}")

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL after 10 s)."""
        process, self._process = self._process, None
        if process is None:
            return
        stop_process(process)

    def __enter__(self) -> StandInProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def looker_standin(log_dir: Path, python: str = sys.executable) -> StandInProcess:
    """The Looker API 4.0 stand-in (credentials ``looker-demo-id`` / ``looker-demo-secret``)."""
    command = [python, "-m", LOOKER_MODULE, "--port", "0"]
    command += ["--client-id", LOOKER_CLIENT_ID, "--client-secret", LOOKER_CLIENT_SECRET]
    return StandInProcess("looker-standin", command, "listening on ", log_dir)


def segment_standin(log_dir: Path, python: str = sys.executable) -> StandInProcess:
    """The Segment Tracking API stand-in, counting events only (write key ``demo-write-key``)."""
    command = [
        python,
        "-m",
        SEGMENT_MODULE,
        "--port",
        "0",
        "--record",
        "count",
        "--write-key",
        SEGMENT_WRITE_KEY,
    ]
    return StandInProcess("segment-standin", command, "SEGMENT_STANDIN_URL=", log_dir)
