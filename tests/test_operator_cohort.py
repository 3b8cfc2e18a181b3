"""
What changed-only syncs guarantee (docs/changed-only.md's section of that name), through real Airflow
(``dag.test()``) against the Looker and Segment stand-ins: a tripped guard sends nothing on any try, an entry
or exit reaches a journey tool once, a state that cannot be saved says so, templated values keep one state, a
lead that gets a user id stays the same member, a run that lost its lease stops, a state file of another
layout is refused and rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from standins.connections import segment_connection, standin_connections
from standins.demo import read_return_value
from standins.looker_fixtures import FixtureField, FixtureLook
from standins.looker_standin import LookerStandIn
from standins.segment_standin import DEFAULT_WRITE_KEY, Faults, SegmentStandIn

from airflow_provider_looker_segment import sync_run, sync_state
from airflow_provider_looker_segment.values import anonymous_id_from_email

DAG_FILE = Path(__file__).resolve().parent / "dag_files" / "lsg_operator_test.py"
LOOK_ID = "610"
_UID = FixtureField("users.id", "Users ID", "ID", tags=("user_id",))
_EMAIL = FixtureField("users.email", "Users Email", "Email", tags=("email",))
_PLAN = FixtureField("users.plan", "Users Plan", "Plan")
_BIO = FixtureField("users.bio", "Users Bio", "Bio")
JOURNEY = {"membership_trait": "in_vip", "entered_event": "Entered VIP", "exited_event": "Left VIP"}


@pytest.fixture(scope="module")
def looker():
    with LookerStandIn() as standin:
        yield standin


@pytest.fixture
def segment():
    with SegmentStandIn(record="full") as standin:
        yield standin


def _load_dag() -> Any:
    spec = importlib.util.spec_from_file_location("lsg_operator_test", DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dag


@pytest.fixture
def run(airflow_db, monkeypatch, looker, segment, tmp_path):
    """Run the test DAG in changed mode on Look 610 with a state under tmp_path; (dag run, summary)."""
    for name, value in standin_connections(looker.base_url, segment.base_url).items():
        monkeypatch.setenv(name, value)

    def _run(**conf: Any) -> tuple[Any, dict[str, Any] | None]:
        conf = {"look_id": LOOK_ID, "sync_mode": "changed", "state_path": str(tmp_path / "state"), **conf}
        dag_run = _load_dag().test(run_conf=conf)
        return dag_run, read_return_value(dag_run, "sync")

    return _run


def _look(looker: LookerStandIn, rows: list[tuple[str | None, str]], *, bio: int = 0) -> None:
    """(Re)define Look 610: one row per (user id or None, plan); the email is derived from the number."""
    fields = (_UID, _EMAIL, _PLAN, *((_BIO,) if bio else ()))
    data = []
    for number, (uid, plan) in enumerate(rows):
        row = {"users.id": uid, "users.email": f"{uid or f'lead{number}'}@example.com", "users.plan": plan}
        if bio:
            row["users.bio"] = "x" * bio
        data.append(row)
    looker.add_look(FixtureLook(LOOK_ID, "VIP", "toastmates", "users", fields, tuple(data)))


def _events(segment: SegmentStandIn, name: str) -> list[dict[str, Any]]:
    return [event for event in segment.events() if event.get("event") == name]


# ------------------------------------------------------------------------------------------- 1. the guard


def test_a_replaced_cohort_sends_nothing_on_any_try(run, looker, segment, capfd):
    """A broken join: the 100 members gone, 100 others in their place. Before: 'Entered' to the 100
    newcomers on the first try, 'Left' to the whole real cohort on the retry, and a green task. The guard
    fails the task at once (no retry fixes a broken Look); a second DAG run on the same broken Look (or the
    task cleared by hand) trips it alike, since the first left the state as it was."""
    _look(looker, [(f"u{n}", "vip") for n in range(100)])
    dag_run, _summary = run(**JOURNEY)
    assert dag_run.state == "success" and len(_events(segment, "Entered VIP")) == 100
    segment.reset()
    _look(looker, [(f"u{n}", "vip") for n in range(100, 200)])
    for _attempt in range(2):
        dag_run, _summary = run(**JOURNEY)
        ti = dag_run.get_task_instance("sync")
        assert dag_run.state == "failed" and ti.try_number == 1  # failed at once, retries unused
        assert segment.stats()["requests"] == 0  # no identify, no entry, no exit: nothing at all
    text = "".join(capfd.readouterr())
    assert text.count("100 of the 100 identities of the previous run (100%)") >= 2
    assert "nothing was sent and the state was not changed (100 new" in text
    _look(looker, [(f"u{n}", "vip") for n in range(100)])  # the join is fixed: nothing happened
    dag_run, summary = run(**JOURNEY)
    assert dag_run.state == "success" and summary["sent"] == 0 and summary["unchanged"] == 100


# ------------------------------------------------------------------- 2. each entry and exit once


def _split_batches(segment: SegmentStandIn) -> list[list[str]]:
    return [list(record.message_ids or ()) for record in segment.records()]


def test_an_entry_split_from_its_call_reaches_the_journey_once(run, looker, segment, monkeypatch, capfd):
    """Rows of ~15.7 KB: a batch ends between the 16th identity's call and its entry event. Segment refuses
    the first batch (HTTP 400: the task fails at once); the next DAG run sends the first 15 identities'
    calls and entry events again, the entry events under the same messageIds, and only the call of the
    16th, whose entry event was accepted."""
    _look(looker, [(f"u{n}", "vip") for n in range(40)], bio=15_500)
    # One request in flight, so that the first request Segment receives is the first batch formed (with
    # several in flight, a later batch may arrive first and be the one refused).
    connection = json.loads(segment_connection(segment.base_url))
    monkeypatch.setenv(
        "AIRFLOW_CONN_SEGMENT_DEFAULT", json.dumps({**connection, "extra": json.dumps({"max_in_flight": 1})})
    )
    segment.set_faults(Faults(script=["400"]))  # the first request of the run
    dag_run, _summary = run(**JOURNEY)
    assert "up to 1 requests in flight" in "".join(capfd.readouterr())
    first, second = _split_batches(segment)[:2]
    assert first[-1].split("-")[1] == "lsg" and second[0].split("-")[1] == "entered"  # the split is there
    assert dag_run.state == "failed" and dag_run.get_task_instance("sync").try_number == 1
    refused = {mid for mid in first if mid.split("-")[1] == "entered"}
    after_first = {event["messageId"] for event in _events(segment, "Entered VIP")}
    assert len(refused) == 15 and len(after_first) == 40 - 15 and not refused & after_first
    dag_run, _summary = run(**JOURNEY)  # the next DAG run
    assert dag_run.state == "success" and dag_run.get_task_instance("sync").try_number == 1
    accepted = Counter(event["messageId"] for event in segment.events())
    entries = _events(segment, "Entered VIP")
    assert sorted(event["userId"] for event in entries) == sorted(f"u{n}" for n in range(40))
    assert all(accepted[event["messageId"]] == 1 for event in entries)  # never sent twice
    calls = Counter(event["userId"] for event in segment.events() if event["type"] == "identify")
    assert set(calls) == {f"u{n}" for n in range(40)} and set(calls.values()) == {1}
    # The first run's refused entry events carried the messageIds the next run sent.
    assert refused <= set(accepted)
    segment.reset()
    dag_run, summary = run(**JOURNEY)
    assert summary["sent"] == 0 and summary["pending"] == 0


# ------------------------------------------------------------------- 3. a state that cannot be saved


class FullDiskFileSystem(MemoryFileSystem):
    """A store that refuses to write new state files (a full disk, an expired credential)."""

    protocol = "lsgfull"
    store: dict[str, Any] = {}
    pseudo_dirs = [""]
    refuse = True

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        if isinstance(path, str) and path.startswith("lsgfull://"):
            path = path[len("lsgfull://") :]
        return super()._strip_protocol(path)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if self.refuse and "w" in mode and ".state.tmp-" in path:
            raise OSError(28, "No space left on device")
        return super()._open(path, mode, **kwargs)


@pytest.mark.filterwarnings("ignore:UPath 'lsgfull' filesystem not explicitly implemented")
def test_a_state_that_cannot_be_saved_says_so_and_the_next_run_repeats_no_journey(
    run, looker, segment, monkeypatch, capfd
):
    from airflow.sdk.io import attach

    fsspec.register_implementation("lsgfull", FullDiskFileSystem, clobber=True)
    attach(protocol="lsgfull", fs=FullDiskFileSystem())
    monkeypatch.setattr(sync_state, "DEFAULT_SAVE_RETRY_DELAYS", (0.01, 0.01))
    state_path = f"lsgfull://states/{os.urandom(4).hex()}"
    _look(looker, [(f"u{n}", "vip") for n in range(5)])
    FullDiskFileSystem.refuse = True
    try:
        dag_run, _summary = run(**JOURNEY, state_path=state_path)
    finally:
        FullDiskFileSystem.refuse = False
    text = "".join(capfd.readouterr())
    assert dag_run.state == "failed"
    assert "The calls were delivered to Segment, but the state of sync" in text
    assert "(3 attempts; last error: OSError: [Errno 28] No space left on device)" in text
    assert "carry the same messageIds" in text and state_path.split("://")[1] in text
    assert dag_run.get_task_instance("sync").try_number == 3  # retried: the storage may heal
    entries = {event["messageId"] for event in _events(segment, "Entered VIP")}
    assert len(entries) == 5  # every try sent them under the same messageIds
    dag_run, summary = run(**JOURNEY, state_path=state_path)  # the store works again
    assert dag_run.state == "success" and summary["new"] == 5
    assert {event["messageId"] for event in _events(segment, "Entered VIP")} == entries
    assert "delivered its calls but could not save the state" in "".join(capfd.readouterr())
    dag_run, summary = run(**JOURNEY, state_path=state_path)
    assert summary["sent"] == 0


# ------------------------------------------------------------------- 4. templated values, state_key


def test_a_templated_track_event_keeps_one_state(run, looker, segment, tmp_path):
    _look(looker, [(f"u{n}", "vip") for n in range(4)])
    common = {"call": "track", "membership_trait": "in_vip", "entered_event": "Entered VIP"}
    _dag_run, first = run(event="Active 2026-12-06", **common)
    segment.reset()
    _dag_run, second = run(event="Active 2026-12-07", **common)
    assert (first["new"], second["new"], second["unchanged"], second["sent"]) == (4, 0, 4, 0)
    assert _events(segment, "Entered VIP") == []
    assert len([p for p in (tmp_path / "state").iterdir() if p.suffix == ".state"]) == 1
    _dag_run, own = run(event="Active 2026-12-07", state_key="vip-2026-12", **common)
    assert own["new"] == 4  # a state of its own, as asked
    names = sorted(p.name for p in (tmp_path / "state").iterdir() if p.suffix == ".state")
    assert len(names) == 2 and any(name.startswith("vip-2026-12-127.0.0.1") for name in names)


def test_the_state_of_an_earlier_version_keyed_by_the_event_is_adopted(run, looker, segment, tmp_path):
    _look(looker, [(f"u{n}", "vip") for n in range(3)])
    _dag_run, first = run(call="track", event="In VIP")
    assert first["new"] == 3
    (state,) = [p for p in (tmp_path / "state").iterdir() if p.suffix == ".state"]
    legacy = sync_state.legacy_sync_keys(
        LOOK_ID, segment.base_url, DEFAULT_WRITE_KEY, call="track", event="In VIP"
    )
    assert legacy and legacy[0] != state.stem
    with closing(sqlite3.connect(state)) as db:  # as 0.x wrote it: the event's key, inside and out
        db.execute("UPDATE meta SET value = ? WHERE key = 'sync_key'", (legacy[0],))
        db.commit()
    state.rename(state.with_name(f"{legacy[0]}.state"))
    segment.reset()
    _dag_run, second = run(call="track", event="In VIP")
    assert (second["unchanged"], second["sent"]) == (3, 0)


def test_a_state_key_that_cannot_name_a_file_is_refused(run, looker, segment, capfd):
    _look(looker, [("u0", "vip")])
    dag_run, _summary = run(state_key="../vip")
    assert dag_run.state == "failed" and segment.stats()["requests"] == 0
    assert "state_key '../vip' cannot name a state file" in "".join(capfd.readouterr())


def test_a_state_path_that_is_half_a_url_is_refused(run, looker, segment, capfd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _look(looker, [("u0", "vip")])
    dag_run, _summary = run(state_path="file:rel")
    assert dag_run.state == "failed" and not (tmp_path / "file:rel").exists()
    assert "state_path 'file:rel' looks like a URL without '//'" in "".join(capfd.readouterr())


# ------------------------------------------------------------------- 5. an identity switch


def test_a_lead_that_gets_a_user_id_stays_the_same_member(run, looker, segment):
    _look(looker, [(None, "vip"), ("u1", "vip")])  # lead0@example.com has no user id yet
    run(**JOURNEY)
    derived = anonymous_id_from_email("lead0@example.com")
    assert [e["anonymousId"] for e in _events(segment, "Entered VIP") if "anonymousId" in e] == [derived]
    segment.reset()
    looker.add_look(
        FixtureLook(
            LOOK_ID,
            "VIP",
            "toastmates",
            "users",
            (_UID, _EMAIL, _PLAN),
            (
                {"users.id": "u0", "users.email": "lead0@example.com", "users.plan": "vip"},
                {"users.id": "u1", "users.email": "u1@example.com", "users.plan": "vip"},
            ),
        )
    )
    dag_run, summary = run(**JOURNEY)
    assert dag_run.state == "success"
    assert [(e["type"], e.get("userId"), e.get("anonymousId")) for e in segment.events()] == [
        ("identify", "u0", derived)
    ]
    assert (summary["switched"], summary["new"], summary["departed"], summary["exited"]) == (1, 0, 0, 0)
    segment.reset()
    dag_run, summary = run(**JOURNEY)
    assert summary["sent"] == 0 and summary["unchanged"] == 2


# ------------------------------------------------------------------- 6. a run that lost its lease


_FROZEN_RUN = textwrap.dedent(
    """
    import importlib.util, json, sys
    from datetime import timedelta
    from airflow_provider_looker_segment import sync_run

    sync_run.DEFAULT_LOCK_STALE_AFTER = timedelta(seconds=2)  # renewed every 0.67 s
    spec = importlib.util.spec_from_file_location("lsg_operator_test", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag_run = module.dag.test(run_conf=json.loads(sys.argv[2]))
    print("DAG RUN", dag_run.state, flush=True)
    """
)


def test_a_run_frozen_past_its_lease_stops_sending_and_fails(run, looker, segment, tmp_path):
    """A long pause (SIGSTOP, as a suspended VM) lets another run take the lock: the frozen run, once it
    resumes, stops sending and fails saying so; it saves nothing."""
    rows = 40_000
    _look(looker, [(f"u{n}", "vip") for n in range(rows)], bio=1_500)
    segment.set_faults(Faults(delay=0.25))
    state_path = tmp_path / "state"
    conf = {"look_id": LOOK_ID, "sync_mode": "changed", "state_path": str(state_path), "dry_run": False}
    frozen = subprocess.Popen(
        [sys.executable, "-c", _FROZEN_RUN, str(DAG_FILE), json.dumps(conf)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 300
        while segment.stats()["requests"] < 2:  # delivery has started
            assert frozen.poll() is None and time.monotonic() < deadline, "the run never started sending"
            time.sleep(0.05)
        os.kill(frozen.pid, signal.SIGSTOP)
        received_before = len(segment.message_ids())
        time.sleep(3)  # past its 2 s lease
        (lock,) = state_path.glob("*.lock")
        store = sync_run.CohortStateStore(f"file://{state_path}", lock.stem, lock_stale_after=2)
        with store.begin("another-run"):  # takes the stale lock over and holds it
            os.kill(frozen.pid, signal.SIGCONT)
            output, _ = frozen.communicate(timeout=300)
    finally:
        if frozen.poll() is None:
            os.kill(frozen.pid, signal.SIGCONT)
            frozen.kill()
    assert "DAG RUN failed" in output
    assert "this run lost its lock: another run took it over" in output
    assert "This run lost the lock of its sync while it ran" in output and "SyncStateLockLostError" in output
    received = len(segment.message_ids())
    print(f"\nfrozen run: {received_before:,} events before the freeze, {received:,} in all of {rows:,}")
    assert received < rows  # it stopped before the end
    assert not list(state_path.glob("*.state"))  # nothing saved by the frozen run


# ------------------------------------------------------------------- 7. a state file of another layout


LAYOUTS = {
    "a table missing": ("DROP TABLE identities", "it has no table 'identities'"),
    "a column of another type": (
        "CREATE TABLE x AS SELECT * FROM meta; DROP TABLE meta; CREATE TABLE meta (key TEXT PRIMARY KEY, "
        "value NOT NULL, extra INTEGER); INSERT INTO meta (key, value) SELECT * FROM x; DROP TABLE x",
        "its table 'meta' has the columns (key TEXT, value ANY, extra INTEGER)",
    ),
    "an extra column": (
        "ALTER TABLE identities ADD COLUMN note TEXT",
        "its table 'identities' has the columns (ihash INTEGER, digest INTEGER, kind INTEGER, identity BLOB, "
        "note TEXT)",
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_state_of_another_layout_is_refused_then_rebuilt(run, looker, segment, tmp_path, capfd, layout):
    _look(looker, [(f"u{n}", "vip") for n in range(3)])
    run()
    (state,) = (tmp_path / "state").glob("*.state")
    statements, problem = LAYOUTS[layout]
    with closing(sqlite3.connect(state)) as db:
        db.executescript(statements)
        db.commit()
    segment.reset()
    dag_run, _summary = run()
    text = "".join(capfd.readouterr())
    assert dag_run.state == "failed" and segment.stats()["requests"] == 0
    assert dag_run.get_task_instance("sync").try_number == 1  # no retry: it needs full_refresh=True
    assert f"The sync state file {state}" in text.replace("file://", "") and problem in text
    assert "full_refresh=True" in text
    assert not list((tmp_path / "state").glob("*.lock"))  # never a lock left behind
    dag_run, summary = run(full_refresh=True)
    assert dag_run.state == "success" and summary["new"] == 3
    kept = list((tmp_path / "state").glob("*.state.unreadable-*"))
    assert len(kept) == 1
    dag_run, summary = run()
    assert summary["sent"] == 0 and not list((tmp_path / "state").glob("*.lock"))
