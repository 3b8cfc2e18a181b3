"""
Smoke run of the benchmark (``bench/run.py``), so that its machinery cannot rot: ours and the floor at
10,000 rows, one run each, through the real stand-ins and child processes; ours again at Segment round trips
of 0, 50 and 200 ms (a Segment stand-in per round trip) and paced at 20,000 events per second. The baseline
is asked for with a venv that does not exist, so it must be skipped with a note. Only sanity is asserted,
never a timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "bench" / "run.py"
ROWS = 10_000
SCALE_ROWS = 20_000


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """Run the benchmark once; return its JSON results and its Markdown report."""
    out = tmp_path_factory.mktemp("bench")
    command = [
        sys.executable,
        str(RUN),
        "--sizes",
        str(ROWS),
        "--repeat",
        "1",
        "--cases",
        "ours,baseline-a,floor",
        "--baseline-python",
        str(out / "no-such-venv" / "bin" / "python"),
        "--results",
        str(out / "RESULTS.md"),
        "--json",
        str(out / "results.json"),
        "--notes",
        "-",
        "--timeout",
        "240",
        "--scale-sizes",
        str(SCALE_ROWS),
        "--scale-old-ref",
        "",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), (out / "RESULTS.md").read_text()


def _runs(results: dict, case: str, rows: int) -> list[dict]:
    return [record for record in results["records"] if record["case"] == case and record["rows"] == rows]


@pytest.mark.parametrize("case", ["ours", "floor"])
def test_every_event_arrives_once(smoke, case):
    results, _markdown = smoke
    (run,) = _runs(results, case, ROWS)
    assert run["result"]["rows"] == ROWS
    assert run["result"]["sent"] == ROWS
    assert run["received"] == ROWS  # ours: counted by the Segment stand-in; the floor: events batched
    assert run["rows"] - run["received"] == 0
    assert run["standin_rejected"] == 0
    assert run["result"]["rejected"] == 0 and run["result"]["failed"] == 0
    assert 1 <= run["result"]["batches"] <= ROWS // 100  # events are batched, not sent one by one


@pytest.mark.parametrize("case", ["ours", "floor"])
def test_measurements_are_sane(smoke, case):
    results, _markdown = smoke
    (run,) = _runs(results, case, ROWS)
    measured = run["result"]
    assert measured["peak_rss_mb"] > 0
    assert measured["peak_rss_mb"] >= measured["rss_before_pipeline_mb"] > 0
    assert measured["pipeline"]["wall"] > 0 and measured["pipeline"]["cpu"] > 0
    assert run["process_wall"] >= measured["pipeline"]["wall"]
    assert measured["cpu_total"] >= measured["pipeline"]["cpu"]


def test_ours_delivered_through_the_stand_ins(smoke):
    results, _markdown = smoke
    (run,) = _runs(results, "ours", ROWS)
    assert run["result"]["requests"] >= run["result"]["batches"] >= 1
    assert run["segment_cpu"] + run["looker_cpu"] > 0  # the stand-ins' own CPU is measured, apart from ours


def test_fixed_start_up_cost_measured_on_an_empty_look(smoke):
    results, markdown = smoke
    for case in ("ours", "floor"):
        (run,) = _runs(results, case, 0)
        assert run["received"] == 0 and run["result"]["rows"] == 0
        assert run["result"]["import"]["wall"] > 0
    assert "## Fixed start-up cost" in markdown


def test_baseline_skipped_with_a_note_when_its_venv_is_missing(smoke):
    results, markdown = smoke
    assert results["cases"] == ["ours", "floor"]
    assert not [record for record in results["records"] if record["case"].startswith("baseline")]
    assert any("Skipped baseline-a" in note and "no baseline venv" in note for note in results["notes"])
    assert "Skipped baseline-a" in markdown


@pytest.mark.parametrize("latency", [0.0, 50.0, 200.0])
def test_ours_at_each_round_trip_delivers_everything(smoke, latency):
    results, _markdown = smoke
    (run,) = [r for r in results["latency_records"] if r["case"] == "ours" and r["latency_ms"] == latency]
    assert run["rows"] == ROWS == run["received"] == run["result"]["sent"]
    assert run["result"]["failed"] == 0 and run["standin_rejected"] == 0
    assert run["peak_in_flight"] >= 1  # the stand-in of this round trip served it
    flow = run["result"]["delivery_flow"]  # what the SegmentHook logged about its window
    assert flow["cap"] == 32 and 1 <= flow["peak"] <= 32 and flow["waited_s"] >= 0


def test_the_pacing_check_delivers_everything_through_the_connection_extra(smoke):
    results, markdown = smoke
    (run,) = results["pacing_records"]
    assert (run["events_per_second"], run["rows"], run["received"]) == (20_000, ROWS, ROWS)
    arrivals = run["arrivals"]
    assert arrivals["requests"] == run["result"]["requests"] and arrivals["last"] >= arrivals["first"]
    assert "## Pacing: `events_per_second`" in markdown and "| 20,000 | 10,000 | 1 | 10,000 | 0 |" in markdown


def test_the_bytes_drill_links_cost_are_measured(smoke):
    results, markdown = smoke
    look_1, generated = results["drill_links"]
    assert (look_1["look_id"], generated["rows"]) == ("1", 10_000)
    assert all(0 < figure["without_links"] < figure["with_links"] for figure in (look_1, generated))
    assert "## Drill links: `generate_drill_links=false`" in markdown


def test_report_has_the_tables(smoke):
    results, markdown = smoke
    assert "| Rows | Run | rows/s |" in markdown
    assert "ours ÷ floor" in markdown
    assert "## Segment's round trip" in markdown and "| 200 ms |" in markdown
    assert f"| {ROWS:,} | ours: " in markdown
    assert results["machine"]["cores"] == os.cpu_count()
    assert results["versions"]["main"]["airflow-provider-looker-segment"] != "-"
    assert {ceiling["case"] for ceiling in results["ceilings"]} == {"ceiling-looker", "ceiling-segment"}
    assert results["profile"]["rows"] == ROWS and results["profile"]["functions"]


def test_the_scale_section_runs_every_kind_of_run(smoke):
    """All mode and changed runs 1 (everyone new), 2 (nothing) and 3 (1 % changed, 1 % replaced: 1 % of exit
    calls too); each with its own memory and CPU figures; the section is in the report."""
    results, markdown = smoke
    runs = {record["run"]: record for record in results["scale"]}
    assert set(runs) == {"all", "changed 1", "changed 2", "changed 3"}
    assert runs["all"]["sent"] == runs["changed 1"]["sent"] == SCALE_ROWS
    assert runs["changed 2"]["sent"] == 0 and runs["changed 2"]["unchanged"] == SCALE_ROWS
    changed3 = runs["changed 3"]
    assert (changed3["changed"], changed3["new"], changed3["departed"]) == (200, 200, 200)
    assert changed3["sent"] == 600
    assert all(run["peak_rss_mb"] > 0 and run["cpu_us_per_row"] > 0 for run in runs.values())
    assert "## Scale: memory flat in the cohort's size" in markdown
