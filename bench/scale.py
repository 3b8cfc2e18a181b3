"""
The scale section of ``make bench``: does the worker's memory stay flat in the cohort's size, and what does a
changed-only run cost against an all-mode run?

For each size N (default 1 M and 3 M rows; ``--sizes 1000000,3000000,10000000`` adds 10 M, about half an hour
more), each run in a fresh child process (``case_ours.py``: the operator's ``execute``, the worker's own wall,
CPU and peak RSS; the stand-ins excluded), on the generated Looks of the Looker stand-in:

* ``all``: ``sync_mode="all"``, every row sent;
* ``all (before)``: the same with the package of ``--old-ref`` (default: the commit before issue 23), at the
  smallest size only, interleaved with ``all``: the issue's "not slower than today";
* ``changed 1``: ``sync_mode="changed"`` on an empty state (state on local disk): everyone new, sent;
* ``changed 2``: the same Look again: nothing sent;
* ``changed 3``: the Look's next generation (``EvolvingLook``: 1 % changed, 1 % replaced): 1 % changed, 1 %
  entered, 1 % left.

Reported per run: rows/s, CPU µs per row (the pipeline's CPU, imports excluded, over N), the peak RSS and the
pipeline's own memory (peak RSS less the RSS once the imports are done), the spool and state sizes and the
state's load and save times. Then the targets of issue 23: growth of the peak from the smallest to the
largest size (≤ 20 MB), the pipeline's own memory at the largest size (≤ 100 MB), changed 2's CPU per row
against all mode's, changed 1's rows/s at 3 M against 1 M (≥ 80 %), and all against all (before).

Usage: ``python bench/scale.py [--sizes ...] [--repeat 1] [--old-ref REF] [--json out.json]``; ``run.py``
calls :func:`measure` for its scale section.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(1, str(REPO / "tests"))

from harness import CASES, Bench  # noqa: E402
from report_format import num, ratio, table  # noqa: E402
from standins.looker_fixtures import EVOLVING_LOOK_BASE  # noqa: E402

DEFAULT_SIZES = (1_000_000, 3_000_000)
#: The package before this issue's changes (the main branch when issue 23 was taken up).
DEFAULT_OLD_REF = "d973068"


def _look(rows: int, generation: int = 0) -> str:
    return str(EVOLVING_LOOK_BASE + generation * 10**8 + rows)


def old_tree(ref: str, folder: Path) -> Path:
    """The package as it was at ``ref``, extracted into ``folder`` (read-only git use)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "airflow_provider_looker_segment"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def _child(bench: Bench, name: str, rows: int, options: dict[str, Any], look: str, path: str = "") -> dict:
    env = bench._env(CASES["ours"])
    if path:
        env["PYTHONPATH"] = path
    config = {"look_id": look, "run_id": f"scale__{name}__{rows}", "options": options}
    result, wall = bench.spawn(sys.executable, "case_ours.py", config, env, f"scale-{name}-{rows}")
    pipeline = result["pipeline"]
    return {
        "run": name,
        "rows": rows,
        "read": result["rows"],
        "sent": result["sent"],
        "failed": result["failed"],
        "wall": pipeline["wall"],
        "cpu": pipeline["cpu"],
        "rows_per_s": result["rows"] / pipeline["wall"] if pipeline["wall"] else 0.0,
        "cpu_us_per_row": pipeline["cpu"] / max(result["rows"], 1) * 1e6,
        "peak_rss_mb": result["peak_rss_mb"],
        "own_mb": result["peak_rss_mb"] - result["rss_before_pipeline_mb"],
        "process_wall": wall,
        **result.get("cohort", {}),
    }


def measure(bench: Bench, sizes: tuple[int, ...], repeat: int, old_ref: str | None) -> list[dict[str, Any]]:
    """Run the scale section (stand-ins running); return one record per child run."""
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lsg-scale-") as folder:
        old = str(old_tree(old_ref, Path(folder))) if old_ref else ""
        for rows in sizes:
            for number in range(repeat):
                if old and rows == min(sizes):  # interleaved, the order alternating
                    pair = [("all (before)", old), ("all", "")]
                    for name, path in pair if number % 2 == 0 else reversed(pair):
                        records.append(_child(bench, name, rows, {}, _look(rows), path))
                else:
                    records.append(_child(bench, "all", rows, {}, _look(rows)))
                state = Path(folder, f"state-{rows}-{number}")
                options = {
                    "sync_mode": "changed",
                    "state_path": str(state),
                    "state_key": f"scale-{rows}",  # one state for the Look's generations (other Look ids)
                    "membership_trait": "in_cohort",
                }
                for name, generation in (("changed 1", 0), ("changed 2", 0), ("changed 3", 1)):
                    records.append(_child(bench, name, rows, options, _look(rows, generation)))
    return records


