"""
The messages of sync_mode="changed" and what its decisions do to a real state (file://): identity keys,
transition messageIds, exit calls, entry events, the exit guard, identity switches, partial deliveries.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from sync_state_helpers import cohort_message, run_sync, stored_entries

from airflow_provider_looker_segment.cohort_sync import CohortEvents, exit_calls
from airflow_provider_looker_segment.cohort_units import CALL, EVENT, Departure, message_part
from airflow_provider_looker_segment.sync_run import CohortStateStore
from airflow_provider_looker_segment.sync_state import identity_hash
from airflow_provider_looker_segment.values import anonymous_id_from_email, anonymous_id_from_group

KEY = "look-600-test-0123456789abcdef"


def test_message_ids_name_the_identity_and_the_part():
    ihash = identity_hash("userId", "42")
    prefix = f"{ihash:016x}"
    assert message_part(f"{prefix}-lsg-{'0' * 32}") == (ihash, CALL)
    assert message_part(f"{prefix}-entered-{'0' * 32}") == (ihash, EVENT)
    assert message_part(f"{prefix}-exit-{'0' * 32}") == (ihash, CALL)
    assert message_part(f"{prefix}-exited-{'0' * 32}") == (ihash, EVENT)
    assert message_part("not-ours") is None and message_part(f"{prefix}-other-x") is None


def _events(**kwargs: Any) -> CohortEvents:
    defaults = {
        "membership_trait": "in_cohort",
        "sync_key": KEY,
        "timestamp": "2026-11-29T00:00:00.000Z",
        "library": {"name": "x", "version": "1"},
    }
    return CohortEvents(**{**defaults, **kwargs})


def _departed(kind: str, identity: str) -> Departure:
    return Departure(0, identity_hash(kind, identity), kind, identity, None, None, 3, False)


def test_exit_message_is_deterministic_minimal_and_derived_from_the_transition():
    departed = _departed("anonymousId", "anon-1")
    ((bit, message),) = exit_calls(departed, _events(), 4)
    assert bit == CALL
    assert message["type"] == "identify" and message["anonymousId"] == "anon-1" and "userId" not in message
    assert message["traits"] == {"in_cohort": False}
    assert message["timestamp"] == "2026-11-29T00:00:00.000Z"
    assert [(bit, message)] == exit_calls(departed, _events(), 4)  # the same transition, the same messageId
    assert message_part(message["messageId"]) == (departed.ihash, CALL)
    ((_, other_generation),) = exit_calls(departed, _events(), 5)
    ((_, other_sync),) = exit_calls(departed, _events(sync_key="look-601-x-0"), 4)
    assert len({message["messageId"], other_generation["messageId"], other_sync["messageId"]}) == 3


def test_exit_calls_follow_the_call_type_and_the_exit_event():
    user = _departed("userId", "u1")
    track = _events(call="track", event="In VIP cohort", exited_event="Left VIP cohort")
    (_, membership), (bit, exited) = exit_calls(user, track, 1)
    assert (membership["type"], membership["event"], membership["properties"]) == (
        "track",
        "In VIP cohort",
        {"in_cohort": False},
    )
    assert (bit, exited["type"], exited["event"], exited["userId"]) == (
        EVENT,
        "track",
        "Left VIP cohort",
        "u1",
    )
    assert exited["properties"] == {"in_cohort": False} and "traits" not in exited
    assert membership["messageId"] != exited["messageId"]
    assert message_part(exited["messageId"]) == (user.ihash, EVENT)

    group = _departed("groupId", "acct-1")
    (_, membership), (_, exited) = exit_calls(group, _events(call="group", exited_event="Account left"), 1)
    derived = anonymous_id_from_group("acct-1")
    assert membership == {
        "type": "group",
        "groupId": "acct-1",
        "anonymousId": derived,
        "traits": {"in_cohort": False},
        "timestamp": "2026-11-29T00:00:00.000Z",
        "context": {"library": {"name": "x", "version": "1"}},
        "messageId": membership["messageId"],
    }
    assert exited["anonymousId"] == derived and exited["context"]["groupId"] == "acct-1"
    # Without a membership trait, only the exit event, with no properties (nothing undelivered is sent).
    ((_, only),) = exit_calls(user, _events(membership_trait=None, exited_event="Left"), 1)
    assert (only["event"], only["properties"]) == ("Left", {})


# ------------------------------------------------------------------------------- runs on a real state


def _rows(
    numbers: range | list[int], plan: str = "free", trait: str | None = None, **extra: Any
) -> list[dict]:
    """The identify calls of users ``u<n>`` as the transform makes them (membership trait included)."""
    rows = []
    for n in numbers:
        traits: dict[str, Any] = {"plan": plan}
        if trait:
            traits[trait] = True
        message = {
            "type": "identify",
            "userId": f"u{n}",
            **extra,
            "traits": traits,
            "messageId": f"lsg-{n:032x}",
        }
        rows.append(message)
    return rows


def _wire(message: dict) -> dict:
    """The message as Segment receives it (its encoding)."""
    encoded = getattr(message, "encoded", None)
    return orjson.loads(encoded) if encoded is not None else message


def _run(store: CohortStateStore, rows: list[dict], **options: Any):
    options.setdefault("max_exit_ratio", 0.5)
    result = run_sync(store, rows, **options)
    return result.counts, [_wire(message) for message in result.sent]


def _stored_ids(store: CohortStateStore) -> set[str]:
    return {entry.identity for entry in stored_entries(store)}


@pytest.fixture
def store(tmp_path) -> CohortStateStore:
    return CohortStateStore(f"file://{tmp_path}/state", KEY)


def _stored(store: CohortStateStore) -> set[tuple[str, str]]:
    return {(entry.kind, entry.identity) for entry in stored_entries(store)}


def test_identity_prefers_user_id(store):
    run_sync(
        store, [cohort_message("userId", "42", 1, anonymousId="a-1"), cohort_message("anonymousId", "a-2", 1)]
    )
    assert _stored(store) == {("userId", "42"), ("anonymousId", "a-2")}


def test_a_group_call_is_keyed_by_its_group_id(store):
    run_sync(store, [cohort_message("groupId", "g-1", 1, type="group", userId="42")])
    assert _stored(store) == {("groupId", "g-1")}


def test_entry_events_follow_new_identities_only(store):
    events = _events(membership_trait=None, entered_event="Entered")
    counts, sent = _run(store, _rows(range(3)), events=events)
    pairs = [sent[i : i + 2] for i in range(0, len(sent), 2)]  # identities in hash order, each whole
    assert sorted(
        (call["userId"], call["type"], entry["type"], entry["event"], entry["userId"])
        for call, entry in pairs
    ) == [(f"u{n}", "identify", "track", "Entered", f"u{n}") for n in range(3)]
    assert all(entry["properties"] == {"plan": "free"} for _call, entry in pairs)
    assert counts.entered_events == 3
    (first,) = [m for m in sent if m["userId"] == "u0" and m["type"] == "identify"]
    assert first["messageId"] == f"{identity_hash('userId', 'u0'):016x}-lsg-{0:032x}"
    rows = _rows(range(4))
    rows[0]["traits"]["plan"] = "pro"  # changed: sent, but it did not enter
    counts, sent = _run(store, rows, events=events)
    assert sorted((m["userId"], m["type"]) for m in sent) == [
        ("u0", "identify"),
        ("u3", "identify"),
        ("u3", "track"),
    ]
    assert [m["type"] for m in sent if m["userId"] == "u3"] == ["identify", "track"]
    assert counts.entered_events == 1 and (counts.new, counts.changed) == (1, 1)


@pytest.mark.parametrize("trait", [None, "in_cohort"])
def test_an_empty_look_trips_the_guard_sends_nothing_and_keeps_the_state(store, trait):
    """The guard is decided before anything is sent; the state stays: nobody is re-sent by the next run."""
    events = _events(membership_trait=trait)
    _run(store, _rows(range(10), trait=trait), events=events)
    for _try in range(2):  # every retry decides the same
        result = run_sync(store, [], events=events, max_exit_ratio=0.5)
        assert result.sent == [] and result.commit is None and result.counts.departed == 10
        assert result.counts.exit_guard.startswith("10 of the 10 identities of the previous run (100%)")
        assert (
            "max_exit_ratio=0.5: nothing was sent and the state was not changed" in result.counts.exit_guard
        )
        assert _stored_ids(store) == {f"u{n}" for n in range(10)}
    counts, sent = _run(store, _rows(range(10), trait=trait), events=events)
    assert sent == [] and counts.unchanged == 10


def test_a_replaced_cohort_trips_the_guard_on_every_try(store):
    """100 members replaced by 100 others: no entry for the newcomers, no exit for the members, ever."""
    events = _events(entered_event="Entered", exited_event="Left")
    _run(store, _rows(range(100), trait="in_cohort"), events=events)
    for _try in range(3):
        result = run_sync(store, _rows(range(100, 200), trait="in_cohort"), events=events, max_exit_ratio=0.5)
        assert result.sent == [] and result.counts.exit_guard
        assert (result.decision.new, result.decision.departed, result.decision.previous) == (100, 100, 100)
        assert _stored_ids(store) == {f"u{n}" for n in range(100)}


def test_without_a_membership_trait_departed_identities_just_leave(store):
    _run(store, _rows(range(10)), events=_events(membership_trait=None))
    counts, sent = _run(store, _rows(range(7)), events=_events(membership_trait=None))
    assert sent == [] and counts.departed == 3 and counts.exited == 0 and counts.exit_guard is None
    assert (
        counts.exits_skipped.startswith("no membership_trait nor exited_event") and not counts.keep_departed
    )
    assert _stored_ids(store) == {f"u{n}" for n in range(7)}


def test_a_possibly_truncated_look_keeps_departed_identities(store):
    _run(store, _rows(range(10), trait="in_cohort"), events=_events())
    counts, sent = _run(store, _rows(range(4), trait="in_cohort"), events=_events(), possibly_truncated=True)
    assert sent == [] and counts.departed == 6 and counts.keep_departed and counts.exit_guard is None
    assert _stored_ids(store) == {f"u{n}" for n in range(10)}


def test_full_refresh_resends_everyone_and_sends_exits(store):
    trait = "in_cohort"
    _run(store, _rows(range(10), trait=trait), events=_events())
    rows = _rows(range(2, 10), trait=trait) + _rows([10, 11], trait=trait)  # u0, u1 left; u10, u11 joined
    rows[0]["traits"]["plan"] = "pro"  # u2 changed
    counts, sent = _run(store, rows, events=_events(), full_refresh=True)
    assert (counts.new, counts.changed, counts.unchanged, counts.exited) == (2, 8, 0, 2)
    calls = {message["userId"]: message["traits"] for message in sent}
    assert set(calls) == {f"u{n}" for n in range(12)}
    assert calls["u0"] == calls["u1"] == {trait: False}
    assert _stored_ids(store) == {f"u{n}" for n in range(2, 12)}
    counts, sent = _run(store, rows, events=_events())  # the refreshed state is the baseline of the next run
    assert sent == [] and counts.unchanged == 10


def test_full_refresh_is_guarded_like_any_run(store):
    _run(store, _rows(range(10), trait="in_cohort"), events=_events())
    counts, sent = _run(store, _rows(range(3), trait="in_cohort"), events=_events(), full_refresh=True)
    assert sent == [] and counts.exit_guard and counts.keep_departed
    assert _stored_ids(store) == {f"u{n}" for n in range(10)}


def test_full_refresh_of_an_unreadable_state_is_a_first_run(store):
    _run(store, _rows(range(10), trait="in_cohort"), events=_events())
    store.state_path.write_bytes(b"damaged")
    counts, sent = _run(store, _rows(range(3), trait="in_cohort"), events=_events(), full_refresh=True)
    assert (counts.new, counts.departed, len(sent)) == (3, 0, 3)
    assert _stored_ids(store) == {"u0", "u1", "u2"}


# ------------------------------------------------------------------------------- units delivered in part


def _entered(message: dict) -> bool:
    return message.get("event") == "Entered"


def test_an_entry_event_accepted_without_its_call_is_never_sent_again(store):
    """The issue's case: the call refused, its entry event accepted; the next run sends the call only."""
    events = _events(entered_event="Entered")
    refused = lambda message: message["messageId"].split("-")[1] == "lsg" and message["userId"] == "u1"  # noqa: E731
    first = run_sync(store, _rows(range(3), trait="in_cohort"), events=events, fail=refused)
    accepted_entries = {m["messageId"] for m in first.accepted if _entered(m)}
    assert len(accepted_entries) == 3 and first.commit.pending == 1 and "u1" not in _stored_ids(store)
    second = run_sync(store, _rows(range(3), trait="in_cohort"), events=events)
    assert [(m["type"], m["userId"]) for m in second.sent] == [("identify", "u1")]
    assert second.commit.pending == 0 and _stored_ids(store) == {"u0", "u1", "u2"}


