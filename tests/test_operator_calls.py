"""
Group and track calls, and cohort entry/exit events, through real Airflow (``dag.test()``) against the Looker
and Segment stand-ins.
"""

from __future__ import annotations

from typing import Any

from standins.looker_fixtures import ACCOUNT_USERS_LOOK_ID, ACCOUNTS_LOOK_ID, FixtureField, FixtureLook
from standins.segment_standin import Faults
from test_operator import (  # noqa: F401  (fixtures)
    SEGMENT_OUTAGE,
    _cohort,
    _message_ids_of_requests,
    changed,
    looker,
    run,
    segment,
)

from airflow_provider_looker_segment.values import anonymous_id_from_email, anonymous_id_from_group

# ------------------------------------------------------------------------------------------------ group


def test_group_calls_from_an_account_level_look(run, segment):
    dag_run, _ti, summary = run(look_id=ACCOUNTS_LOOK_ID, call="group")
    assert dag_run.state == "success"
    events = segment.events()
    assert [e["type"] for e in events] == ["group"] * 3
    first = events[0]
    assert first["groupId"] == "acct-toastmates"
    assert first["anonymousId"] == anonymous_id_from_group("acct-toastmates") and "userId" not in first
    assert first["traits"] == {"name": "Toastmates Inc.", "plan": "enterprise", "seats": 120}
    assert (summary["call"], summary["sent"], summary["invalid_reasons"]) == ("group", 3, {"no_group_id": 1})
    assert summary["identifiers"]["groupId"] == {"field": "accounts.id", "how": "tag segment_group_id"}
    assert summary["events_by_type"] == {"group": 3}


def test_group_calls_without_a_user_are_counted_and_their_cost_is_logged(run, segment, capfd):
    dag_run, _ti, summary = run(look_id=ACCOUNTS_LOOK_ID, call="group")
    assert dag_run.state == "success"
    assert summary["groups_without_user"] == 3  # each derived anonymousId is a monthly tracked user
    text = "".join(capfd.readouterr())
    assert (
        "Look 15: 3 group calls carried no user identifier but the anonymousId derived from the group id: "
        "Segment counts each anonymousId not tied to a userId as a monthly tracked user." in text
    )
    dag_run, _ti, summary = run(look_id=ACCOUNT_USERS_LOOK_ID, call="group", exclude_fields=["users.email"])
    assert summary["groups_without_user"] == 0  # every account has a user (or an email-derived id)


def test_group_calls_without_a_user_can_be_skipped_as_invalid(run, segment):
    dag_run, _ti, summary = run(look_id=ACCOUNTS_LOOK_ID, call="group", group_without_user="skip")
    assert dag_run.state == "success" and segment.stats()["requests"] == 0
    assert (summary["sent"], summary["groups_without_user"]) == (0, 0)
    assert summary["invalid_reasons"] == {"no_user_for_group": 3, "no_group_id": 1}
    assert summary["identifiers"]["anonymousId"] is None  # no id derived from the group id
    dag_run, _ti, summary = run(look_id=ACCOUNT_USERS_LOOK_ID, call="group", group_without_user="skip")
    assert summary["sent"] == 3 and summary["invalid"] == 0  # users (one by the email-derived id) stay


def test_group_without_user_is_checked_before_looker_is_read(run, looker, segment, capfd):
    runs_before = looker.counters.get("runs", 0)
    dag_run, _ti, _summary = run(group_without_user="skip")  # identify calls
    assert dag_run.state == "failed" and looker.counters.get("runs", 0) == runs_before
    dag_run, _ti, _summary = run(call="group", group_without_user="drop")
    assert dag_run.state == "failed" and looker.counters.get("runs", 0) == runs_before
    text = "".join(capfd.readouterr())
    assert "group_without_user ('skip') applies to group calls: set call='group'" in text
    assert "group_without_user must be one of anonymous_id, skip" in text