def _median(values: list[float]) -> float:
    values = sorted(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def render(records: list[dict[str, Any]]) -> str:
    """The Markdown of the scale section."""
    runs = ("all (before)", "all", "changed 1", "changed 2", "changed 3")
    grouped: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for record in records:
        grouped.setdefault((record["rows"], record["run"]), []).append(record)
    rows_out = []
    medians: dict[tuple[int, str], dict[str, float]] = {}
    for (rows, run), group in sorted(grouped.items(), key=lambda item: (item[0][0], runs.index(item[0][1]))):
        m = {
            key: _median([r[key] for r in group])
            for key in ("rows_per_s", "cpu_us_per_row", "peak_rss_mb", "own_mb")
        }
        medians[(rows, run)] = m
        last = group[-1]
        rows_out.append(
            [
                num(rows),
                run,
                num(last["sent"]),
                num(m["rows_per_s"]),
                f"{m['cpu_us_per_row']:.1f}",
                f"{m['peak_rss_mb']:.0f}",
                f"{m['own_mb']:.0f}",
                num(last["spool_bytes"] / max(rows, 1)) if "spool_bytes" in last else "",
                num(last["state_bytes"] / max(last.get("state_identities") or 1, 1))
                if last.get("state_bytes")
                else "",
                f"{last['state_load_seconds']:.1f}" if "state_load_seconds" in last else "",
                f"{last['state_save_seconds']:.1f}" if "state_save_seconds" in last else "",
            ]
        )
    lines = [
        "## Scale: memory flat in the cohort's size (issue 23)",
        "",
        f"Each run a fresh child process; median of {max(len(g) for g in grouped.values())} run(s).",
        "",
        *table(
            [
                "Rows",
                "Run",
                "Sent",
                "Rows/s",
                "CPU µs/row",
                "Peak RSS MB",
                "Pipeline's own MB",
                "Spool B/row",
                "State B/identity",
                "State load s",
                "State save s",
            ],
            rows_out,
        ),
        "",
    ]
    sizes = sorted({rows for rows, _run in grouped})
    small, large = sizes[0], sizes[-1]
    targets = []
    for mode in ("all", "changed 1", "changed 2", "changed 3"):
        if (small, mode) in medians and (large, mode) in medians and large != small:
            growth = medians[(large, mode)]["peak_rss_mb"] - medians[(small, mode)]["peak_rss_mb"]
            targets.append(
                f"- {mode}: peak RSS from {num(small)} to {num(large)} rows: {growth:+.0f} MB (≤ 20)"
            )
    for mode in ("all", "changed 1", "changed 2", "changed 3"):
        if (large, mode) in medians:
            targets.append(
                f"- {mode}: the pipeline's own memory at {num(large)}: "
                f"{medians[(large, mode)]['own_mb']:.0f} MB (≤ 100)"
            )
    for rows in sizes:
        if (rows, "changed 2") in medians and (rows, "all") in medians:
            a, b = medians[(rows, "changed 2")]["cpu_us_per_row"], medians[(rows, "all")]["cpu_us_per_row"]
            targets.append(
                f"- {num(rows)}: changed 2 (nothing sent) {a:.1f} vs all {b:.1f} CPU µs/row: "
                f"{ratio(a, b, 2)} (≤ 1)"
            )
    if (1_000_000, "changed 1") in medians and (3_000_000, "changed 1") in medians:
        keep = (
            medians[(3_000_000, "changed 1")]["rows_per_s"] / medians[(1_000_000, "changed 1")]["rows_per_s"]
        )
        targets.append(f"- changed 1 at 3 M keeps {keep:.0%} of its rows/s at 1 M (≥ 80 %)")
    if (small, "all (before)") in medians and (small, "all") in medians:
        now, before = medians[(small, "all")]["rows_per_s"], medians[(small, "all (before)")]["rows_per_s"]
        targets.append(
            f"- all at {num(small)}: {num(now)} rows/s now vs {num(before)} before: "
            f"{ratio(now, before, 2)} (≥ 1)"
        )
    return "\n".join([*lines, "Targets:", "", *targets, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--old-ref", default=DEFAULT_OLD_REF, help="'' to skip the comparison")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--json")
    parser.add_argument("--render", help="render the records of an earlier --json file")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    sizes = tuple(int(size) for size in args.sizes.split(","))
    with tempfile.TemporaryDirectory(prefix="lsg-scale-work-") as work:
        bench_args = argparse.Namespace(latencies=[], timeout=args.timeout, baseline_python=sys.executable)
        bench = Bench(bench_args, Path(work))
        with bench.standins():
            records = measure(bench, sizes, args.repeat, args.old_ref or None)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    print(render(records))


if __name__ == "__main__":
    main()
