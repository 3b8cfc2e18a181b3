"""
``make bench``: Look → Segment throughput and memory, ours side by side with segment-analytics-python.

For each size N, a generated Look of N rows (Look id ``1000000 + N`` of the Looker stand-in: user id, email,
name, plan, sessions count) goes to the Segment stand-in (``--record count``); both stand-ins run in their own
processes. Each measurement runs in its own child process, which reports its wall time, CPU time (user +
sys) and peak RSS (``VmHWM``) itself; the runs are interleaved (ours, baseline A, baseline B, floor, then the
next repeat) so that a noisy machine slows them alike, and the median of the repeats is reported:

* ``ours``: ``LookerToSegmentOperator(...).execute(context)`` (``case_ours.py``);
* ``baseline-a``: segment-analytics-python with ``max_queue_size`` above N, in ``bench/.venv``
  (``case_baseline.py``);
* ``baseline-b``: the same library with its defaults (it drops events while its queue is full);
* ``floor``: the stored body parsed, transformed and batched by our code, no network (``case_floor.py``).

Runs at N = 0 give the fixed start-up cost (imports, then hook set-up on an empty Look); the stand-ins' own
ceilings are measured once per size (``case_fetch.py``, ``case_post.py``), and the floor is profiled once
(cProfile) to show where our CPU time goes. The Markdown report is printed and written to
``bench/RESULTS.md`` (with a hand-written closing note appended when ``--notes`` names one); every run's
figures go to ``bench/out/results.json``, from which ``--render-only`` rebuilds the report.

Usage: ``python bench/run.py [--sizes 10000,100000] [--repeat 3] [--cases ours,floor] ...`` (``--help``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(1, str(BENCH_DIR.parent / "tests"))  # the stand-ins (tests/standins)

from probe import RESULT_PREFIX  # noqa: E402
from report import Report, render_markdown  # noqa: E402
from standin_processes import (  # noqa: E402
    LOOKER_CLIENT_ID,
    LOOKER_CLIENT_SECRET,
    SEGMENT_WRITE_KEY,
    StandInProcess,
    looker_standin,
    process_cpu_seconds,
    segment_standin,
)
from standins.looker_fixtures import GENERATED_LOOK_BASE  # noqa: E402
from standins.segment_standin import SegmentStandInClient  # noqa: E402

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
DEFAULT_BASELINE_PYTHON = BENCH_DIR / ".venv" / "bin" / "python"
DEFAULT_RESULTS = BENCH_DIR / "RESULTS.md"
DEFAULT_JSON = BENCH_DIR / "out" / "results.json"
#: Sizes from which the baseline cases are repeated ``--large-repeat`` times.
LARGE_SIZE = 1_000_000
#: The floor is profiled at the largest size up to this one (cProfile doubles its time).
PROFILE_MAX_ROWS = 100_000


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

    @property
    def lost(self) -> int:
        """Events not received (N - received)."""
        return self.rows - self.received


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked."""
    parser = argparse.ArgumentParser(
        description="Look → Segment benchmark: ours vs segment-analytics-python."
    )
    parser.add_argument(
        "--sizes",
        default=",".join(str(n) for n in DEFAULT_SIZES),
        help="comma-separated row counts (default 10000,100000,1000000)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per case and size, median kept (3)")
    parser.add_argument(
        "--large-repeat",
        type=int,
        default=None,
        help=f"runs of the baseline cases at N >= {LARGE_SIZE:,}, about a minute each (default: --repeat)",
    )
    parser.add_argument("--cases", default=",".join(CASES), help=f"cases to run (default {','.join(CASES)})")
    parser.add_argument(
        "--baseline-python",
        default=str(DEFAULT_BASELINE_PYTHON),
        help="python of the venv with segment-analytics-python and looker-sdk (default bench/.venv, made by "
        "`make bench`); the baseline cases are skipped, with a note, when it is missing",
    )
    parser.add_argument("--no-startup", action="store_true", help="skip the N = 0 runs (fixed start-up cost)")
    parser.add_argument("--no-ceilings", action="store_true", help="skip measuring the stand-ins' ceilings")
    parser.add_argument("--no-profile", action="store_true", help="skip profiling the floor")
    parser.add_argument("--results", default=str(DEFAULT_RESULTS), help="Markdown report ('-': none)")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="JSON of every run ('-': none)")
    parser.add_argument(
        "--notes",
        default="-",
        help="a hand-written closing note (Markdown file) to append to the report, e.g. bench/NOTES.md "
        "written for this run; default none: a note written for an earlier run never follows new figures",
    )
    parser.add_argument("--render-only", metavar="JSON", help="rebuild the report from a results JSON")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per child run (1800)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the children's stdout and stderr")
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(part.replace("_", "")) for part in args.sizes.split(",") if part.strip()]
    except ValueError:
        parser.error("--sizes takes comma-separated integers, e.g. 10000,100000")
    if not args.sizes or any(n <= 0 for n in args.sizes):
        parser.error("--sizes must list positive row counts")
    args.cases = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = [name for name in args.cases if name not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    if args.large_repeat is None:
        args.large_repeat = args.repeat
    if args.repeat < 1 or args.large_repeat < 1:
        parser.error("--repeat and --large-repeat must be at least 1")
    return args


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
        self.segment: StandInProcess = segment_standin(self.logs)
        self.client: SegmentStandInClient | None = None
        self.records: list[RunRecord] = []
        self.ceilings: list[RunRecord] = []
        self.seq = 0

    @contextmanager
    def standins(self) -> Iterator[None]:
        """Run both stand-ins for the duration of the block; remove the stored bodies afterwards."""
        try:
            with self.looker, self.segment:
                self.client = SegmentStandInClient(self.segment.base_url)
                yield
        finally:
            shutil.rmtree(self.body_dir, ignore_errors=True)

    # -- child runs -----------------------------------------------------------------------------------

    def _env(self, case: Case | None) -> dict[str, str]:
        env = _clean_env()
        if case is not None and case.name == "ours":
            looker = {
                "conn_type": "looker",
                "host": self.looker.base_url,
                "login": LOOKER_CLIENT_ID,
                "password": LOOKER_CLIENT_SECRET,
            }
            segment = {
                "conn_type": "segment_tracking",
                "host": self.segment.base_url,
                "password": SEGMENT_WRITE_KEY,
            }
            env["AIRFLOW_HOME"] = str(self.airflow_home)
            env["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
            env["AIRFLOW_CONN_LOOKER_DEFAULT"] = json.dumps(looker)
            env["AIRFLOW_CONN_SEGMENT_DEFAULT"] = json.dumps(segment)
        return env

    def _config(self, case: Case, rows: int) -> dict[str, Any]:
        look_id = str(GENERATED_LOOK_BASE + rows)
        config: dict[str, Any] = {"look_id": look_id, "run_id": f"bench__{uuid.uuid4().hex[:12]}"}
        if case.baseline:
            config.update(
                looker_url=self.looker.base_url,
                client_id=LOOKER_CLIENT_ID,
                client_secret=LOOKER_CLIENT_SECRET,
                segment_url=self.segment.base_url,
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
        results = [
            line[len(RESULT_PREFIX) :]
            for line in out_path.read_text(encoding="utf-8", errors="replace").splitlines()
            if line.startswith(RESULT_PREFIX)
        ]
        if done.returncode != 0 or not results:
            tail = "\n".join(err_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
            raise BenchError(f"{stem} exited with {done.returncode} and printed no result:\n{tail}")
        return json.loads(results[-1]), wall

    def measure(self, case: Case, rows: int, repeat: int) -> RunRecord:
        """Run a case once, with the stand-ins' CPU and the Segment stand-in's counters around it."""
        python = self.args.baseline_python if case.baseline else sys.executable
        return self._run(f"{case.name}", rows, repeat, python, case.script, self._config(case, rows), case)

    def _run(
        self,
        name: str,
        rows: int,
        repeat: int,
        python: str,
        script: str,
        config: dict[str, Any],
        case: Case | None,
    ) -> RunRecord:
        assert self.client is not None
        self.client.reset()
        looker_cpu, segment_cpu = process_cpu_seconds(self.looker.pid), process_cpu_seconds(self.segment.pid)
        result, wall = self.spawn(python, script, config, self._env(case), f"{name}-{rows}")
        looker_cpu = process_cpu_seconds(self.looker.pid) - looker_cpu
        segment_cpu = process_cpu_seconds(self.segment.pid) - segment_cpu
        stats = self.client.stats()
        if case is None or case.network:
            received, rejected = int(stats["events"]), int(stats["rejected_events"])
        else:
            received, rejected = int(result["sent"]), int(result.get("rejected", 0))
        return RunRecord(name, rows, repeat, wall, result, received, rejected, looker_cpu, segment_cpu)

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


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _describe(record: RunRecord) -> str:
    pipeline = record.result["pipeline"]
    rate = f"{record.rows / pipeline['wall']:>9,.0f} rows/s" if record.rows and pipeline["wall"] else ""
    return (
        f"{record.case:<11} N={record.rows:>9,} #{record.repeat + 1}: {rate:>16}  pipeline "
        f"{pipeline['wall']:6.2f} s  CPU {pipeline['cpu']:6.2f} s  peak RSS "
        f"{record.result['peak_rss_mb']:4.0f} MB  received {record.received:>9,}  lost {record.lost:,}"
    )


def run_benchmark(args: argparse.Namespace, work: Path) -> Report:
    """Run every measurement; return the report's data."""
    cases = [CASES[name] for name in args.cases]
    notes: list[str] = []
    if any(case.baseline for case in cases):
        problem = baseline_problem(args.baseline_python)
        if problem:
            skipped = [case.name for case in cases if case.baseline]
            notes.append(f"Skipped {', '.join(skipped)}: {problem}.")
            _log(f"NOTE: skipping {', '.join(skipped)}: {problem}")
            cases = [case for case in cases if not case.baseline]
    floor = any(case.name == "floor" for case in cases)
    bench = Bench(args, work)
    started = time.monotonic()
    profile: dict[str, Any] = {}
    profile_rows = max([n for n in args.sizes if n <= PROFILE_MAX_ROWS] or [min(args.sizes)])
    with bench.standins():
        _log(
            f"stand-ins: Looker {bench.looker.base_url}, Segment {bench.segment.base_url}; work folder {work}"
        )
        for case in cases:  # one unmeasured run of each interpreter set-up: byte-code and page caches
            if case.name in ("ours", "baseline-a"):
                bench.measure(case, 0, -1)
        if not args.no_startup:
            if floor:
                bench.ceiling("looker", 0)
            for repeat in range(args.repeat):
                for case in cases:
                    if case.name in STARTUP_CASES:
                        bench.records.append(bench.measure(case, 0, repeat))
                        _log(_describe(bench.records[-1]))
        for rows in args.sizes:
            if not args.no_ceilings or floor:
                record = bench.ceiling("looker", rows)
                rate = rows / record.result["pipeline"]["wall"]
                _log(f"ceiling: the Looker stand-in serves {rate:,.0f} rows/s at N={rows:,}")
                if not args.no_ceilings:
                    bench.ceilings.append(record)
            if not args.no_ceilings:
                bench.ceilings.append(bench.ceiling("segment", rows))
                rate = bench.ceilings[-1].received / bench.ceilings[-1].result["pipeline"]["wall"]
                _log(f"ceiling: the Segment stand-in takes {rate:,.0f} events/s at N={rows:,}")
            for repeat in range(args.repeat):
                for case in cases:
                    if case.baseline and rows >= LARGE_SIZE and repeat >= args.large_repeat:
                        continue
                    bench.records.append(bench.measure(case, rows, repeat))
                    _log(_describe(bench.records[-1]))
            if floor and not args.no_profile and rows == profile_rows:
                profile = {"rows": rows, "functions": bench.profile_floor(rows)}
            bench.body_path(rows).unlink(missing_ok=True)
    large = [n for n in args.sizes if n >= LARGE_SIZE]
    if large and any(case.baseline for case in cases) and args.large_repeat < args.repeat:
        notes.append(
            f"The baseline cases ran {args.large_repeat} time(s) at N = {', '.join(f'{n:,}' for n in large)} "
            f"instead of {args.repeat} (`--large-repeat`)."
        )
    return Report(
        sizes=list(args.sizes),
        cases=[case.name for case in cases],
        labels={case.name: case.label for case in CASES.values()},
        records=[asdict(record) for record in bench.records],
        ceilings=[asdict(record) for record in bench.ceilings],
        notes=notes,
        repeat=args.repeat,
        seconds=time.monotonic() - started,
        command=" ".join(["python", "bench/run.py", *sys.argv[1:]]),
        baseline_python=args.baseline_python if any(case.baseline for case in cases) else None,
        profile=profile,
    )


def write_outputs(report: Report, args: argparse.Namespace) -> str:
    """Render the report (with the closing note), print it, write the Markdown and the JSON files."""
    notes_path = Path(args.notes) if args.notes and args.notes != "-" else None
    closing = notes_path.read_text(encoding="utf-8") if notes_path and notes_path.is_file() else ""
    markdown = render_markdown(report, closing_note=closing)
    print(markdown)
    if args.json and args.json != "-" and not args.render_only:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(report), indent=1) + "\n", encoding="utf-8")
        _log(f"wrote {path}")
    if args.results and args.results != "-":
        Path(args.results).write_text(markdown, encoding="utf-8")
        _log(f"wrote {args.results}")
    return markdown


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``make bench``; returns the exit status (1 when a run failed)."""
    args = parse_args(argv)
    if args.render_only:
        write_outputs(Report.from_dict(json.loads(Path(args.render_only).read_text(encoding="utf-8"))), args)
        return 0
    work = Path(tempfile.mkdtemp(prefix="lsg-bench-work-"))
    try:
        report = run_benchmark(args, work)
    except BenchError as exc:
        _log(f"benchmark failed: {exc}\nlogs kept in {work / 'logs'}")
        return 1
    write_outputs(report, args)
    if args.keep_logs:
        _log(f"logs kept in {work / 'logs'}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