def test_account_name_and_plan_are_the_group_traits_name_and_plan(run, segment, capfd):
    dag_run, _ti, _summary = run(look_id=ACCOUNTS_LOOK_ID, call="group")
    assert dag_run.state == "success"
    assert segment.events()[0]["traits"] == {"name": "Toastmates Inc.", "plan": "enterprise", "seats": 120}
    text = "".join(capfd.readouterr())
    assert "reserved trait" not in text  # accounts.name and accounts.plan are their natural sources
    dag_run, _ti, _summary = run(look_id=ACCOUNT_USERS_LOOK_ID)  # identify: an account's name is no user's
    assert "'name' comes from accounts.name" in "".join(capfd.readouterr())


def test_group_calls_keep_the_users_of_a_user_level_look(run, segment):
    dag_run, _ti, _summary = run(look_id=ACCOUNT_USERS_LOOK_ID, call="group", exclude_fields=["users.email"])
    assert dag_run.state == "success"
    who = [(e["groupId"], e.get("userId"), e.get("anonymousId")) for e in segment.events()]
    assert who == [
        ("acct-toastmates", "00MWWFOLRcETcTCf", None),
        ("acct-brightloaf", "01HQZ3V8K2M5N7PB", None),
        ("acct-ferncastle", None, anonymous_id_from_email("marcus.oyelaran@example.org")),
    ]
    assert segment.events()[0]["traits"] == {"name": "Toastmates Inc.", "plan": "enterprise"}


def test_group_dry_run_logs_group_payloads(run, segment, capfd):
    dag_run, _ti, summary = run(look_id=ACCOUNTS_LOOK_ID, call="group", dry_run=True)
    assert dag_run.state == "success" and segment.stats()["requests"] == 0
    assert summary["would_send"] == 3 and summary["groups_without_user"] == 3  # would carry derived ids
    text = "".join(capfd.readouterr())
    assert 'Dry run: example payload 1: {"type":"group","groupId":"acct-toastmates"' in text
    assert "each row becomes one of Segment's group calls" in text


def test_group_calls_for_totango_pass_the_destination_check(run, segment, capfd):
    dag_run, _ti, summary = run(look_id=ACCOUNTS_LOOK_ID, call="group", destinations=["totango"])
    assert dag_run.state == "success" and summary["sent"] == 3
    dag_run, _ti, _summary = run(destinations=["totango"])  # identify calls: Totango would drop them
    assert dag_run.state == "failed"
    assert "call='group'" in "".join(capfd.readouterr())


# ------------------------------------------------------------------------------------------------ track


def test_track_calls_put_the_columns_in_properties(run, segment):
    dag_run, _ti, summary = run(call="track", event="Active last 30 days")
    assert dag_run.state == "success"
    events = segment.events()
    assert len(events) == 10 and {e["type"] for e in events} == {"track"}
    assert events[0]["event"] == "Active last 30 days" and events[0]["userId"] == "00MWWFOLRcETcTCf"
    assert events[0]["properties"] == {
        "name": "Ty Arthur",
        "email": "ty.arthur@segment.com",
        "sessions count": 2,
    }
    assert "traits" not in events[0]
    assert (summary["call"], summary["event"], summary["events_by_type"]) == (
        "track",
        "Active last 30 days",
        {"track": 10},
    )


def test_track_without_an_event_fails_before_reading_looker(run, looker, segment, capfd):
    runs_before = looker.counters.get("runs", 0)
    dag_run, _ti, _summary = run(call="track")
    assert dag_run.state == "failed"
    assert looker.counters.get("runs", 0) == runs_before and segment.stats()["requests"] == 0
    assert "call='track' needs event" in "".join(capfd.readouterr())


def test_entry_events_without_changed_mode_are_refused(run, segment, capfd):
    dag_run, _ti, _summary = run(entered_event="Entered")
    assert dag_run.state == "failed" and segment.stats()["requests"] == 0
    assert "entered_event ('Entered') needs sync_mode='changed'" in "".join(capfd.readouterr())


# ------------------------------------------------------------------------------------- entry and exit


def _by_type(events: list[dict[str, Any]]) -> dict[str, list[tuple[str, str | None]]]:
    found: dict[str, list[tuple[str, str | None]]] = {}
    for event in events:
        found.setdefault(event.get("event") or event["type"], []).append(event["userId"])
    return {key: sorted(value) for key, value in found.items()}


