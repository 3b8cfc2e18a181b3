"""
The task log of a sync as a user reads it (``dag.test()`` against the stand-ins): one INFO line per phase,
warnings only for what needs action, no looker_sdk request lines, the Look's web URL once, numbers with
thousands separators, and progress lines while the Look is read (dry runs included).
"""

from __future__ import annotations

import logging
import re

import pytest
from standins.looker_fixtures import GENERATED_LOOK_BASE, FixtureField, FixtureLook
from test_operator import looker, run, segment  # noqa: F401  (fixtures)

#: A task log line of dag.test(): ``<time> [<level>] <message> [<logger>] loc=...``.
LINE = re.compile(r"^\S+ \[(?P<level>\w+)\s*\] (?P<message>.*?)\s+\[(?P<logger>[\w.]+)\]")
#: The provider's loggers (the operator's and the hooks').
OURS = "airflow_provider_looker_segment."
ROWS = ({"users.id": "u1", "accounts.name": "Toastmates Inc."}, {"users.id": "u2", "accounts.name": "Acme"})
#: Progress lines (their number depends on how long a phase lasts).
PROGRESS = re.compile(
    r"rows read, sending to Segment|events delivered, \d|waiting for Looker's answer|dry run, nothing sent"
    r"|to compare with the sync state"
)


def provider_lines(text: str) -> list[tuple[str, str]]:
    """``(level, message)`` of the provider's lines in a task's output."""
    found = []
    for line in text.splitlines():
        match = LINE.match(line)
        if match and OURS in match["logger"]:
            found.append((match["level"], match["message"]))
    return found


def test_a_clean_run_logs_one_info_line_per_phase(run, looker, segment, capfd, caplog):
    # 1,000 rows: within Segment's 1,000 events per second per workspace even unpaced (more in one second
    # is worth a warning: Segment would queue the excess).
    look_id = str(GENERATED_LOOK_BASE + 1_000)
    dag_run, _ti, summary = run(look_id=look_id)
    assert dag_run.state == "success" and summary["sent"] == 1_000
    lines = provider_lines("".join(capfd.readouterr()))
    assert [level for level, _message in lines if level != "info"] == []  # nothing to act on: no warning
    phases = [message for _level, message in lines if not PROGRESS.search(message)]
    url = f"{looker.base_url}/looks/{look_id}"
    assert len(phases) == 5, phases
    running, plan, sending, pace, done = phases
    assert running.startswith(f"Running Look {look_id} (") and running.endswith(f"in Looker: {url}")
    assert plan.startswith(f"Look {look_id}: each row becomes one of Segment's identify calls; ")
    assert "userId from field users.id (tag user_id)" in plan and "'users.plan': 'plan'" in plan
    assert plan.endswith(
        "each identify overwrites these traits in downstream tools that already have them: "
        "email, name, plan, sessions count"
    )
    assert sending.startswith(f"Sending to {segment.base_url}/v1/batch: up to 32 requests in flight")
    assert re.fullmatch(
        r"Segment delivery pace: 1,000 events accepted in [\d.]+ s: [\d,]+ events/s sustained, at most "
        r"[\d,]+ in one second\.",
        pace,
    ), pace
    assert done.startswith(f"Look {look_id}: 1,000 rows read, 1,000 sent, 0 invalid, 0 rejected, 0 failed, ")
    assert done.endswith("; events handed to Segment per call type: identify 1,000")
    assert sum(message.count(url) for _level, message in lines) == 1  # the web URL, once
    # looker_sdk's own line per request (POST(.../login), GET(...), DELETE(.../logout)) is not logged.
    sdk = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("looker_sdk") and r.levelno < logging.WARNING
    ]
    assert sdk == []


def test_warnings_are_kept_for_what_needs_action(run, looker, capfd):
    # The account's name would land in the user's reserved trait 'name': worth a warning.
    uid = FixtureField("users.id", "Users ID", "ID", tags=("user_id",))
    account = FixtureField("accounts.name", "Accounts Name", "Name")
    looker.add_look(FixtureLook("700", "Users and accounts", "toastmates", "users", (uid, account), ROWS))
    dag_run, _ti, _summary = run(look_id="700")
    assert dag_run.state == "success"
    warnings = [
        message for level, message in provider_lines("".join(capfd.readouterr())) if level == "warning"
    ]
    assert len(warnings) == 1 and "Segment's reserved trait 'name'" in warnings[0], warnings


