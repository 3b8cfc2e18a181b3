"""Group and track calls: identifier choice, payloads, invalid rows, options and destination checks (pure)."""

from __future__ import annotations

import uuid

import orjson
import pytest
from test_transform import RAN_AT, SEED_FIELDS, SEED_ROW, fld, look, one, transformer

from airflow_provider_looker_segment.destinations import check_destinations, resolve_destinations
from airflow_provider_looker_segment.exceptions import InvalidParameterError, TransformConfigError
from airflow_provider_looker_segment.settings import SyncOptions
from airflow_provider_looker_segment.transform import plan_transform
from airflow_provider_looker_segment.values import GROUP_ANONYMOUS_ID_NAMESPACE, anonymous_id_from_group

ACCOUNT_FIELDS = (
    fld("accounts.id", "Account ID", "segment_group_id", type="string"),
    fld("accounts.name", "Name", type="string"),
    fld("accounts.plan", "Plan", type="string"),
    fld("accounts.seats", "Seats", type="number"),
)
ACCOUNT_ROW = {
    "accounts.id": "acct-1",
    "accounts.name": "Toastmates",
    "accounts.plan": "pro",
    "accounts.seats": 0,
}


# ------------------------------------------------------------------------------------------------ group


def test_group_call_from_an_account_level_look():
    message = one(look(*ACCOUNT_FIELDS), ACCOUNT_ROW, call="group")
    derived = str(uuid.uuid5(GROUP_ANONYMOUS_ID_NAMESPACE, "acct-1"))
    assert list(message)[:4] == ["type", "groupId", "anonymousId", "traits"]
    assert (message["type"], message["groupId"], message["anonymousId"]) == ("group", "acct-1", derived)
    assert message["traits"] == {"name": "Toastmates", "plan": "pro", "seats": 0}  # falsy values kept
    assert "userId" not in message and message["timestamp"] == "2024-01-05T10:00:00.000Z"
    assert orjson.loads(message.encoded) == dict(message)
    assert anonymous_id_from_group("acct-1") == derived  # stable: the same on every run, never random


def test_group_call_keeps_the_rows_user_identifiers():
    fields = (*SEED_FIELDS, fld("accounts.id", "Account ID", "segment_group_id"))
    message = one(look(*fields), {**SEED_ROW, "accounts.id": 7}, call="group")
    assert (message["groupId"], message["userId"]) == ("7", "00MWWFOLRcETcTCf")
    assert "anonymousId" not in message and "accounts.id" not in str(message["traits"])
    assert message["traits"] == {"name": "Ty Arthur", "email": "ty.arthur@segment.com", "sessions count": 2}
    # A row without a userId but with an email: the anonymousId derived from the email, as identify does.
    anonymous = one(look(*fields), {**SEED_ROW, "users.id": None, "accounts.id": 7}, call="group")
    assert anonymous["anonymousId"] != anonymous_id_from_group("7") and "userId" not in anonymous


def test_rows_without_a_group_id_are_invalid():
    transform = transformer(look(*ACCOUNT_FIELDS), call="group")
    assert transform({**ACCOUNT_ROW, "accounts.id": None}) == (None, "no_group_id")
    assert transform({**ACCOUNT_ROW, "accounts.id": "  "}) == (None, "no_group_id")


def test_group_id_detection_tag_name_label_and_parameter():
    by_name = plan_transform(look(fld("accounts.id", "ID"), fld("accounts.name", "Name")), _group())
    assert by_name.group_id.to_dict() == {"field": "accounts.id", "how": "field name"}
    by_label = plan_transform(look(fld("crm.acct", "Account ID"), fld("crm.x", "X")), _group())
    assert by_label.group_id.how == "label"
    explicit = plan_transform(look(*ACCOUNT_FIELDS), _group(group_id_field="accounts.name"))
    assert explicit.group_id.to_dict() == {"field": "accounts.name", "how": "parameter"}
    assert "accounts.id" in explicit.traits  # the tagged field is a trait when another one is chosen
    plan = plan_transform(look(*ACCOUNT_FIELDS), _group())
    assert plan.identifiers["groupId"] == {"field": "accounts.id", "how": "tag segment_group_id"}
    assert plan.identifiers["anonymousId"]["how"].startswith("derived from the group id")
    assert plan.identifiers["userId"] is None


