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
(cProfile) to show where our CPU time goes.

Segment's round trip: on loopback the Segment stand-in answers in microseconds, real Segment in 50-200 ms.
Ours and baseline A are measured again against Segment stand-ins that hold every answer ``--latencies``
milliseconds (default 0, 50 and 200; one stand-in process each), interleaved, ``--latency-repeat`` times
(default 5, each repeat starting at another round trip), ours at ``--latency-rows``
(default: the largest size), baseline A at ``--baseline-latency-rows`` (default 10,000: it sends one request
of 100 events at a time, so 10,000 rows already take 20 s at 200 ms). Pacing: ours with the Segment
connection's extra ``events_per_second`` = ``--pace`` (default 20,000) on ``--pace-rows`` rows (default
200,000, at most the largest size); the rate achieved is read from the stand-in's arrival times.

Scale (``scale.py``): all mode and changed-only runs 1 (all new), 2 (nothing sent) and 3 (1 % changed, 1 %
replaced) at ``--scale-sizes`` (default 1 M and 3 M; 10 M with ``--scale-sizes 1000000,3000000,10000000``,
about half an hour more), each in a fresh process: memory against the cohort's size, and all mode against
the package before issue 23 (``--scale-old-ref``).

Drill links: the ``json_detail`` bytes of Look 1 and of a generated Look of ``--drill-rows`` rows (default
10,000), with Looker's default drill links and with ``generate_drill_links=false`` (``drill_links.py``).

The Markdown report is printed and written to ``bench/RESULTS.md`` (with a hand-written closing note
appended when ``--notes`` names one); every run's figures go to ``bench/out/results.json``, from which
``--render-only`` rebuilds the report. The child runs and the stand-ins are in ``harness.py``.

