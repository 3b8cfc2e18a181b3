"""
The benchmark report's delivery sections: ours, baseline A and the floor at each Segment round trip, and the
pacing check (``bench/RESULTS.md``; the rest of the report is in ``report.py``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from report_format import num as _num
from report_format import ratio as _ratio
from report_format import table as _table

if TYPE_CHECKING:
    from report import Report, Summary

#: Ours at the largest round trip, as a share of ours at 0 ms (issue 14: at least 90 % at 200 ms).
TARGET_LATENCY_SHARE = 0.90
#: Pacing: the rate achieved within this share of the rate given.
TARGET_PACE_ERROR = 0.05


def _median(runs: list[dict[str, Any]], pick: Callable[[dict[str, Any]], float]) -> float:
    return statistics.median(pick(run) for run in runs)


class LatencyFigures:
    """
    The medians of the runs of one case at one round trip.

    :param runs: the runs (``RunRecord`` dicts) of one case, size and round trip.
    :param startup_cpu: the case's CPU seconds at N = 0 (for CPU per row), ``None`` when not measured.
    """

    def __init__(self, runs: list[dict[str, Any]], startup_cpu: float | None) -> None:
        self.runs = runs
        self.rows = runs[0]["rows"]
        self.wall = _median(runs, lambda run: run["result"]["pipeline"]["wall"])
        self.cpu = _median(runs, lambda run: run["result"]["pipeline"]["cpu"])
        self.peak_in_flight = int(_median(runs, lambda run: run.get("peak_in_flight", 0)))
        flows = [run["result"].get("delivery_flow") for run in runs]
        #: Seconds the reading thread waited for sending (the round trip not hidden), median; None if unknown.
        self.waited = statistics.median(f["waited_s"] for f in flows) if all(flows) else None
        self.round_trip_ms = statistics.median(f["round_trip_ms"] for f in flows) if all(flows) else None
        self.lost = max(run["rows"] - run["received"] for run in runs)
        self.rss_growth = _median(
            runs, lambda run: run["result"]["peak_rss_mb"] - run["result"]["rss_before_pipeline_mb"]
        )
        self.startup_cpu = startup_cpu

    @property
    def rows_per_s(self) -> float | None:
        """Rows per second of the pipeline."""
        return self.rows / self.wall if self.wall > 0 else None

    @property
    def cpu_us_per_row(self) -> float:
        """CPU µs per row beyond the fixed set-up (the N = 0 run), else the plain CPU per row."""
        return (self.cpu - (self.startup_cpu or 0.0)) / self.rows * 1e6


def latency_figures(
    report: Report, summaries: dict[tuple[str, int], Summary]
) -> dict[tuple[str, float], LatencyFigures]:
    """``(case, round trip ms)`` → the medians of its runs in the round-trip section."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for record in report.latency_records:
        groups.setdefault((record["case"], record["latency_ms"]), []).append(record)
    figures = {}
    for (case, latency), runs in groups.items():
        startup = summaries.get((case, 0))
        figures[case, latency] = LatencyFigures(runs, startup.cpu if startup else None)
    return figures


