"""
The benchmark's report: medians of the runs, ratios, fixed start-up cost, the stand-ins' ceilings, the
issue's targets, the machine and the versions, rendered as Markdown (``bench/RESULTS.md``). The sections on
Segment's round trip and pacing are in ``report_delivery.py``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from drill_links import lines as drill_link_lines
from environment import MAIN_PACKAGES, baseline_versions, machine_info, package_versions
from report_delivery import delivery_targets, latency_lines, pacing_lines
from report_format import num as _num
from report_format import ratio as _ratio
from report_format import table as _table
from scale import render as render_scale

#: Issue 14's targets for the row path (on a 2-core machine, 1 M rows on loopback); the delivery part's
#: targets are in ``report_delivery.py``.
TARGET_SPEEDUP_VS_BASELINE_A = 8.0
TARGET_SHARE_OF_FLOOR = 0.85
#: The floor at least 1.5x the floor before issue 14 (152,000 rows/s at 1 M rows).
TARGET_FLOOR_ROWS_PER_S = 1.5 * 152_000
TARGET_PIPELINE_RSS_MB = 100.0
TARGET_RSS_GROWTH_MB = 30.0


@dataclass
class Report:
    """
    Everything the benchmark measured, as JSON-serialisable data.

    :param sizes: the row counts.
    :param cases: the cases run.
    :param labels: case name → label.
    :param records: every measured run (``RunRecord`` as dicts), start-up runs (N = 0) included.
    :param ceilings: the stand-ins' ceiling runs.
    :param notes: what was skipped or reduced, and why.
    :param repeat: runs per case and size.
    :param seconds: how long the benchmark took.
    :param command: the command line.
    :param baseline_python: the baseline venv's python, when the baseline ran.
    :param profile: the floor's cProfile: ``{"rows": N, "functions": [...]}`` (empty when not profiled).
    :param latency_records: the runs at each Segment round trip.
    :param pacing_records: the runs of the pacing check.
    :param latencies: the round trips measured, in ms.
    :param pace: the events per second of the pacing check (0: none).
    :param drill_links: the bytes of results with and without drill links (``drill_links.measure``).
    :param scale: the scale section's runs (``scale.measure``).
    :param date: when the report was made (UTC).
    :param machine: cores, memory, CPU model, OS, Python.
    :param versions: package versions, main venv and baseline venv.
    """

    sizes: list[int]
    cases: list[str]
    labels: dict[str, str]
    records: list[dict[str, Any]]
    ceilings: list[dict[str, Any]]
    notes: list[str]
    repeat: int
    seconds: float
    command: str
    baseline_python: str | None = None
    profile: dict[str, Any] = field(default_factory=dict)
    latency_records: list[dict[str, Any]] = field(default_factory=list)
    pacing_records: list[dict[str, Any]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    pace: float = 0.0
    drill_links: list[dict[str, Any]] = field(default_factory=list)
    scale: list[dict[str, Any]] = field(default_factory=list)
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    machine: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """A report read back from its JSON (``--render-only``)."""
        return cls(**data)

    def __post_init__(self) -> None:
        if not self.machine:
            self.machine = machine_info()
        if not self.versions:
            self.versions = {"main": package_versions(MAIN_PACKAGES)}
            if self.baseline_python:
                self.versions["baseline"] = baseline_versions(self.baseline_python)


# -- aggregation --------------------------------------------------------------------------------------


@dataclass
class Summary:
    """The medians of one case at one size (events: the worst run)."""

    case: str
    rows: int
    runs: int
    pipeline_wall: float
    cpu: float
    cpu_total: float
    process_wall: float
    import_wall: float
    import_cpu: float
    peak_rss: float
    rss_before: float
    rss_growth: float
    received: int
    lost: int
    looker_cpu: float
    segment_cpu: float
    dropped_by_client: int
    gc_seconds: float

    @property
    def rows_per_s(self) -> float | None:
        """Rows per second of the pipeline (after imports)."""
        return self.rows / self.pipeline_wall if self.rows and self.pipeline_wall > 0 else None


def summarize(records: list[dict[str, Any]]) -> dict[tuple[str, int], Summary]:
    """Group the runs by case and size; medians of every figure, the worst run for events."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["case"], record["rows"]), []).append(record)

    def med(runs: list[dict[str, Any]], pick: Any) -> float:
        return statistics.median(pick(run) for run in runs)

    summaries = {}
    for (case, rows), runs in groups.items():
        summaries[case, rows] = Summary(
            case=case,
            rows=rows,
            runs=len(runs),
            pipeline_wall=med(runs, lambda r: r["result"]["pipeline"]["wall"]),
            cpu=med(runs, lambda r: r["result"]["pipeline"]["cpu"]),
            cpu_total=med(runs, lambda r: r["result"]["cpu_total"]),
            process_wall=med(runs, lambda r: r["process_wall"]),
            import_wall=med(runs, lambda r: r["result"]["import"]["wall"]),
            import_cpu=med(runs, lambda r: r["result"]["import"]["cpu"]),
            peak_rss=med(runs, lambda r: r["result"]["peak_rss_mb"]),
            rss_before=med(runs, lambda r: r["result"]["rss_before_pipeline_mb"]),
            rss_growth=med(
                runs, lambda r: r["result"]["peak_rss_mb"] - r["result"]["rss_before_pipeline_mb"]
            ),
            received=min(run["received"] for run in runs),
            lost=max(run["rows"] - run["received"] for run in runs),
            looker_cpu=med(runs, lambda r: r["looker_cpu"]),
            segment_cpu=med(runs, lambda r: r["segment_cpu"]),
            dropped_by_client=max(int(run["result"].get("dropped_by_client", 0)) for run in runs),
            gc_seconds=med(runs, lambda r: r["result"].get("gc_seconds", 0.0)),
        )
    return summaries