def test_a_refused_entry_is_sent_again_under_the_same_message_id(store):
    events = _events(entered_event="Entered")
    run_sync(store, _rows(range(2), trait="in_cohort"), events=events)  # generation 1
    rows = _rows(range(4), trait="in_cohort")
    refused = lambda message: message["userId"] == "u3"  # noqa: E731
    first = run_sync(store, rows, events=events, fail=refused)  # u2 enters; u3's call and entry refused
    (tried,) = [m["messageId"] for m in first.sent if _entered(m) and m["userId"] == "u3"]
    second = run_sync(store, rows, events=events)  # generation 2 now, but u3's entry departs from 1
    (again,) = [m["messageId"] for m in second.sent if _entered(m)]
    assert again == tried and [m["userId"] for m in second.sent] == ["u3", "u3"]


def test_an_exit_event_accepted_without_its_membership_call(store):
    events = _events(exited_event="Left")
    run_sync(store, _rows(range(10), trait="in_cohort"), events=events)
    refused = lambda message: message["messageId"].split("-")[1] == "exit"  # noqa: E731
    first = run_sync(store, _rows(range(9), trait="in_cohort"), events=events, fail=refused)
    assert [(m.get("event"), m["userId"]) for m in map(_wire, first.accepted)] == [("Left", "u9")]
    assert "u9" in _stored_ids(store) and first.commit.pending == 1
    second = run_sync(store, _rows(range(9), trait="in_cohort"), events=events)
    assert [(_wire(m)["traits"], m["userId"]) for m in second.sent] == [({"in_cohort": False}, "u9")]
    assert second.sent[0]["messageId"] == first.sent[0]["messageId"]  # the same exit, the same messageId
    assert "u9" not in _stored_ids(store) and second.commit.pending == 0