def test_delivery_details_are_logged_when_events_were_not_delivered(run, segment, capfd):
    from standins.segment_standin import Faults

    segment.set_faults(Faults(script=["400"]))
    dag_run, _ti, _summary = run()
    assert dag_run.state == "failed"
    messages = [message for _level, message in provider_lines("".join(capfd.readouterr()))]
    assert any(m.startswith("Segment delivery done: 0 delivered, 10 rejected") for m in messages)


def _progress(text: str) -> list[str]:
    return [message for _level, message in provider_lines(text) if PROGRESS.search(message)]


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real-run"])
def test_progress_is_logged_while_the_look_is_read(run, looker, segment, capfd, dry_run):
    rows = 120_000
    look_id = str(GENERATED_LOOK_BASE + rows)
    # Mid-result, the warehouse stops sending for 3 s, six progress intervals (the test DAG's is 0.5 s).
    looker.pause_after(look_id, 100_000, 3.0)
    dag_run, _ti, summary = run(look_id=look_id, dry_run=dry_run)
    assert dag_run.state == "success" and summary["rows"] == rows
    lines = _progress("".join(capfd.readouterr()))
    rate = r"\([\d,]+ rows/s\)"
    pattern = (
        rf"Look {look_id}: [\d,]+ rows read {rate}; dry run, nothing sent"
        if dry_run
        else rf"Look {look_id}: [\d,]+ rows read, [\d,]+ events delivered, 0 rejected, 0 failed {rate}"
    )
    read = [line for line in lines if re.fullmatch(pattern, line)]
    assert read, lines
    counts = [int(re.search(r"([\d,]+) rows read", line)[1].replace(",", "")) for line in read]
    assert all(0 < count <= rows for count in counts) and counts == sorted(counts)


def test_a_changed_only_sync_reports_progress_while_it_reads_before_sending(
    run, looker, segment, capfd, tmp_path
):
    # A changed-only sync reads the whole Look into its spool before it sends anything: the lines say so.
    rows = 120_000
    look_id = str(GENERATED_LOOK_BASE + rows)
    looker.pause_after(look_id, 100_000, 3.0)  # six progress intervals while the spool is filled
    dag_run, _ti, summary = run(look_id=look_id, sync_mode="changed", state_path=str(tmp_path))
    assert dag_run.state == "success" and summary["rows"] == rows and summary["new"] == rows
    lines = _progress("".join(capfd.readouterr()))
    reading = rf"Look {look_id}: ([\d,]+) rows read \([\d,]+ rows/s\), to compare with the sync state"
    read = [re.fullmatch(reading, line) for line in lines]
    counts = [int(match[1].replace(",", "")) for match in read if match]
    assert counts and all(0 < count <= rows for count in counts) and counts == sorted(counts), lines
    # Nothing was sent while those lines were written: each comes before any line with delivery counts.
    first_delivery = next((i for i, line in enumerate(lines) if "events delivered" in line), len(lines))
    assert all(i < first_delivery for i, match in enumerate(read) if match)


def test_the_wait_for_lookers_answer_is_reported(run, looker, capfd):
    look_id = str(GENERATED_LOOK_BASE + 10)
    looker.set_delay(3.0, path_prefix=f"/api/4.0/looks/{look_id}/run")  # a slow warehouse
    try:
        dag_run, _ti, _summary = run(look_id=look_id, dry_run=True)
    finally:
        looker.clear_faults()
    assert dag_run.state == "success"
    waiting = [
        line for line in _progress("".join(capfd.readouterr())) if "waiting for Looker's answer" in line
    ]
    assert waiting and all(
        re.fullmatch(rf"Look {look_id}: waiting for Looker's answer \([\d,]+ s\)", w) for w in waiting
    )


def test_progress_lines_stop_with_the_task(run, capfd):
    import threading

    dag_run, _ti, _summary = run(dry_run=True)
    assert dag_run.state == "success"
    assert not [t for t in threading.enumerate() if t.name.startswith("lsg-progress-")]