def _startup_of(case: str) -> str:
    """The case whose N = 0 run gives this case's fixed cost (baseline B is baseline A at N = 0)."""
    return "baseline-a" if case == "baseline-b" else case


def marginal_cpu_us(summaries: dict[tuple[str, int], Summary], case: str, rows: int) -> float | None:
    """CPU µs per row beyond the fixed set-up: (CPU(N) - CPU(0)) / N; ``None`` without an N = 0 run."""
    run, start = summaries.get((case, rows)), summaries.get((_startup_of(case), 0))
    if run is None or start is None or not rows:
        return None
    return (run.cpu - start.cpu) / rows * 1e6


# -- rendering ----------------------------------------------------------------------------------------


def render_markdown(report: Report, closing_note: str = "") -> str:
    """The report as Markdown, ``closing_note`` (Markdown, e.g. ``bench/NOTES.md``) at its end."""
    summaries = summarize(report.records)
    lines = [
        "# Benchmark: Look → Segment throughput and memory",
        "",
        f"Generated by `make bench` (`{report.command}`) on {report.date}, in {report.seconds / 60:.1f} "
        f"min. Median of {report.repeat} runs per figure unless a note says otherwise; events received and "
        "lost are those of the worst run.",
        "",
        *_machine_lines(report),
        "",
        "## Results",
        "",
        *_results_table(report, summaries),
        "",
        *_ratio_lines(report, summaries),
        *latency_lines(report, summaries),
        *pacing_lines(report),
        *drill_link_lines(report.drill_links),
        *([render_scale(report.scale), ""] if report.scale else []),
        *_startup_lines(report, summaries),
        *_ceiling_lines(report),
        *_target_lines(report, summaries),
        *_profile_lines(report),
        *_method_lines(report),
    ]
    if report.notes:
        lines += ["", "## Notes", "", *[f"- {note}" for note in report.notes]]
    if closing_note.strip():
        lines += ["", closing_note.strip()]
    return "\n".join(lines).rstrip() + "\n"


def _machine_lines(report: Report) -> list[str]:
    machine = report.machine
    main = report.versions.get("main", {})
    base = report.versions.get("baseline", {})
    backends = {r["result"]["ijson_backend"] for r in report.records if r["result"].get("ijson_backend")}
    backend = f" (ijson backend: {', '.join(sorted(backends))})" if backends else ""
    lines = [
        f"**Machine:** {machine.get('cores')} cores ({machine.get('cpu', 'unknown CPU')}), "
        f"{machine.get('memory_gib', '?')} GiB memory, {machine.get('os')}, Python {machine.get('python')}.",
        "",
        "**Versions:** " + ", ".join(f"{name} {version}" for name, version in main.items()) + f"{backend}.",
    ]
    if base:
        lines += [
            "",
            "**Baseline venv (`bench/.venv`):** "
            + ", ".join(f"{name} {version}" for name, version in base.items())
            + ".",
        ]
    return lines