def test_group_calls_without_a_group_id_field_fail_before_any_row():
    with pytest.raises(TransformConfigError, match=r"no group id field.*segment_group_id.*group_id_field"):
        plan_transform(look(*SEED_FIELDS), _group())
    with pytest.raises(TransformConfigError, match=r"has no field accounts.nope \(group_id_field\)"):
        plan_transform(look(*ACCOUNT_FIELDS), _group(group_id_field="accounts.nope"))


def test_the_group_id_field_cannot_also_be_the_user_id():
    fields = (fld("users.id", "ID", "segment_group_id"), fld("users.name", "Name"))
    with pytest.raises(TransformConfigError, match=r"chosen as the groupId .* and the userId \(parameter\)"):
        plan_transform(look(*fields), _group(user_id_field="users.id"))
    # A field tagged both ways gives the groupId only.
    both = plan_transform(look(fld("users.id", "ID", "user_id", "segment_group_id")), _group())
    assert (both.group_id.field, both.user_id) == ("users.id", None)


def test_a_segment_group_id_tag_is_an_ordinary_trait_of_identify_calls():
    fields = (*SEED_FIELDS, fld("accounts.id", "Account ID", "segment_group_id"))
    message = one(look(*fields), {**SEED_ROW, "accounts.id": "a-1"})
    assert message["type"] == "identify" and message["traits"]["account id"] == "a-1"
    assert "groupId" not in message


def test_group_warnings_name_group_traits():
    fields = (*SEED_FIELDS, fld("accounts.id", "Account ID", "segment_group_id"))
    plan = plan_transform(look(*fields), _group())
    text = " ".join(plan.warnings)
    assert "group's (account's) email" in text and "overwrites" not in text
    assert "overwrites these group traits" in plan.overwrite_note


def _group(**kwargs) -> SyncOptions:
    return _options(call="group", **kwargs)


# ------------------------------------------------------------------------------------------------ track


def test_track_call_puts_the_columns_in_properties():
    message = one(look(*SEED_FIELDS), SEED_ROW, call="track", event="Joined VIP", membership_trait="vip")
    assert list(message)[:4] == ["type", "event", "userId", "properties"]
    assert (message["type"], message["event"], message["userId"]) == (
        "track",
        "Joined VIP",
        "00MWWFOLRcETcTCf",
    )
    assert message["properties"] == {
        "name": "Ty Arthur",
        "email": "ty.arthur@segment.com",
        "sessions count": 2,
        "vip": True,
    }
    assert "traits" not in message and orjson.loads(message.encoded) == dict(message)


def test_message_ids_differ_by_call_type_and_event_and_repeat_on_a_retry():
    meta = look(*SEED_FIELDS)
    identify = one(meta, SEED_ROW)["messageId"]
    track = one(meta, SEED_ROW, call="track", event="A")["messageId"]
    other_event = one(meta, SEED_ROW, call="track", event="B")["messageId"]
    assert len({identify, track, other_event}) == 3
    assert one(meta, SEED_ROW, call="track", event="A")["messageId"] == track


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"call": "track"}, "call='track' needs event"),
        ({"call": "track", "event": "  "}, "call='track' needs event"),
        ({"event": "Joined"}, "event .'Joined'. names the event of track calls"),
        ({"call": "identify", "group_id_field": "accounts.id"}, "group_id_field .* call='group'"),
        ({"call": "alias"}, "call must be one of identify, group, track"),
    ],
)
def test_bad_call_options_are_refused(options, message):
    with pytest.raises(InvalidParameterError, match=message):
        SyncOptions.from_arguments(look_id="1", **options)


# ------------------------------------------------------------------------------------- operator settings


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"call": "track"}, "call='track' needs event.*set event"),
        ({"call": "Track", "event": "x"}, "call must be one of identify, group, track, got 'Track'"),
        ({"event": "Joined"}, "names the event of track calls"),
        ({"group_id_field": "accounts.id"}, "group_id_field .* set call='group'"),
        ({"entered_event": "Entered"}, "entered_event .'Entered'. needs sync_mode='changed'"),
        ({"exited_event": "Left", "sync_mode": "all"}, "exited_event .'Left'. needs sync_mode='changed'"),
    ],
)
def test_sync_settings_name_the_parameter(arguments, message):
    with pytest.raises(InvalidParameterError, match=message):
        SyncOptions.from_arguments(look_id="1", **arguments)


