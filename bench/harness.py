"""
The benchmark's machinery: the measured cases, the record of one child run, and :class:`Bench`, which runs
the stand-ins (Looker, and one Segment stand-in per round trip) and the child processes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probe import RESULT_PREFIX
from standin_processes import (
    LOOKER_CLIENT_ID,
    LOOKER_CLIENT_SECRET,
    SEGMENT_WRITE_KEY,
    StandInProcess,
    looker_standin,
    process_cpu_seconds,
    segment_standin,
)
from standins.looker_fixtures import GENERATED_LOOK_BASE
from standins.segment_standin import SegmentStandInClient

BENCH_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Case:
    """
    One measured way of moving a Look into Segment.

    :param name: the name used by ``--cases``.
    :param label: the name in the report.
    :param script: the child script in ``bench/``.
    :param baseline: runs in the baseline's venv.
    :param network: sends to the Segment stand-in (its stats give the events received).
    :param config: extra configuration for the child.
    """

    name: str
    label: str
    script: str
    baseline: bool = False
    network: bool = True
    config: dict[str, Any] = field(default_factory=dict)


CASES = {
    case.name: case
    for case in (
        Case("ours", "ours: LookerToSegmentOperator.execute", "case_ours.py"),
        Case(
            "baseline-a",
            "baseline A: segment-analytics-python, queue > N",
            "case_baseline.py",
            baseline=True,
            config={"mode": "A"},
        ),
        Case(
            "baseline-b",
            "baseline B: segment-analytics-python, defaults",
            "case_baseline.py",
            baseline=True,
            config={"mode": "B"},
        ),
        Case("floor", "floor: parse + transform + batch, no network", "case_floor.py", network=False),
    )
}
#: Cases measured at N = 0 for the fixed start-up cost (baseline B is baseline A at N = 0).
STARTUP_CASES = ("ours", "baseline-a", "floor")


class BenchError(RuntimeError):
    """A child process failed or printed no result."""


@dataclass
class RunRecord:
    """
    One child process run and what the launcher saw around it.

    :param case: the case name (or ``ceiling-looker`` / ``ceiling-segment``).
    :param rows: N.
    :param repeat: the repeat number (0-based).
    :param process_wall: seconds from spawning the child to its exit.
    :param result: what the child printed (see ``probe.Probe.emit``).
    :param received: events the Segment stand-in received (the floor: events batched).
    :param standin_rejected: events the Segment stand-in rejected.
    :param looker_cpu: CPU seconds the Looker stand-in used during the run.
    :param segment_cpu: CPU seconds the Segment stand-in used during the run.
    :param latency_ms: the Segment stand-in's round trip.
    :param events_per_second: the pacing given to ours (0: none).
    :param peak_in_flight: the most requests the Segment stand-in served at once during the run.
    :param arrivals: for a paced run, the Segment stand-in's view: ``first`` and ``last`` arrival
        (``time.time()``), ``first_events`` and ``last_events`` (events of those requests), ``requests``.
    """

    case: str
    rows: int
    repeat: int
    process_wall: float
    result: dict[str, Any]
    received: int
    standin_rejected: int
    looker_cpu: float
    segment_cpu: float
    latency_ms: float = 0.0
    events_per_second: float = 0.0
    peak_in_flight: int = 0
    arrivals: dict[str, Any] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        """Events not received (N - received)."""
        return self.rows - self.received


#: The logger of the SegmentHook (Airflow's ``airflow.task.hooks.<module>.<class>``).
SEGMENT_HOOK_LOGGER = "airflow.task.hooks.airflow_provider_looker_segment.hooks.segment.SegmentHook"
#: The SegmentHook's last log line about its delivery's flow (``Delivery.run``), logged at DEBUG.
_FLOW = re.compile(
    r"Segment delivery flow: up to (?P<peak>\d+) requests in flight \(cap (?P<cap>\d+); now \d+\), "
    r"round trip (?:(?P<round_trip>[\d,]+) ms|not measured), (?P<slowdowns>\d+) slow-downs; reading waited "
    r"(?P<waited>[\d.]+) s for room"
)


def delivery_flow(log: str) -> dict[str, float]:
    """
    What ours logged about its delivery's flow: ``peak`` window, ``cap``, ``round_trip_ms`` (moving average),
    ``slowdowns`` and ``waited_s``, the seconds the reading thread waited for sending (empty if not logged).
    """
    matches = list(_FLOW.finditer(log))
    if not matches:
        return {}
    found = matches[-1]
    round_trip = found["round_trip"]
    return {
        "peak": int(found["peak"]),
        "cap": int(found["cap"]),
        "round_trip_ms": float(round_trip.replace(",", "")) if round_trip else 0.0,
        "slowdowns": int(found["slowdowns"]),
        "waited_s": float(found["waited"]),
    }


def _clean_env() -> dict[str, str]:
    """The launcher's environment without Airflow or looker_sdk settings (each child gets its own)."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AIRFLOW_", "AIRFLOW__", "LOOKERSDK_"))
    }