def latency_lines(report: Report, summaries: dict[tuple[str, int], Summary]) -> list[str]:
    """The section "Segment's round trip": the table, the ratios measured in the same run, the legend."""
    figures = latency_figures(report, summaries)
    if not figures:
        return []
    ours0 = figures.get(("ours", 0.0))
    ours_rows = next((f.rows for (case, _), f in figures.items() if case == "ours"), None)
    base_rows = next((f.rows for (case, _), f in figures.items() if case == "baseline-a"), None)
    floor = summaries.get(("floor", ours_rows)) if ours_rows else None
    header = [
        "Segment round trip",
        f"ours rows/s ({ours_rows:,} rows)" if ours_rows else "ours rows/s",
        "ours ÷ ours at 0 ms",
        "ours CPU µs/row",
        "ours: requests in flight (peak at the stand-in)",
        "ours: round trip measured, ms",
        "ours: reading waited for sending, s",
        f"baseline A rows/s ({base_rows:,} rows)" if base_rows else "baseline A rows/s",
        "baseline A CPU µs/row",
        "floor rows/s (no network)",
        "ours ÷ baseline A",
        "ours ÷ floor",
        "baseline A ÷ ours, CPU per row",
        "lost: ours / baseline A",
    ]
    rows = []
    for latency in report.latencies:
        ours, base = figures.get(("ours", latency)), figures.get(("baseline-a", latency))
        floor_rate = floor.rows_per_s if floor else None
        rows.append(
            [
                f"{latency:g} ms",
                _num(ours.rows_per_s) if ours else "-",
                _ratio(ours.rows_per_s, ours0.rows_per_s, 2) if ours and ours0 else "-",
                _num(ours.cpu_us_per_row, 1) if ours else "-",
                str(ours.peak_in_flight) if ours else "-",
                _num(ours.round_trip_ms) if ours else "-",
                _num(ours.waited, 2) if ours else "-",
                _num(base.rows_per_s) if base else "-",
                _num(base.cpu_us_per_row, 1) if base else "-",
                _num(floor_rate),
                _ratio(ours.rows_per_s if ours else None, base.rows_per_s if base else None),
                _ratio(ours.rows_per_s if ours else None, floor_rate, 2),
                _ratio(base.cpu_us_per_row if base else None, ours.cpu_us_per_row if ours else None),
                f"{ours.lost:,} / {base.lost:,}"
                if ours and base
                else (f"{ours.lost:,} / -" if ours else "-"),
            ]
        )
    runs = max(len(f.runs) for f in figures.values())
    return [
        "## Segment's round trip: ours, baseline A and the floor at 0, 50 and 200 ms",
        "",
        *_table(header, rows),
        "",
        f"Median of {runs} runs per figure (`--latency-repeat`; each repeat starts at another round trip).",
        "",
        "Each Segment stand-in (one process per round trip, `--latency-ms`) holds every answer that long "
        "after the request arrived, without blocking other requests (one thread per connection, Nagle "
        "off). Runs of every round trip and case are interleaved; the ratios are of "
        "figures measured in this run. **ours ÷ ours at 0 ms** is the share of its loopback throughput ours "
        "keeps. **requests in flight**: the most requests the stand-in was serving at once (the adaptive "
        "window at work; the cap is `max_in_flight`, 32 by default). **round trip measured** and **reading "
        "waited for sending**: from the SegmentHook's last log line (`Segment delivery flow: ...`): the "
        "window's moving average of accepted requests' round trips, and the seconds the thread reading "
        "Looker and forming batches spent waiting because sending was behind (0 when the round trip is "
        "fully hidden). Baseline A sends one request of 100 events at a time, so its rows/s at a round trip "
        "hardly depends on N: it runs at fewer rows to keep the benchmark short. The floor has no network: "
        "its figure is the same at every round trip. **CPU µs/row**: (CPU - CPU of the N = 0 run) ÷ N, all "
        "threads.",
        "",
    ]


def pacing_figures(report: Report) -> dict[str, Any] | None:
    """The pacing check's medians and worst deviations, ``None`` when it did not run."""
    runs = report.pacing_records
    if not runs:
        return None
    pace = runs[0]["events_per_second"]

    def at_segment(run: dict[str, Any]) -> float | None:
        arrivals = run.get("arrivals") or {}
        span = arrivals.get("last", 0.0) - arrivals.get("first", 0.0)
        return (run["received"] - arrivals.get("first_events", 0)) / span if span > 0 else None

    overall = [run["received"] / run["result"]["pipeline"]["wall"] for run in runs]
    segment = [rate for rate in map(at_segment, runs) if rate is not None]
    errors = [abs(rate / pace - 1) for rate in overall + segment]
    return {
        "pace": pace,
        "rows": runs[0]["rows"],
        "runs": len(runs),
        "wall": _median(runs, lambda run: run["result"]["pipeline"]["wall"]),
        "overall": statistics.median(overall),
        "segment": statistics.median(segment) if segment else None,
        "worst_error": max(errors),
        "lost": max(run["rows"] - run["received"] for run in runs),
        "received": min(run["received"] for run in runs),
        "requests": int(_median(runs, lambda run: run["result"].get("requests", 0))),
        "peak_in_flight": int(_median(runs, lambda run: run.get("peak_in_flight", 0))),
    }