def test_sync_settings_accept_empty_template_values():
    settings = SyncOptions.from_arguments(
        look_id="1", call="", event="None", group_id_field="", entered_event=None, exited_event=""
    )
    assert (settings.call, settings.event, settings.entered_event, settings.exited_event) == (
        "identify",
        None,
        None,
        None,
    )
    changed = SyncOptions.from_arguments(
        look_id="1", call="track", event="In cohort", sync_mode="changed", entered_event="Entered"
    )
    assert changed.event == "In cohort" and changed.entered_event == "Entered"


# ----------------------------------------------------------------------------------------- destinations


def _check(plan_options: SyncOptions, fields, names):
    plan = plan_transform(look(*fields), plan_options)
    return check_destinations(
        resolve_destinations(names),
        has_user_id=plan.has_user_id,
        has_email=plan.has_email,
        has_anonymous_id=plan.has_anonymous_id,
        trait_keys=plan.trait_keys,
        call=plan.call,
        has_group_id=plan.has_group_id,
    )


def test_totango_needs_group_calls():
    identify = _check(_options(), SEED_FIELDS, ["totango"])
    assert identify.errors and "call='group'" in identify.errors[0]
    group = _check(_group(), ACCOUNT_FIELDS, ["totango"])
    assert group.errors == [] and "only the group id" in group.warnings[0]


def test_track_calls_carry_no_email_trait():
    check = _check(_options(call="track", event="E"), SEED_FIELDS, ["mailchimp", "braze"])
    assert len(check.errors) == 1 and "mailchimp" in check.errors[0]
    assert "which track calls do not carry" in check.errors[0]
    assert _check(_options(), SEED_FIELDS, ["mailchimp"]).errors == []


def test_track_calls_skip_the_identify_trait_notes():
    fields = (fld("users.id", "ID", "user_id"), fld("users.email", "Email", "email"))
    assert _check(_options(), fields, ["salesmachine"]).errors  # identify: needs `account_uid`
    assert _check(_options(call="track", event="E"), fields, ["salesmachine"]).errors == []


def test_ran_at_is_the_timestamp_of_every_call_type():
    for options in ({}, {"call": "track", "event": "E"}):
        assert one(look(*SEED_FIELDS), SEED_ROW, **options)["timestamp"] == "2024-01-05T10:00:00.000Z"
    assert one(look(*ACCOUNT_FIELDS), ACCOUNT_ROW, call="group")["timestamp"].startswith(
        RAN_AT.date().isoformat()
    )


# ------------------------------------------------------------------------------ docs/rows-to-calls.md


def test_documented_payloads_are_what_the_transform_makes():
    """The three example payloads of docs/rows-to-calls.md ("Group and track calls"), computed."""
    import json
    import re
    from datetime import datetime, timezone
    from pathlib import Path

    from standins.looker_fixtures import ACCOUNTS_LOOK_ID, TOASTMATES_LOOK_ID, fixture_looks

    from airflow_provider_looker_segment.models import LookField, LookResultMeta
    from airflow_provider_looker_segment.transform import build_message_id_namespace, make_row_transformer

    doc = (Path(__file__).resolve().parents[1] / "docs" / "rows-to-calls.md").read_text()
    section = doc.split("## Group and track calls", 1)[1].split("### Cohort entry and exit events", 1)[0]
    documented = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", section, re.S)]
    ran_at = datetime(2026, 11, 29, 6, tzinfo=timezone.utc)
    namespace = build_message_id_namespace(
        dag_id="looker_cohort_to_segment",
        task_id="sync_cohort",
        run_id="scheduled__2026-11-29T00:00:00+00:00",
        map_index=-1,
        look_id="1",
    )
    looks = fixture_looks()
    made = []
    for look_id, options in (
        (TOASTMATES_LOOK_ID, {}),
        (ACCOUNTS_LOOK_ID, {"call": "group"}),
        (TOASTMATES_LOOK_ID, {"call": "track", "event": "Active last 30 days"}),
    ):
        fixture = looks[look_id]
        fields = tuple(
            LookField(name=f.name, label=f.label, label_short=f.label_short, type=f.type, tags=f.tags)
            for f in fixture.fields
        )
        meta = LookResultMeta(look_id=look_id, fields=fields, pivots=(), ran_at=ran_at)
        plan = plan_transform(meta, _options(**options))
        message, _reason = make_row_transformer(plan, ran_at=ran_at, message_id_namespace=namespace)(
            fixture.rows[0]
        )
        made.append(orjson.loads(message.encoded))
    assert documented == made


def _options(**arguments) -> SyncOptions:
    """The options as the operator reads them (coerced and checked once)."""
    return SyncOptions.from_arguments(look_id="1", **arguments)