def test_a_member_told_it_left_enters_again_when_it_is_back(store):
    events = _events(entered_event="Entered", exited_event="Left")
    run_sync(store, _rows(range(10), trait="in_cohort"), events=events)
    refused = lambda message: message["messageId"].split("-")[1] == "exit"  # noqa: E731
    run_sync(store, _rows(range(9), trait="in_cohort"), events=events, fail=refused)  # "Left" reached u9
    back = run_sync(store, _rows(range(10), trait="in_cohort"), events=events)
    assert [(m["type"], m.get("event"), m["userId"]) for m in map(_wire, back.sent)] == [
        ("identify", None, "u9"),
        ("track", "Entered", "u9"),
    ]


def test_a_stopped_delivery_advances_only_what_was_handed_whole(store):
    events = _events(entered_event="Entered")
    first = run_sync(store, _rows(range(4), trait="in_cohort"), events=events, stop_after=3)
    sent = [(m["type"], m["userId"]) for m in map(_wire, first.sent)]
    whole, half = sent[0][1], sent[2][1]
    assert sent == [("identify", whole), ("track", whole), ("identify", half)]
    assert _stored_ids(store) == {whole, half} and first.commit.pending == 1  # half's entry event is owed
    second = run_sync(store, _rows(range(4), trait="in_cohort"), events=events)
    rest = [f"u{n}" for n in range(4) if f"u{n}" not in (whole, half)]
    expected = [("track", half)] + [(kind, who) for who in rest for kind in ("identify", "track")]
    assert sorted((m["type"], m["userId"]) for m in map(_wire, second.sent)) == sorted(
        [("identify", half), *expected]
    )