def test_entry_and_exit_events_across_three_runs(changed, looker, segment):
    cohort = [(f"u{n}", "free") for n in range(5)]
    _cohort(looker, cohort)
    options = {"entered_event": "Entered VIP", "exited_event": "Left VIP"}

    # Run 1: everyone enters (there is no previous state).
    dag_run, _ti, first = changed(**options)
    assert dag_run.state == "success"
    assert _by_type(segment.events()) == {
        "identify": [f"u{n}" for n in range(5)],
        "Entered VIP": [f"u{n}" for n in range(5)],
    }
    entered = next(e for e in segment.events() if e["type"] == "track" and e["userId"] == "u0")
    assert entered["properties"] == {"email": "u0@example.com", "plan": "free"}
    assert (first["entered_events"], first["events_by_type"]) == (5, {"identify": 5, "track": 5})

    # Run 2: nothing changed, nothing sent.
    segment.reset()
    _dag_run, _ti, second = changed(**options)
    assert segment.events() == [] and (second["unchanged"], second["entered_events"]) == (5, 0)

    # Run 3: u1 leaves, u9 joins, u2 changes plan (sent, but it did not enter).
    cohort = [c for c in cohort if c[0] != "u1"] + [("u9", "free")]
    cohort[1] = ("u2", "pro")
    _cohort(looker, cohort)
    segment.reset()
    _dag_run, _ti, third = changed(**options)
    assert _by_type(segment.events()) == {"identify": ["u2", "u9"], "Entered VIP": ["u9"], "Left VIP": ["u1"]}
    left = next(e for e in segment.events() if e.get("event") == "Left VIP")
    assert left["properties"] == {}  # nothing that was not delivered before
    assert (third["entered_events"], third["exited_events"], third["exited"]) == (1, 1, 1)


def test_a_retried_task_resends_identical_entry_message_ids(changed, looker, segment):
    _cohort(looker, [(f"u{n}", "free") for n in range(4)])
    segment.set_faults(Faults(**SEGMENT_OUTAGE))  # the first try's batch fails: the task is retried
    dag_run, ti, summary = changed(entered_event="Entered", membership_trait="in_cohort")
    assert dag_run.state == "success" and ti.try_number == 2
    requests = _message_ids_of_requests(segment)
    first, second = requests[0], requests[-1]
    assert len(first) == 8 and first == second  # 4 identify calls and 4 entry events, twice the same ids
    assert summary["entered_events"] == 4 and summary["sent"] == 8


def test_group_cohort_exits_use_the_group_id(run, looker, segment, tmp_path):
    account = FixtureField("accounts.id", "Accounts ID", "ID", tags=("segment_group_id",))
    plan = FixtureField("accounts.plan", "Accounts Plan", "Plan")

    def accounts(ids: list[str]) -> None:
        rows = tuple({"accounts.id": i, "accounts.plan": "pro"} for i in ids)
        looker.add_look(FixtureLook("601", "Accounts", "toastmates", "accounts", (account, plan), rows))

    conf = {
        "look_id": "601",
        "call": "group",
        "sync_mode": "changed",
        "state_path": str(tmp_path),
        "membership_trait": "vip_account",
        "exited_event": "Account left VIP",
    }
    accounts(["a1", "a2", "a3"])
    run(**conf)
    accounts(["a1", "a3"])
    segment.reset()
    dag_run, _ti, summary = run(**conf)
    assert dag_run.state == "success" and summary["exited"] == 1
    group, track = segment.events()
    derived = anonymous_id_from_group("a2")
    assert (group["type"], group["groupId"], group["anonymousId"], group["traits"]) == (
        "group",
        "a2",
        derived,
        {"vip_account": False},
    )
    assert (track["event"], track["anonymousId"], track["context"]["groupId"]) == (
        "Account left VIP",
        derived,
        "a2",
    )


def test_identify_and_track_syncs_of_one_look_keep_separate_states(changed, looker, segment):
    _cohort(looker, [(f"u{n}", "free") for n in range(3)])
    changed()
    segment.reset()
    # The same Look as track calls: a state of its own, so everyone is new there.
    _dag_run, _ti, summary = changed(call="track", event="In cohort")
    assert (summary["new"], summary["sent"]) == (3, 3)
    _dag_run, _ti, summary = changed()
    assert summary["unchanged"] == 3 and summary["sent"] == 0