def _results_table(report: Report, summaries: dict[tuple[str, int], Summary]) -> list[str]:
    header = [
        "Rows",
        "Run",
        "rows/s",
        "pipeline s",
        "CPU s",
        "CPU µs/row",
        "GC s",
        "peak RSS MB",
        "RSS growth MB",
        "events received",
        "lost",
        "stand-ins CPU s (Looker + Segment)",
    ]
    rows = []
    for size in report.sizes:
        for case in report.cases:
            s = summaries.get((case, size))
            if s is None:
                continue
            per_row = marginal_cpu_us(summaries, case, size)
            lost = f"{s.lost:,}" + (
                f" (dropped by the client: {s.dropped_by_client:,})" if s.dropped_by_client else ""
            )
            standins = "-" if case == "floor" else f"{s.looker_cpu:.1f} + {s.segment_cpu:.1f}"
            rows.append(
                [
                    f"{size:,}",
                    report.labels.get(case, case)
                    + (f" ({s.runs} run{'s' if s.runs > 1 else ''})" if s.runs != report.repeat else ""),
                    _num(s.rows_per_s),
                    _num(s.pipeline_wall, 2),
                    _num(s.cpu, 2),
                    _num(per_row if per_row is not None else s.cpu / size * 1e6, 1),
                    _num(s.gc_seconds, 2),
                    _num(s.peak_rss),
                    _num(s.rss_growth),
                    f"{s.received:,}",
                    lost,
                    standins,
                ]
            )
    legend = [
        "",
        "- **rows/s**: N ÷ pipeline seconds. The pipeline is everything after the imports: for ours, "
        "building the operator, reading the connections, logging in to Looker, reading the Look, "
        "streaming, transforming and delivering it; for the baseline, logging in, `run_look`, "
        "`json.loads`, one `identify` per row and `flush()`; for the floor, parsing, transforming and "
        "batching the stored body.",
        "- **CPU s**: user + system CPU of the measured process during the pipeline, all threads. **CPU "
        "µs/row**: (CPU at N - CPU at N = 0) ÷ N, the per-row cost without the fixed set-up. **GC s**: of "
        "the pipeline's wall time, how much Python's garbage collector took (measured with `gc.callbacks`).",
        "- **peak RSS**: `VmHWM` of the measured process (imports included). **RSS growth**: peak RSS "
        "minus the RSS after the imports, i.e. what the pipeline itself added.",
        "- **events received**: counted by the Segment stand-in (for the floor: events put into batches); "
        "**lost** = N - received.",
        "- **stand-ins CPU s**: CPU used by the Looker and the Segment stand-in processes during the run.",
    ]
    return _table(header, rows) + legend


def _ratio_lines(report: Report, summaries: dict[tuple[str, int], Summary]) -> list[str]:
    if "ours" not in report.cases or not ({"baseline-a", "floor"} & set(report.cases)):
        return []
    header = [
        "Rows",
        "ours ÷ baseline A (rows/s)",
        "ours ÷ floor (rows/s)",
        "floor ÷ baseline A (rows/s): the most ours ÷ A could be",
        "baseline A CPU ÷ ours CPU",
        "peak RSS: ours / baseline A MB",
    ]
    rows = []
    for size in report.sizes:
        ours, base, floor = (summaries.get((case, size)) for case in ("ours", "baseline-a", "floor"))
        if ours is None:
            continue
        rows.append(
            [
                f"{size:,}",
                _ratio(ours.rows_per_s, base.rows_per_s if base else None),
                _ratio(ours.rows_per_s, floor.rows_per_s if floor else None, 2),
                _ratio(floor.rows_per_s if floor else None, base.rows_per_s if base else None),
                _ratio(base.cpu if base else None, ours.cpu),
                f"{ours.peak_rss:,.0f} / {base.peak_rss:,.0f}" if base else "-",
            ]
        )
    return ["## Ratios", "", *_table(header, rows), ""]


def _startup_lines(report: Report, summaries: dict[tuple[str, int], Summary]) -> list[str]:
    cases = [case for case in report.cases if (case, 0) in summaries]
    if not cases:
        return []
    header = [
        "Run",
        "process wall s",
        "imports s",
        "imports CPU s",
        "set-up s (pipeline at N = 0)",
        "process CPU s",
        "peak RSS MB",
    ]
    rows = []
    for case in cases:
        s = summaries[case, 0]
        label = report.labels.get(case, case).split(":")[0]
        rows.append(
            [
                label,
                _num(s.process_wall, 2),
                _num(s.import_wall, 2),
                _num(s.import_cpu, 2),
                _num(s.pipeline_wall, 3),
                _num(s.cpu_total, 2),
                _num(s.peak_rss),
            ]
        )
    return [
        "## Fixed start-up cost (a Look of 0 rows)",
        "",
        *_table(header, rows),
        "",
        "Process wall is from spawning the interpreter to its exit. For ours, the imports are the "
        "operator's module with Airflow's task SDK; the set-up is building the operator, reading both "
        "connections, logging in to Looker, reading the Look and running it (empty), and the (empty) "
        "delivery. The per-row cost is the rest: see CPU µs/row above.",
        "",
    ]