# ------------------------------------------------------------------------------- identity switches


def test_a_lead_that_gets_a_user_id_is_the_same_member(store):
    """
    Known by email only (derived anonymousId), then with a userId: one call with both, no exit, no entry.
    """
    events = _events(entered_event="Entered", exited_event="Left")
    email = "lead@example.com"
    lead = {
        "type": "identify",
        "anonymousId": anonymous_id_from_email(email),
        "traits": {"email": email, "in_cohort": True},
        "messageId": "lsg-" + "1" * 32,
    }
    run_sync(store, [lead, *_rows(range(3), trait="in_cohort")], events=events)
    user = {
        "type": "identify",
        "userId": "u42",
        "traits": {"email": email, "in_cohort": True},
        "messageId": "lsg-" + "2" * 32,
    }
    from airflow_provider_looker_segment.batching import EncodedMessage

    message = EncodedMessage(user)
    message.alias = anonymous_id_from_email(email)  # what the transform sets for rows with a userId
    message.encoded = orjson.dumps(user)
    result = run_sync(store, [message, *_rows(range(3), trait="in_cohort")], events=events)
    sent = [_wire(m) for m in result.sent]
    assert [(m["type"], m.get("userId"), m.get("anonymousId")) for m in sent] == [
        ("identify", "u42", anonymous_id_from_email(email))
    ]
    assert (result.decision.switched, result.decision.new, result.decision.departed) == (1, 0, 0)
    assert _stored_ids(store) == {"u42", "u0", "u1", "u2"}
    result = run_sync(store, [message, *_rows(range(3), trait="in_cohort")], events=events)
    assert result.sent == []