def pacing_lines(report: Report) -> list[str]:
    """The section "Pacing"."""
    pacing = pacing_figures(report)
    if pacing is None:
        return []
    header = [
        "events_per_second",
        "rows",
        "runs",
        "events received (worst run)",
        "lost",
        "pipeline s",
        "events ÷ pipeline s",
        "at Segment: events/s between the first and last request",
        "worst deviation from the pace",
        "requests",
        "requests in flight (peak)",
    ]
    row = [
        f"{pacing['pace']:,.0f}",
        f"{pacing['rows']:,}",
        str(pacing["runs"]),
        f"{pacing['received']:,}",
        f"{pacing['lost']:,}",
        _num(pacing["wall"], 2),
        _num(pacing["overall"]),
        _num(pacing["segment"]),
        f"{pacing['worst_error']:.1%}",
        f"{pacing['requests']:,}",
        str(pacing["peak_in_flight"]),
    ]
    return [
        "## Pacing: `events_per_second`",
        "",
        *_table(header, [row]),
        "",
        "Ours with the Segment connection's extra `events_per_second` (a ceiling: batches of at most a tenth "
        "of the pace from a token bucket of one batch, a batch of N events taking N tokens; it starts empty, "
        "so a run's average is the pace). **events ÷ pipeline s** "
        "counts the whole pipeline, Looker log-in and the first batch's wait included; **at Segment**: the "
        "events after the first request ÷ the time from the first to the last request's arrival at the "
        "stand-in. The deviation is the worst of both, over the runs.",
        "",
    ]


def delivery_targets(report: Report, summaries: dict[tuple[str, int], Summary]) -> list[list[str]]:
    """Rows of the targets table for the delivery part of issue 14: [target, measured, verdict]."""
    rows = []
    figures = latency_figures(report, summaries)
    slowest = max(report.latencies, default=0.0)
    ours0, ours_slow = figures.get(("ours", 0.0)), figures.get(("ours", slowest))
    if slowest and ours0 and ours_slow and ours0.rows_per_s and ours_slow.rows_per_s:
        share = ours_slow.rows_per_s / ours0.rows_per_s
        rows.append(
            [
                f"delivery: ours at a {slowest:g} ms round trip ≥ {TARGET_LATENCY_SHARE:.0%} of ours at 0 ms "
                f"({ours0.rows:,} rows)",
                f"{share:.0%}",
                _verdict(share >= TARGET_LATENCY_SHARE),
            ]
        )
    pacing = pacing_figures(report)
    if pacing is not None:
        rows.append(
            [
                f"delivery: pacing at {pacing['pace']:,.0f} events/s holds within "
                f"{TARGET_PACE_ERROR:.0%}, nothing lost ({pacing['rows']:,} rows)",
                f"{pacing['worst_error']:.1%} off at worst, {pacing['lost']:,} lost",
                _verdict(pacing["worst_error"] <= TARGET_PACE_ERROR and pacing["lost"] == 0),
            ]
        )
    ours_runs = [run for run in report.latency_records if run["case"] == "ours"]
    if ours_runs:
        lost = max(run["rows"] - run["received"] for run in ours_runs)
        latencies = ", ".join(f"{ms:g}" for ms in report.latencies)
        rows.append(
            [
                f"delivery: ours loses 0 events at every round trip ({latencies} ms)",
                f"{lost:,} lost at worst",
                _verdict(lost == 0),
            ]
        )
    return rows


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"