Usage: ``python bench/run.py [--sizes 10000,100000] [--repeat 3] [--cases ours,floor] ...`` (``--help``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(1, str(BENCH_DIR.parent / "tests"))  # the stand-ins (tests/standins)

import drill_links  # noqa: E402
import scale  # noqa: E402
from harness import CASES, STARTUP_CASES, Bench, BenchError, Case, RunRecord, baseline_problem  # noqa: E402
from report import Report, render_markdown  # noqa: E402

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
DEFAULT_BASELINE_PYTHON = BENCH_DIR / ".venv" / "bin" / "python"
DEFAULT_RESULTS = BENCH_DIR / "RESULTS.md"
DEFAULT_JSON = BENCH_DIR / "out" / "results.json"
#: Sizes from which the baseline cases are repeated ``--large-repeat`` times.
LARGE_SIZE = 1_000_000
#: The floor is profiled at the largest size up to this one (cProfile doubles its time).
PROFILE_MAX_ROWS = 100_000
#: Segment round trips measured, in milliseconds.
DEFAULT_LATENCIES = (0.0, 50.0, 200.0)
#: Runs per case and round trip: the ratio between round trips is the figure that matters, so a few more.
DEFAULT_LATENCY_REPEAT = 5
#: Rows of baseline A at each round trip (at most the rows of ours).
DEFAULT_BASELINE_LATENCY_ROWS = 10_000
#: The pacing check: events per second, on this many rows (at most the largest size).
DEFAULT_PACE = 20_000.0
DEFAULT_PACE_ROWS = 200_000
#: Cases measured at every round trip.
LATENCY_CASES = ("ours", "baseline-a")


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
    parser.add_argument(
        "--latencies",
        default=",".join(f"{ms:g}" for ms in DEFAULT_LATENCIES),
        help="Segment round trips to measure ours and baseline A at, in ms (default 0,50,200; '' for none)",
    )
    parser.add_argument(
        "--latency-rows",
        type=int,
        default=None,
        help="rows of ours at each round trip (default: the largest size)",
    )
    parser.add_argument(
        "--latency-repeat",
        type=int,
        default=None,
        help=f"runs per case and round trip, median kept (default {DEFAULT_LATENCY_REPEAT} with --repeat 3 "
        "or more, else --repeat)",
    )
    parser.add_argument(
        "--baseline-latency-rows",
        type=int,
        default=DEFAULT_BASELINE_LATENCY_ROWS,
        help=f"rows of baseline A at each round trip (default {DEFAULT_BASELINE_LATENCY_ROWS:,}, at most "
        "--latency-rows)",
    )
    parser.add_argument(
        "--pace",
        type=float,
        default=DEFAULT_PACE,
        help=f"events per second of the pacing check (default {DEFAULT_PACE:,.0f}; 0 for none)",
    )
    parser.add_argument(
        "--pace-rows",
        type=int,
        default=None,
        help=f"rows of the pacing check (default {DEFAULT_PACE_ROWS:,}, at most the largest size)",
    )
    parser.add_argument(
        "--scale-sizes",
        default=",".join(str(n) for n in scale.DEFAULT_SIZES),
        help="row counts of the scale section (default 1000000,3000000; '' for none)",
    )
    parser.add_argument(
        "--scale-old-ref",
        default=scale.DEFAULT_OLD_REF,
        help="git revision of the package all mode is compared with in the scale section ('' for none)",
    )
    parser.add_argument(
        "--drill-rows",
        type=int,
        default=drill_links.DEFAULT_ROWS,
        help=f"rows of the generated Look whose bytes with and without drill links are measured (default "
        f"{drill_links.DEFAULT_ROWS:,}; 0 for none)",
    )
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
    try:
        args.latencies = [float(part) for part in args.latencies.split(",") if part.strip()]
    except ValueError:
        parser.error("--latencies takes comma-separated milliseconds, e.g. 0,50,200")
    if any(not 0 <= ms < 60_000 for ms in args.latencies):
        parser.error("--latencies must be between 0 and 60,000 ms")
    largest = max(args.sizes)
    if args.latency_repeat is None:
        full = args.repeat >= 3  # a full run: a few more repeats; a short one (--repeat 1) stays short
        args.latency_repeat = max(args.repeat, DEFAULT_LATENCY_REPEAT) if full else args.repeat
    args.latency_rows = args.latency_rows or largest
    args.baseline_latency_rows = min(args.baseline_latency_rows, args.latency_rows)
    args.pace_rows = args.pace_rows or min(DEFAULT_PACE_ROWS, largest)
    if args.latency_repeat < 1:
        parser.error("--latency-repeat must be at least 1")
    if args.latency_rows < 1 or args.baseline_latency_rows < 1 or args.pace_rows < 1 or args.pace < 0:
        parser.error("--latency-rows, --baseline-latency-rows and --pace-rows must be positive, --pace >= 0")
    return args


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _describe(record: RunRecord) -> str:
    pipeline = record.result["pipeline"]
    rate = f"{record.rows / pipeline['wall']:>9,.0f} rows/s" if record.rows and pipeline["wall"] else ""
    setting = f" {record.latency_ms:g} ms" if record.latency_ms else ""
    setting += f" paced {record.events_per_second:,.0f}/s" if record.events_per_second else ""
    return (
        f"{record.case:<11}{setting} N={record.rows:>9,} #{record.repeat + 1}: {rate:>16}  pipeline "
        f"{pipeline['wall']:6.2f} s  CPU {pipeline['cpu']:6.2f} s  peak RSS "
        f"{record.result['peak_rss_mb']:4.0f} MB  received {record.received:>9,}  lost {record.lost:,}  "
        f"in flight <= {record.peak_in_flight}"
    )


def measure_delivery(bench: Bench, cases: list[Case]) -> None:
    """
    Ours and baseline A at each Segment round trip (interleaved: every round trip and case, then the next
    repeat), then ours paced at ``--pace`` events per second.
    """
    args = bench.args
    measured = [case for case in cases if case.name in LATENCY_CASES]
    latencies = list(args.latencies)
    for repeat in range(args.latency_repeat if latencies else 0):
        shift = repeat % len(latencies)  # each repeat starts at another round trip: drift hits all alike
        for latency in latencies[shift:] + latencies[:shift]:
            for case in measured:
                rows = args.latency_rows if case.name == "ours" else args.baseline_latency_rows
                bench.latency_records.append(bench.measure(case, rows, repeat, latency=latency))
                _log(_describe(bench.latency_records[-1]))
    if args.pace and any(case.name == "ours" for case in cases):
        for repeat in range(args.repeat):
            record = bench.measure(CASES["ours"], args.pace_rows, repeat, events_per_second=args.pace)
            bench.pacing_records.append(record)
            _log(_describe(record))


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
        measure_delivery(bench, cases)
        drill = drill_links.measure(bench.looker.base_url, args.drill_rows) if args.drill_rows > 0 else []
        for figure in drill:
            with_links, without = figure["with_links"], figure["without_links"]
            _log(f"drill links: Look {figure['look_id']}: {with_links:,} B, {without:,} B without")
        scale_sizes = tuple(int(n) for n in args.scale_sizes.split(",") if n.strip())
        scale_records = (
            scale.measure(bench, scale_sizes, 1, args.scale_old_ref or None) if scale_sizes else []
        )
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
        latency_records=[asdict(record) for record in bench.latency_records],
        pacing_records=[asdict(record) for record in bench.pacing_records],
        latencies=list(args.latencies),
        pace=args.pace,
        notes=notes,
        repeat=args.repeat,
        seconds=time.monotonic() - started,
        command=" ".join(["python", "bench/run.py", *sys.argv[1:]]),
        baseline_python=args.baseline_python if any(case.baseline for case in cases) else None,
        profile=profile,
        drill_links=drill,
        scale=scale_records,
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