def _ceiling_lines(report: Report) -> list[str]:
    by_size: dict[int, dict[str, dict[str, Any]]] = {}
    for record in report.ceilings:
        by_size.setdefault(record["rows"], {})[record["case"]] = record
    if not by_size:
        return []
    rows = []
    for size in sorted(by_size):
        looker = by_size[size].get("ceiling-looker")
        segment = by_size[size].get("ceiling-segment")
        rows.append(
            [
                f"{size:,}",
                _num(looker["rows"] / looker["result"]["pipeline"]["wall"]) if looker else "-",
                _num(looker["looker_cpu"], 1) if looker else "-",
                _num(segment["received"] / segment["result"]["pipeline"]["wall"]) if segment else "-",
                _num(segment["segment_cpu"], 1) if segment else "-",
            ]
        )
    header = [
        "Rows",
        "Looker stand-in: rows/s served",
        "its CPU s",
        "Segment stand-in: events/s taken",
        "its CPU s",
    ]
    return [
        "## The stand-ins' own ceilings (one run per size)",
        "",
        *_table(header, rows),
        "",
        "Looker: the `json_detail` body downloaded with `requests` (read in 128 KB pieces, no parsing). "
        "Segment: batches built by our code, posted from 4 threads (the hook's initial window) "
        "with `requests`. A pipeline cannot be faster than either; each stand-in is one Python process, so "
        "about 1 CPU second per second is its limit.",
        "",
    ]


def _target_lines(report: Report, summaries: dict[tuple[str, int], Summary]) -> list[str]:
    if "ours" not in report.cases:
        return []
    sizes = [size for size in report.sizes if ("ours", size) in summaries]
    if not sizes:
        return []
    rows = _row_path_targets(report, summaries, sizes) + delivery_targets(report, summaries)
    return [
        "## The issue's targets (issue 14)",
        "",
        *_table(["Target", "Measured", ""], rows),
        "",
        "The row-path targets are measured on loopback (0 ms) at the largest size; the delivery targets in "
        "the sections on Segment's round trip and on pacing above.",
        "",
    ]


def _row_path_targets(
    report: Report, summaries: dict[tuple[str, int], Summary], sizes: list[int]
) -> list[list[str]]:
    largest = max(sizes)
    ours = summaries["ours", largest]
    rows = []
    base = summaries.get(("baseline-a", largest))
    if base is not None and ours.rows_per_s and base.rows_per_s:
        speedup = ours.rows_per_s / base.rows_per_s
        rows.append(
            [
                f"row path: ours ≥ {TARGET_SPEEDUP_VS_BASELINE_A:g}x baseline A in rows/s ({largest:,} rows)",
                f"{speedup:,.1f}x",
                _verdict(speedup >= TARGET_SPEEDUP_VS_BASELINE_A),
            ]
        )
    floor = summaries.get(("floor", largest))
    if floor is not None and ours.rows_per_s and floor.rows_per_s:
        share = ours.rows_per_s / floor.rows_per_s
        rows.append(
            [
                f"row path: ours ≥ {TARGET_SHARE_OF_FLOOR:.0%} of the floor in rows/s ({largest:,} rows)",
                f"{share:.0%}",
                _verdict(share >= TARGET_SHARE_OF_FLOOR),
            ]
        )
        if largest >= 1_000_000:
            rows.append(
                [
                    f"row path: the floor ≥ {TARGET_FLOOR_ROWS_PER_S:,.0f} rows/s, 1.5x 152,000 ({largest:,} "
                    "rows)",
                    f"{floor.rows_per_s:,.0f} rows/s",
                    _verdict(floor.rows_per_s >= TARGET_FLOOR_ROWS_PER_S),
                ]
            )
    rows.append(
        [
            f"memory: ours at most {TARGET_PIPELINE_RSS_MB:g} MB peak RSS for the pipeline alone "
            f"({largest:,} rows)",
            f"{ours.rss_growth:,.0f} MB above the {ours.rss_before:,.0f} MB after imports (peak "
            f"{ours.peak_rss:,.0f} MB)",
            _verdict(ours.rss_growth <= TARGET_PIPELINE_RSS_MB),
        ]
    )
    smaller = [size for size in sizes if size < largest]
    if smaller:
        mid = summaries["ours", max(smaller)]
        growth = ours.peak_rss - mid.peak_rss
        rows.append(
            [
                f"memory: ours at most {TARGET_RSS_GROWTH_MB:g} MB more peak RSS from {mid.rows:,} to "
                f"{largest:,} rows",
                f"{growth:+,.0f} MB",
                _verdict(growth <= TARGET_RSS_GROWTH_MB),
            ]
        )
    lost = max(summaries["ours", size].lost for size in sizes)
    rows.append(["ours: 0 events lost (every size, 0 ms)", f"{lost:,} lost at worst", _verdict(lost == 0)])
    return rows