def baseline_problem(python: str) -> str | None:
    """Why the baseline venv cannot run, or ``None`` when it can import both libraries."""
    if not Path(python).is_file():
        return f"no baseline venv at {python} (`make bench` creates bench/.venv from bench/requirements.txt)"
    check = "import looker_sdk, segment.analytics"
    done = subprocess.run([python, "-c", check], capture_output=True, text=True, check=False, timeout=120)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"{python} cannot import looker_sdk and segment.analytics ({last})"
    return None


class Bench:
    """The stand-ins, the work folder and the child runs of one benchmark."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.airflow_home = work / "airflow-home"
        self.airflow_home.mkdir(exist_ok=True)
        shm = Path("/dev/shm")
        self.body_dir = Path(tempfile.mkdtemp(prefix="lsg-bench-", dir=shm if shm.is_dir() else None))
        self.looker: StandInProcess = looker_standin(self.logs)
        latencies = sorted({0.0, *args.latencies})
        #: One Segment stand-in per round trip; the one of 0 ms serves the sizes and the ceilings.
        self.segments: dict[float, StandInProcess] = {ms: segment_standin(self.logs, ms) for ms in latencies}
        self.segment = self.segments[0.0]
        self.clients: dict[float, SegmentStandInClient] = {}
        self.records: list[RunRecord] = []
        self.latency_records: list[RunRecord] = []
        self.pacing_records: list[RunRecord] = []
        self.ceilings: list[RunRecord] = []
        self.seq = 0

    @contextmanager
    def standins(self) -> Iterator[None]:
        """Run the stand-ins for the duration of the block; remove the stored bodies afterwards."""
        try:
            with ExitStack() as running:
                running.enter_context(self.looker)
                for latency, segment in self.segments.items():
                    running.enter_context(segment)
                    self.clients[latency] = SegmentStandInClient(segment.base_url)
                yield
        finally:
            shutil.rmtree(self.body_dir, ignore_errors=True)

    # -- child runs -----------------------------------------------------------------------------------

    def _env(self, case: Case | None, latency: float = 0.0, events_per_second: float = 0.0) -> dict[str, str]:
        env = _clean_env()
        if case is not None and case.name == "ours":
            looker = {
                "conn_type": "looker",
                "host": self.looker.base_url,
                "login": LOOKER_CLIENT_ID,
                "password": LOOKER_CLIENT_SECRET,
            }
            segment: dict[str, Any] = {
                "conn_type": "segment_tracking",
                "host": self.segments[latency].base_url,
                "password": SEGMENT_WRITE_KEY,
            }
            if events_per_second:
                segment["extra"] = {"events_per_second": events_per_second}
            env["AIRFLOW_HOME"] = str(self.airflow_home)
            env["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
            # The delivery's flow line (parsed by delivery_flow) is a DEBUG line of the Segment hook.
            env["AIRFLOW__LOGGING__NAMESPACE_LEVELS"] = f"{SEGMENT_HOOK_LOGGER}=DEBUG"
            env["AIRFLOW_CONN_LOOKER_DEFAULT"] = json.dumps(looker)
            env["AIRFLOW_CONN_SEGMENT_DEFAULT"] = json.dumps(segment)
        return env

    def _config(self, case: Case, rows: int, latency: float = 0.0) -> dict[str, Any]:
        look_id = str(GENERATED_LOOK_BASE + rows)
        config: dict[str, Any] = {"look_id": look_id, "run_id": f"bench__{uuid.uuid4().hex[:12]}"}
        if case.baseline:
            config.update(
                looker_url=self.looker.base_url,
                client_id=LOOKER_CLIENT_ID,
                client_secret=LOOKER_CLIENT_SECRET,
                segment_url=self.segments[latency].base_url,
                write_key=SEGMENT_WRITE_KEY,
            )
        if case.name == "floor":
            config["body_path"] = str(self.body_path(rows))
        config.update(case.config)
        return config

    def body_path(self, rows: int) -> Path:
        """Where the body of the Look of ``rows`` rows is stored for the floor (on a RAM file system)."""
        return self.body_dir / f"look-{rows}.json"

    def spawn(
        self, python: str, script: str, config: dict[str, Any], env: dict[str, str], stem: str
    ) -> tuple[dict[str, Any], float]:
        """Run one child; return what it printed and the seconds from spawning it to its exit."""
        self.seq += 1
        out_path = self.logs / f"{self.seq:03d}-{stem}.out"
        err_path = self.logs / f"{self.seq:03d}-{stem}.err"
        command = [python, str(BENCH_DIR / script), json.dumps(config)]
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            started = time.perf_counter()
            try:
                done = subprocess.run(
                    command, stdout=out, stderr=err, env=env, cwd=self.work, timeout=self.args.timeout
                )
            except subprocess.TimeoutExpired:
                raise BenchError(f"{stem}: no result after {self.args.timeout:g} s; see {err_path}") from None
            wall = time.perf_counter() - started
        printed = out_path.read_text(encoding="utf-8", errors="replace")
        results = [
            line[len(RESULT_PREFIX) :] for line in printed.splitlines() if line.startswith(RESULT_PREFIX)
        ]
        if done.returncode != 0 or not results:
            tail = "\n".join(err_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
            raise BenchError(f"{stem} exited with {done.returncode} and printed no result:\n{tail}")
        result = json.loads(results[-1])
        flow = delivery_flow(printed + err_path.read_text(encoding="utf-8", errors="replace"))
        if flow:
            result["delivery_flow"] = flow
        return result, wall

    def measure(
        self, case: Case, rows: int, repeat: int, *, latency: float = 0.0, events_per_second: float = 0.0
    ) -> RunRecord:
        """
        Run a case once, with the stand-ins' CPU and the Segment stand-in's counters around it.

        :param latency: the round trip of the Segment stand-in to send to.
        :param events_per_second: the pacing of ours (the Segment connection's extra), 0 for none.
        """
        python = self.args.baseline_python if case.baseline else sys.executable
        config = self._config(case, rows, latency)
        env = self._env(case, latency, events_per_second)
        record = self._run(
            case.name, rows, repeat, python, case.script, config, case, env, latency, bool(events_per_second)
        )
        record.events_per_second = events_per_second
        return record

    def _run(
        self,
        name: str,
        rows: int,
        repeat: int,
        python: str,
        script: str,
        config: dict[str, Any],
        case: Case | None,
        env: dict[str, str] | None = None,
        latency: float = 0.0,
        arrivals: bool = False,
    ) -> RunRecord:
        client, segment = self.clients[latency], self.segments[latency]
        client.reset()
        looker_cpu, segment_cpu = process_cpu_seconds(self.looker.pid), process_cpu_seconds(segment.pid)
        stem = f"{name}-{rows}" + (f"-{latency:g}ms" if latency else "")
        result, wall = self.spawn(python, script, config, env or self._env(case), stem)
        looker_cpu = process_cpu_seconds(self.looker.pid) - looker_cpu
        segment_cpu = process_cpu_seconds(segment.pid) - segment_cpu
        stats = client.stats()
        if case is None or case.network:
            received, rejected = int(stats["events"]), int(stats["rejected_events"])
        else:
            received, rejected = int(result["sent"]), int(result.get("rejected", 0))
        record = RunRecord(name, rows, repeat, wall, result, received, rejected, looker_cpu, segment_cpu)
        record.latency_ms = latency
        record.peak_in_flight = int(stats.get("max_concurrent_requests", 0))
        if arrivals and stats["requests"]:
            accepted = [r for r in client.records(ids=False) if r.accepted]
            if accepted:
                record.arrivals = {
                    "first": accepted[0].arrived,
                    "last": accepted[-1].arrived,
                    "first_events": accepted[0].events,
                    "last_events": accepted[-1].events,
                    "requests": len(accepted),
                }
        return record

    def ceiling(self, kind: str, rows: int) -> RunRecord:
        """
        Measure a stand-in's ceiling at this size: ``looker`` downloads the Look's body (and stores it for the
        floor), ``segment`` posts our batches made from the stored body.
        """
        config: dict[str, Any] = {
            "look_id": str(GENERATED_LOOK_BASE + rows),
            "body_path": str(self.body_path(rows)),
        }
        if kind == "looker":
            script = "case_fetch.py"
            config.update(
                looker_url=self.looker.base_url,
                client_id=LOOKER_CLIENT_ID,
                client_secret=LOOKER_CLIENT_SECRET,
            )
        else:
            script = "case_post.py"
            config.update(events=rows, segment_url=self.segment.base_url, write_key=SEGMENT_WRITE_KEY)
        record = self._run(f"ceiling-{kind}", rows, 0, sys.executable, script, config, None)
        if kind == "looker":
            record.received = rows  # rows served (nothing goes to Segment)
        return record

    def profile_floor(self, rows: int) -> list[dict[str, Any]]:
        """cProfile the floor at this size (body stored); the functions with the most own time."""
        config = {**self._config(CASES["floor"], rows), "profile": True}
        result, _wall = self.spawn(
            sys.executable, "case_floor.py", config, _clean_env(), f"profile-floor-{rows}"
        )
        return list(result.get("profile", []))