def _profile_lines(report: Report) -> list[str]:
    functions = report.profile.get("functions") if report.profile else None
    if not functions:
        return []
    total = sum(function["own_s"] for function in functions)
    rows = [
        [
            f"`{function['function']}`",
            f"{function['calls']:,}",
            f"{function['own_s']:.3f}",
            f"{function['cumulative_s']:.3f}",
        ]
        for function in functions
    ]
    return [
        f"## Where the floor's CPU goes (cProfile, {report.profile['rows']:,} rows, one run)",
        "",
        *_table(["Function", "calls", "own s", "cumulative s"], rows),
        "",
        f"The {len(functions)} functions with the most own time ({total:.2f} s together; cProfile slows "
        "Python calls, so compare the lines with each other, not with the timings above). Time spent in C "
        "code called from a Python function without its own entry (msgspec decoding a chunk of rows, dict "
        "and string building) counts as that function's own time.",
        "",
    ]


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _method_lines(report: Report) -> list[str]:
    return [
        "## How it was measured",
        "",
        "- Looks: generated Looks of the Looker stand-in (Look id 1000000 + N: user id, email, name, plan, "
        "sessions count), served by `python -m standins.looker_standin`; "
        "receiver: the Segment stand-in (`segment_standin --record count --latency-ms N`, write key "
        "`demo-write-key`; one per round trip measured, the one of 0 ms for the sizes); each stand-in in its "
        "own process.",
        "- Every measurement is a fresh child process started by a small launcher (`bench/run.py`); the "
        "child reads its own wall time, CPU time (`getrusage(RUSAGE_SELF)`, all threads) and peak RSS "
        "(`VmHWM` of `/proc/self/status`: `ru_maxrss` would be inherited across fork + exec) and prints "
        "them as JSON. Runs are interleaved (every case, then the next repeat); one unmeasured warm-up run "
        "comes first.",
        "- **ours** (`bench/case_ours.py`): `LookerToSegmentOperator(task_id=..., "
        "look_id=...).execute(context)` with a minimal context (a `ti` with dag_id, task_id, run_id, "
        "map_index; no `outlet_events`), not `dag.test()`; default arguments (adaptive window up to 32 "
        "requests in flight, no gzip, no pacing except in the pacing check); connections from "
        "`AIRFLOW_CONN_LOOKER_DEFAULT` / `AIRFLOW_CONN_SEGMENT_DEFAULT`; a throw-away `AIRFLOW_HOME`.",
        "- **baseline A / B** (`bench/case_baseline.py`, in `bench/.venv`, pinned in "
        "`bench/requirements.txt`): "
        'looker_sdk `run_look(look_id, result_format="json", limit=-1)` (settings from an `ApiSettings` '
        "subclass whose `read_config()` returns strings), `json.loads`, `analytics.identify(user_id, "
        "traits)` per row with the same trait keys as ours, then `analytics.flush()`; A with "
        "`max_queue_size` = N + 1,000, B with the library's defaults (queue of 10,000, 1 consumer thread, "
        "batches of 100).",
        "- **floor** (`bench/case_floor.py`): the `json_detail` body fetched once before timing into a "
        "file on `/dev/shm` (RAM), parsed by the LookerHook's `LookStream` (rows by msgspec, the head by "
        "ijson), `plan_transform` + "
        "`make_row_transformer` with the operator's defaults, `Batcher().split` and `Batch.body` as the "
        "SegmentHook does; nothing sent.",
    ]
