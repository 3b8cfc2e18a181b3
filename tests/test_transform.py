"""The pure transform: Look fields → plan → identify messages (no I/O, no Airflow)."""

from __future__ import annotations

import dataclasses
import math
import uuid
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_provider_looker_segment import PACKAGE_NAME, __version__
from airflow_provider_looker_segment.exceptions import InvalidParameterError, TransformConfigError
from airflow_provider_looker_segment.models import LookField, LookResultMeta, PivotValue
from airflow_provider_looker_segment.settings import SyncOptions
from airflow_provider_looker_segment.transform import (
    INVALID_NO_IDENTIFIER,
    build_message_id_namespace,
    make_row_transformer,
    plan_transform,
)
from airflow_provider_looker_segment.values import (
    ANONYMOUS_ID_NAMESPACE,
    anonymous_id_from_email,
    format_timestamp,
    to_trait_value,
)

RAN_AT = datetime(2024, 1, 5, 10, 0, 0, tzinfo=timezone.utc)
NAMESPACE = build_message_id_namespace(
    dag_id="looker_cohort", task_id="sync", run_id="scheduled__2024-01-05", map_index=-1, look_id="42"
)


def fld(name: str, label_short: str | None = None, *tags: str, **kw) -> LookField:
    """A field; the full label is the view's name + the short label, as Looker builds it."""
    view = name.rpartition(".")[0].replace("_", " ").title()
    label = f"{view} {label_short}".strip() if label_short else None
    return LookField(name=name, label=label, label_short=label_short, tags=tuple(tags), **kw)


def look(*fields: LookField, pivots: tuple[PivotValue, ...] = ()) -> LookResultMeta:
    return LookResultMeta(look_id="42", fields=tuple(fields), pivots=pivots, ran_at=RAN_AT)


def transformer(
    meta: LookResultMeta, namespace: str = NAMESPACE, ran_at: datetime | None = RAN_AT, **options
):
    plan = plan_transform(meta, sync_options(**options))
    return make_row_transformer(plan, ran_at=ran_at, message_id_namespace=namespace)


def one(meta: LookResultMeta, row: dict, **options) -> dict:
    message, reason = transformer(meta, **options)(row)
    assert reason is None, reason
    assert message is not None
    return message


SEED_FIELDS = (
    fld("users.id", "User ID", "user_id", type="string"),
    fld("users.name", "Name", type="string"),
    fld("users.email", "Email", "email", type="string"),
    fld("users.sessions_count", "Sessions Count", type="number", category="measure"),
)
SEED_ROW = {
    "users.id": "00MWWFOLRcETcTCf",
    "users.name": "Ty Arthur",
    "users.email": "ty.arthur@segment.com",
    "users.sessions_count": 2,
}


# ------------------------------------------------------------------------------------------- the seed


def test_seed_example_exactly():
    message = one(look(*SEED_FIELDS), SEED_ROW)
    encoded = orjson.dumps(message).decode()
    assert encoded.startswith(
        '{"type":"identify","userId":"00MWWFOLRcETcTCf","traits":{"name":"Ty Arthur",'
        '"email":"ty.arthur@segment.com","sessions count":2},'
    )
    assert list(message) == ["type", "userId", "traits", "timestamp", "context", "messageId"]
    assert message["timestamp"] == "2024-01-05T10:00:00.000Z"
    assert message["context"] == {"library": {"name": PACKAGE_NAME, "version": __version__}}


def test_seed_plan_summary_is_json_serialisable():
    plan = plan_transform(look(*SEED_FIELDS))
    assert plan.identifiers == {
        "userId": {"field": "users.id", "how": "tag user_id"},
        "email": {"field": "users.email", "how": "tag email"},
        "anonymousId": {"field": "users.email", "how": "derived from email, for rows without a userId"},
    }
    assert plan.traits == {
        "users.name": "name",
        "users.email": "email",
        "users.sessions_count": "sessions count",
    }
    assert plan.trait_keys == ("name", "email", "sessions count")
    assert (plan.has_user_id, plan.has_email, plan.has_anonymous_id) == (True, True, True)
    orjson.dumps({"identifiers": plan.identifiers, "traits": plan.traits, "warnings": plan.warnings})
    # Nothing to act on: no warning. What every identify overwrites is a note of the plan's log line.
    assert plan.warnings == []
    assert plan.overwrite_note == (
        "each identify overwrites these traits in downstream tools that already have them: name, email, "
        "sessions count"
    )


def test_library_can_be_given():
    plan = plan_transform(look(*SEED_FIELDS))
    library = {"name": "custom", "version": "9"}
    message, _ = make_row_transformer(plan, ran_at=None, message_id_namespace="ns", library=library)(SEED_ROW)
    assert message["context"] == {"library": library}
    assert "timestamp" not in message


# ------------------------------------------------------------------ cases of Looker's own action, adapted


def test_only_user_id_tagged():
    meta = look(fld("users.uid", "Uid", "user_id"), fld("users.city", "City"))
    message = one(meta, {"users.uid": 7, "users.city": "Paris"})
    assert message["userId"] == "7"
    assert "anonymousId" not in message
    assert message["traits"] == {"city": "Paris"}


def test_only_email_tagged_gives_stable_anonymous_id():
    meta = look(fld("people.mail", "Mail", "email"), fld("people.plan", "Plan"))
    first = one(meta, {"people.mail": " Ty.Arthur@Segment.com ", "people.plan": "pro"})
    again = one(meta, {"people.mail": "ty.arthur@segment.com", "people.plan": "pro"}, namespace="other run")
    expected = str(uuid.uuid5(ANONYMOUS_ID_NAMESPACE, "ty.arthur@segment.com"))
    assert first["anonymousId"] == again["anonymousId"] == expected
    assert "userId" not in first
    assert first["traits"] == {"email": " Ty.Arthur@Segment.com ", "plan": "pro"}


def test_anonymous_id_namespace_is_the_documented_constant():
    assert uuid.uuid5(uuid.NAMESPACE_DNS, PACKAGE_NAME) == ANONYMOUS_ID_NAMESPACE
    assert anonymous_id_from_email("A@B.C") == anonymous_id_from_email("a@b.c  ")
    for email in ("a@b.c", "Zoë.Ünal@exämple.org", "x" * 300 + "@y.z"):
        assert anonymous_id_from_email(email) == str(uuid.uuid5(ANONYMOUS_ID_NAMESPACE, email.lower()))
    assert anonymous_id_from_email("a\ud800@b.c")  # a lone surrogate does not crash
    assert anonymous_id_from_email("not an email") is None
    assert anonymous_id_from_email(None) is None
    assert anonymous_id_from_email(12) is None


def test_email_and_user_id():
    meta = look(fld("users.id", "ID", "user_id"), fld("users.email", "Email", "email"))
    message = one(meta, {"users.id": 5, "users.email": "a@b.co"})
    assert message["userId"] == "5"
    assert "anonymousId" not in message
    assert message["traits"] == {"email": "a@b.co"}


def test_user_id_and_anonymous_id():
    meta = look(fld("users.id", "ID", "user_id"), fld("users.anon", "Anon", "segment_anonymous_id"))
    message = one(meta, {"users.id": "u1", "users.anon": "a1"})
    assert (message["userId"], message["anonymousId"]) == ("u1", "a1")
    assert message["traits"] == {}
    assert list(message)[:4] == ["type", "userId", "anonymousId", "traits"]


def test_only_anonymous_id_never_becomes_user_id():
    meta = look(fld("visits.anon", "Anon", "segment_anonymous_id"), fld("visits.pages", "Pages"))
    message = one(meta, {"visits.anon": "a-1", "visits.pages": 3})
    assert message["anonymousId"] == "a-1"
    assert "userId" not in message
    assert message["traits"] == {"pages": 3}
    plan = plan_transform(meta)
    assert plan.identifiers["userId"] is None
    assert not plan.has_user_id


def test_hidden_field_excluded():
    meta = look(
        fld("users.id", "ID", "user_id"), fld("users.secret", "Secret", hidden=True), fld("users.x", "X")
    )
    message = one(meta, {"users.id": 1, "users.secret": "s", "users.x": 1})
    assert message["traits"] == {"x": 1}


def test_hidden_field_named_in_trait_names_is_included():
    meta = look(fld("users.id", "ID", "user_id"), fld("users.secret", "Secret", hidden=True))
    message = one(meta, {"users.id": 1, "users.secret": "s"}, trait_names={"users.secret": "secret"})
    assert message["traits"] == {"secret": "s"}


def test_null_user_id_with_email():
    meta = look(fld("users.id", "ID", "user_id"), fld("users.email", "Email", "email"))
    message = one(meta, {"users.id": None, "users.email": "x@y.z"})
    assert "userId" not in message
    assert message["anonymousId"] == anonymous_id_from_email("x@y.z")
    assert message["traits"] == {"email": "x@y.z"}


def test_values_zero_false_and_empty_string_round_trip():
    meta = look(
        fld("users.id", "ID", "user_id"), fld("users.n", "N"), fld("users.b", "B"), fld("users.s", "S")
    )
    message = one(meta, {"users.id": 1, "users.n": 0, "users.b": False, "users.s": ""})
    assert message["traits"] == {"n": 0, "b": False, "s": ""}
    assert orjson.dumps(message["traits"]) == b'{"n":0,"b":false,"s":""}'


@pytest.mark.parametrize(
    "value",
    [0, "", "   ", "\t\n", None, False, True, 0.0, float("nan"), [], {}, Decimal("0.0"), Decimal("NaN")],
)
def test_values_that_are_not_identifiers(value):
    meta = look(fld("users.id", "ID", "user_id"))
    assert transformer(meta)({"users.id": value}) == (None, INVALID_NO_IDENTIFIER)


def test_identifiers_are_trimmed_and_the_identity_is_the_trimmed_one():
    meta = look(
        fld("users.id", "ID", "user_id"),
        fld("users.anon", "Anon", "segment_anonymous_id"),
        fld("users.email", "Email", "email"),
    )
    padded = one(meta, {"users.id": "  42 ", "users.anon": "\ta-1 ", "users.email": "x@y.z"})
    clean = one(meta, {"users.id": "42", "users.anon": "a-1", "users.email": "x@y.z"})
    assert (padded["userId"], padded["anonymousId"]) == ("42", "a-1")
    assert padded["messageId"] == clean["messageId"] and padded.encoded == clean.encoded
    blank = one(meta, {"users.id": " \u00a0 ", "users.anon": "", "users.email": "x@y.z"})
    assert "userId" not in blank and blank["anonymousId"] == anonymous_id_from_email("x@y.z")


def test_zero_user_id_falls_back_to_email():
    meta = look(fld("users.id", "ID", "user_id"), fld("users.email", "Email", "email"))
    message = one(meta, {"users.id": 0, "users.email": "x@y.z"})
    assert "userId" not in message and message["anonymousId"]


def test_row_without_identifier_is_invalid():
    meta = look(fld("users.id", "ID", "user_id"), fld("users.email", "Email", "email"))
    run = transformer(meta)
    assert run({"users.id": None, "users.email": None}) == (None, INVALID_NO_IDENTIFIER)
    assert run({"users.id": "", "users.email": "n/a"}) == (None, INVALID_NO_IDENTIFIER)
    assert run({}) == (None, INVALID_NO_IDENTIFIER)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (42, "42"),
        (42.0, "42"),
        (4.5, "4.5"),
        (-3, "-3"),
        (Decimal("42.0"), "42"),
        ("abc", "abc"),
        (1e20, None),
        (2**64, "18446744073709551616"),
        (-(2**64) - 1, "-18446744073709551617"),
        (Decimal("4.5"), "4.5"),
        (Decimal("1.5E+3"), "1500"),
        (Decimal("12345678901234567890.0"), "12345678901234567890"),  # exactly, not 1.2345678901234567e19
        (Decimal("1E+400"), "1E+400"),  # beyond a float: its decimal text, as in traits
        ("  42 ", "42"),
        ("\t u-1\n", "u-1"),
        ("a\ud800", "a\ufffd"),
    ],
)
def test_user_id_values_become_strings(value, expected):
    if expected is None:
        expected = "100000000000000000000"
    meta = look(fld("users.id", "ID", "user_id"))
    assert one(meta, {"users.id": value})["userId"] == expected


def test_pivot_with_null_cell():
    pivots = (
        PivotValue("complete", {"orders.status": "complete"}, "complete"),
        PivotValue("pending", {}, ""),
    )
    meta = look(
        fld("users.id", "ID", "user_id"),
        fld("orders.count", "Count", category="measure", pivoted=True),
        pivots=pivots,
    )
    run = transformer(meta)
    message, _ = run({"users.id": 1, "orders.count": {"complete": 3, "pending": None}})
    assert message["traits"] == {"count | complete": 3, "count | pending": None}
    message, _ = run({"users.id": 1, "orders.count": {"complete": 3}})
    assert message["traits"] == {"count | complete": 3, "count | pending": None}
    message, _ = run({"users.id": 1, "orders.count": None})
    assert message["traits"] == {"count | complete": None, "count | pending": None}
    message, _ = run({"users.id": 1})
    assert message["traits"] == {"count | complete": None, "count | pending": None}


@pytest.mark.parametrize(
    ("style", "keys"),
    [
        ("label", ["orders count | 2024-01 | CA", "orders count | x"]),
        ("snake", ["orders_count__2024_01_ca", "orders_count__x"]),
        ("field", ["orders.count | 2024-01 | CA", "orders.count | x"]),
    ],
)
def test_pivot_trait_key_format(style, keys):
    pivots = (
        PivotValue("2024-01|FIELD|CA", {"orders.month": "2024-01", "orders.state": "CA"}),
        PivotValue("x", {}, ""),
    )
    meta = look(
        fld("users.id", "ID", "user_id"),
        fld("orders.count", "Orders Count", category="measure", pivoted=True, type="number"),
        pivots=pivots,
    )
    plan = plan_transform(meta, sync_options(trait_key_style=style))
    assert plan.traits == {"orders.count": keys}


def test_pivot_values_are_converted():
    meta = look(
        fld("users.id", "ID", "user_id"),
        fld("orders.avg", "Avg", pivoted=True),
        pivots=(PivotValue("a", {}, "A"), PivotValue("b", {}, "B")),
    )
    message = one(meta, {"users.id": 1, "orders.avg": {"a": float("inf"), "b": [1, 2]}})
    assert message["traits"] == {"avg | A": None, "avg | B": "[1,2]"}


def test_two_fields_tagged_user_id_is_an_error():
    meta = look(fld("users.id", "ID", "user_id"), fld("users.uid", "Uid", "user_id"))
    with pytest.raises(TransformConfigError, match=r"users\.id and users\.uid"):
        plan_transform(meta)


def test_query_run_time_is_the_timestamp():
    meta = look(*SEED_FIELDS)
    paris = timezone(timedelta(hours=1))
    message = one(meta, SEED_ROW, ran_at=datetime(2024, 1, 5, 11, 30, 0, 123456, tzinfo=paris))
    assert message["timestamp"] == "2024-01-05T10:30:00.123Z"
    assert format_timestamp(datetime(2024, 1, 5, 10)) == "2024-01-05T10:00:00.000Z"
    assert "timestamp" not in one(meta, SEED_ROW, ran_at=None)


# ------------------------------------------------------------------------------------ identifier rules


def test_explicit_parameters_win_over_tags():
    meta = look(fld("users.id", "ID", "user_id"), fld("users.ext", "Ext"), fld("users.mail", "Mail"))
    plan = plan_transform(meta, sync_options(user_id_field="users.ext", email_field="users.mail"))
    assert plan.identifiers["userId"] == {"field": "users.ext", "how": "parameter"}
    assert plan.identifiers["email"] == {"field": "users.mail", "how": "parameter"}
    assert plan.traits == {"users.id": "id", "users.mail": "email"}


def test_explicit_field_not_in_look_lists_the_fields():
    meta = look(*SEED_FIELDS)
    with pytest.raises(TransformConfigError) as err:
        plan_transform(meta, sync_options(user_id_field="users.idd", exclude_fields=["users.nope"]))
    text = str(err.value)
    assert "users.idd (user_id_field)" in text and "users.nope (exclude_fields)" in text
    assert "users.id, users.name, users.email, users.sessions_count" in text


def test_trait_names_field_not_in_look():
    with pytest.raises(TransformConfigError, match=r"users\.nam \(trait_names\)"):
        plan_transform(look(*SEED_FIELDS), sync_options(trait_names={"users.nam": "n"}))


@pytest.mark.parametrize(
    ("field", "kind", "how"),
    [
        (fld("users.user_id", "Some Key"), "userId", "field name"),
        (fld("users.id", "ID"), "userId", "field name"),
        (fld("toastmates_users.id", "ID"), "userId", "field name"),
        (fld("accounts.owner", "User ID"), "userId", "label"),
        (fld("users.email", "Contact"), "email", "field name"),
        (fld("people.contact", "Email Address"), "email", "label"),
        (fld("people.contact", "E-mail"), "email", "label"),
        (fld("events.anonymous_id", "Anon"), "anonymousId", "field name"),
        (fld("events.aid", "Anonymous ID"), "anonymousId", "label"),
        (fld("users.email", "Email", "email"), "email", "tag email"),
        (fld("x.y", "Y", "segment_anonymous_id"), "anonymousId", "tag segment_anonymous_id"),
    ],
)
def test_identifier_detection_and_reason(field, kind, how):
    plan = plan_transform(look(field, fld("users.plan", "Plan")))
    assert plan.identifiers[kind] == {"field": field.name, "how": how}


def test_bare_orders_id_is_not_a_user_id():
    with pytest.raises(TransformConfigError, match="no identifier field") as err:
        plan_transform(look(fld("orders.id", "ID"), fld("orders.total", "Total")))
    assert "orders.id, orders.total" in str(err.value)


def test_tags_win_over_names():
    meta = look(fld("users.id", "ID"), fld("users.external", "External", "user_id"))
    plan = plan_transform(meta)
    assert plan.identifiers["userId"] == {"field": "users.external", "how": "tag user_id"}
    assert plan.traits == {"users.id": "id"}


def test_two_name_matches_is_an_error_naming_both():
    meta = look(fld("users.email", "Email"), fld("customers.email", "Email"), fld("users.id", "ID"))
    with pytest.raises(TransformConfigError, match=r"users\.email and customers\.email.*email_field"):
        plan_transform(meta)


def test_visible_name_match_wins_over_hidden():
    meta = look(fld("users.email", "Email", hidden=True), fld("email", "Email"), fld("users.id", "ID"))
    plan = plan_transform(meta)
    assert plan.identifiers["email"] == {"field": "email", "how": "field name"}
    assert plan.traits == {"email": "email"}


def test_hidden_identifier_still_used():
    meta = look(
        fld("users.id", "ID", "user_id", hidden=True), fld("users.email", "Email", "email", hidden=True)
    )
    message = one(meta, {"users.id": 3, "users.email": "a@b.c"})
    assert message["userId"] == "3"
    assert message["traits"] == {"email": "a@b.c"}


def test_field_tagged_user_id_and_anonymous_id_is_an_error():
    meta = look(fld("users.id", "ID", "user_id", "segment_anonymous_id"))
    with pytest.raises(TransformConfigError, match="must not become the userId"):
        plan_transform(meta)


def test_explicit_same_field_for_user_and_anonymous_id_is_an_error():
    meta = look(fld("users.id", "ID"))
    options = sync_options(user_id_field="users.id", anonymous_id_field="users.id")
    with pytest.raises(TransformConfigError, match="must not become the userId"):
        plan_transform(meta, options)


def test_explicit_user_id_overrides_anonymous_tag_on_the_same_field():
    meta = look(fld("users.key", "Key", "segment_anonymous_id"))
    plan = plan_transform(meta, sync_options(user_id_field="users.key"))
    assert plan.identifiers["userId"] == {"field": "users.key", "how": "parameter"}
    assert plan.identifiers["anonymousId"] is None


def test_user_id_and_email_may_share_a_field():
    meta = look(fld("users.email", "Email", "email", "user_id"))
    message = one(meta, {"users.email": "a@b.c"})
    assert message["userId"] == "a@b.c"
    assert message["traits"] == {"email": "a@b.c"}


def test_pivoted_identifier_is_an_error():
    meta = look(fld("users.id", "ID", "user_id", pivoted=True), pivots=(PivotValue("a"),))
    with pytest.raises(TransformConfigError, match="pivoted"):
        plan_transform(meta)


# ------------------------------------------------------------------------------------------ trait rules


@pytest.mark.parametrize(
    ("style", "expected"),
    [
        ("label", {"users.name": "name", "users.email": "email", "users.sessions_count": "sessions count"}),
        ("snake", {"users.name": "name", "users.email": "email", "users.sessions_count": "sessions_count"}),
        (
            "field",
            {
                "users.name": "users.name",
                "users.email": "email",
                "users.sessions_count": "users.sessions_count",
            },
        ),
    ],
)
def test_trait_key_styles(style, expected):
    assert plan_transform(look(*SEED_FIELDS), sync_options(trait_key_style=style)).traits == expected


def test_trait_key_falls_back_to_the_field_name_without_labels():
    meta = look(fld("users.id", "ID", "user_id"), LookField("users.lifetime_value"), LookField("calc_1"))
    assert plan_transform(meta).traits == {"users.lifetime_value": "lifetime value", "calc_1": "calc 1"}
    snake = plan_transform(meta, sync_options(trait_key_style="snake")).traits
    assert snake == {"users.lifetime_value": "lifetime_value", "calc_1": "calc_1"}


def test_trait_names_override_and_exclude_fields():
    options = {"trait_names": {"users.name": "full_name"}, "exclude_fields": ["users.sessions_count"]}
    message = one(look(*SEED_FIELDS), SEED_ROW, **options)
    assert message["traits"] == {"full_name": "Ty Arthur", "email": "ty.arthur@segment.com"}


def test_excluding_the_email_keeps_it_as_identifier():
    meta = look(fld("users.email", "Email", "email"), fld("users.plan", "Plan"))
    plan = plan_transform(meta, sync_options(exclude_fields=["users.email"]))
    assert not plan.has_email and plan.has_anonymous_id
    message = one(meta, {"users.email": "a@b.c", "users.plan": "x"}, exclude_fields=["users.email"])
    assert message["traits"] == {"plan": "x"}
    assert message["anonymousId"] == anonymous_id_from_email("a@b.c")


def test_trait_names_cannot_rename_the_email_or_name_an_identifier():
    with pytest.raises(TransformConfigError, match=r"always becomes traits\.email"):
        plan_transform(look(*SEED_FIELDS), sync_options(trait_names={"users.email": "mail"}))
    with pytest.raises(TransformConfigError, match="identifier fields are not traits"):
        plan_transform(look(*SEED_FIELDS), sync_options(trait_names={"users.id": "uid"}))


def test_duplicate_trait_keys_name_the_fields():
    meta = look(fld("users.id", "ID", "user_id"), fld("users.name", "Name"), fld("companies.name", "Name"))
    with pytest.raises(TransformConfigError, match=r"'name' from users\.name and companies\.name"):
        plan_transform(meta)
    plan = plan_transform(meta, sync_options(trait_names={"companies.name": "company"}))
    assert plan.traits == {"users.name": "name", "companies.name": "company"}


def test_membership_trait():
    plan = plan_transform(look(*SEED_FIELDS), sync_options(membership_trait="in_cohort"))
    assert plan.trait_keys[-1] == "in_cohort"
    message, _ = make_row_transformer(plan, ran_at=RAN_AT, message_id_namespace="n")(SEED_ROW)
    assert list(message["traits"].items())[-1] == ("in_cohort", True)
    with pytest.raises(TransformConfigError, match="membership_trait"):
        plan_transform(look(*SEED_FIELDS), sync_options(membership_trait="name"))


def test_reserved_trait_warnings():
    meta = look(
        fld("users.user_id", "User ID"),
        fld("orders.id", "ID"),
        fld("users.name", "Name"),
        fld("companies.title", "Title"),
        fld("users.email", "Email"),
        fld("users.first_name", "First Name"),
    )
    warnings = plan_transform(meta).warnings
    reserved = [w for w in warnings if "reserved trait" in w]
    assert len(reserved) == 2, warnings
    assert "'id' comes from orders.id" in reserved[0]
    assert "'title' comes from companies.title" in reserved[1]
    assert not [w for w in warnings if "overwrites" in w]  # a note of the plan's log line, not a warning
    assert "first name" in plan_transform(meta).overwrite_note


def test_reserved_email_from_another_column_warns():
    meta = look(fld("users.id", "ID", "user_id"), fld("users.backup", "Backup"))
    warnings = plan_transform(meta, sync_options(trait_names={"users.backup": "email"})).warnings
    assert any("'email' comes from users.backup" in w for w in warnings)


def test_explicit_trait_name_onto_reserved_trait_is_intended():
    meta = look(fld("users.id", "ID", "user_id"), fld("users.signup", "Signup"))
    warnings = plan_transform(meta, sync_options(trait_names={"users.signup": "createdAt"})).warnings
    assert not any("reserved" in w for w in warnings)


def test_keys_differing_only_by_case_warn():
    meta = look(fld("users.id", "ID", "user_id"), fld("users.a", "Plan"), fld("users.b", "PLAN"))
    warnings = plan_transform(meta, sync_options(trait_names={"users.a": "Plan"})).warnings
    assert any("differ only by case" in w for w in warnings)


# ---------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("x", "x"),
        (1, 1),
        (1.5, 1.5),
        (True, True),
        (None, None),
        (float("nan"), None),
        (float("inf"), None),
        (float("-inf"), None),
        (Decimal("1.25"), 1.25),
        (Decimal("NaN"), None),
        (Decimal("1E+400"), "1E+400"),
        (Decimal("-1E+400"), "-1E+400"),
        (Decimal("1.7976931348623157E+308"), 1.7976931348623157e308),
        (Decimal("1E-400"), 0.0),
        ([Decimal("1E+400"), Decimal("0.5")], '["1E+400",0.5]'),
        (date(2024, 1, 5), "2024-01-05"),
        (datetime(2024, 1, 5, 10, 0, tzinfo=timezone.utc), "2024-01-05T10:00:00+00:00"),
        (time(10, 30), "10:30:00"),
        ([1, "a", None], '[1,"a",null]'),
        ({"b": 1, "a": [True]}, '{"b":1,"a":[true]}'),
        ({"é": "ü"}, '{"é":"ü"}'),
        ([2**70], "[1180591620717411303424]"),
    ],
)
def test_to_trait_value(value, expected):
    assert to_trait_value(value) == expected


@pytest.mark.parametrize(
    ("looker_type", "value", "expected"),
    [
        ("date_time", "2024-01-05 10:00:00", "2024-01-05T10:00:00"),
        ("date_raw", "2024-01-05 10:00:00.123456", "2024-01-05T10:00:00.123456"),
        ("date_minute", "2024-01-05 10:00", "2024-01-05T10:00"),
        ("date_hour", "2024-01-05 10", "2024-01-05T10:00"),
        ("time", "2024-01-05 10:00:00", "2024-01-05T10:00:00"),
        ("date_date", "2024-01-05", "2024-01-05"),
        ("date_month", "2024-01", "2024-01"),
        ("date_year", 2024, 2024),
        ("date_time", None, None),
        ("date_time", "not a date", "not a date"),
        ("string", "2024-01-05 10:00:00", "2024-01-05 10:00:00"),
    ],
)
def test_dates_by_field_type(looker_type, value, expected):
    meta = look(fld("users.id", "ID", "user_id"), fld("users.seen", "Seen", type=looker_type))
    assert one(meta, {"users.id": 1, "users.seen": value})["traits"] == {"seen": expected}


@pytest.mark.parametrize(
    ("zone", "looker_type", "value", "expected"),
    [
        ("America/New_York", "date_time", "2024-03-01 08:15:30", "2024-03-01T13:15:30Z"),
        ("America/New_York", "date_time", "2024-07-01 08:15:30", "2024-07-01T12:15:30Z"),  # summer time
        ("Asia/Kolkata", "date_raw", "2024-01-05 10:00:00.123456", "2024-01-05T04:30:00.123456Z"),
        ("UTC", "date_hour", "2024-01-05 10", "2024-01-05T10:00:00Z"),
        ("Europe/Paris", "date_minute", "2024-01-01 00:30", "2023-12-31T23:30:00Z"),
        ("America/New_York", "date_time", "2024-03-10 02:30:00", "2024-03-10T07:30:00Z"),  # skipped: before
        ("America/New_York", "date_time", "2024-11-03 01:30:00", "2024-11-03T05:30:00Z"),  # repeated: first
        ("America/New_York", "date_date", "2024-01-05", "2024-01-05"),  # a date has no instant
        ("America/New_York", "date_time", "2024-02-30 10:00:00", "2024-02-30 10:00:00"),  # not a date
        ("America/New_York", "date_time", None, None),
        ("America/New_York", "string", "2024-01-05 10:00:00", "2024-01-05 10:00:00"),
        ("Mars/Olympus_Mons", "date_time", "2024-01-05 10:00:00", "2024-01-05T10:00:00"),  # unknown zone
    ],
)
def test_date_times_in_the_zone_of_the_query(zone, looker_type, value, expected):
    meta = dataclasses.replace(
        look(fld("users.id", "ID", "user_id"), fld("users.seen", "Seen", type=looker_type)), timezone=zone
    )
    assert one(meta, {"users.id": 1, "users.seen": value})["traits"] == {"seen": expected}
    warned = any("without a UTC offset" in w for w in plan_transform(meta).warnings)
    assert warned == (zone == "Mars/Olympus_Mons" and looker_type == "date_time")
    if warned:
        unknown = "in the time zone 'Mars/Olympus_Mons', which this worker's time zone database does not know"
        assert unknown in " ".join(plan_transform(meta).warnings)


def test_integers_beyond_64_bits_become_strings():
    meta = look(fld("users.id", "ID", "user_id"), fld("users.big", "Big"), fld("users.ok", "Ok"))
    message = one(meta, {"users.id": 1, "users.big": 2**64, "users.ok": 2**64 - 1})
    assert message["traits"] == {"big": str(2**64), "ok": 2**64 - 1}
    orjson.dumps(message)


def test_decimals_in_plain_time_and_pivoted_fields():
    pivots = (PivotValue("complete", {"orders.status": "complete"}, "complete"),)
    meta = look(
        fld("users.id", "ID", "user_id"),
        fld("users.score", "Score"),
        fld("users.seen", "Seen", type="date_epoch"),
        fld("orders.total", "Total", category="measure", pivoted=True),
        pivots=pivots,
    )
    row = {
        "users.id": Decimal("7.0"),
        "users.score": Decimal("-1E+400"),
        "users.seen": Decimal("1E+400"),
        "orders.total": {"complete": Decimal("0.1")},
    }
    message = one(meta, row)
    assert message["userId"] == "7"
    assert message["traits"] == {"score": "-1E+400", "seen": "1E+400", "total | complete": 0.1}
    assert type(message["traits"]["total | complete"]) is float
    assert message.encoded == orjson.dumps(message)


def test_lone_surrogates_are_replaced():
    meta = look(fld("users.id", "ID", "user_id"), fld("users.s", "S"), fld("users.a", "A"))
    row = {"users.id": "a\ud800", "users.s": "b\udfff", "users.a": ["\ud83d\ude00", "\udc00"]}
    message = one(meta, row)
    assert message.encoded == orjson.dumps(message)
    assert message["userId"] == "a\ufffd"
    assert message["traits"] == {"s": "b\ufffd", "a": '["\U0001f600","\ufffd"]'}  # pairs joined
    fixed = one(meta, {"users.id": "a\ufffd", "users.s": "b\ufffd", "users.a": '["\U0001f600","\ufffd"]'})
    assert fixed["messageId"] == message["messageId"]  # the identity is the id as sent
    anonymous = look(fld("v.anon", "Anon", "segment_anonymous_id"))
    assert one(anonymous, {"v.anon": "x\udfffy"})["anonymousId"] == "x\ufffdy"


# ------------------------------------------------------------------------------------------ messageId


def test_each_message_is_encoded_once_and_exactly():
    meta = look(*SEED_FIELDS)
    message = one(meta, SEED_ROW)
    assert message.encoded == orjson.dumps(message)
    no_timestamp = transformer(meta, ran_at=None)(SEED_ROW)[0]
    assert "timestamp" not in no_timestamp and no_timestamp.encoded == orjson.dumps(no_timestamp)
    message.set_message_id("0123456789abcdef-" + message["messageId"])
    assert message.encoded == orjson.dumps(message)
    assert message["messageId"].startswith("0123456789abcdef-lsg-")


def test_message_id_is_deterministic_and_short():
    meta = look(*SEED_FIELDS)
    first = one(meta, SEED_ROW)["messageId"]
    retry = one(meta, dict(SEED_ROW))["messageId"]
    assert first == retry
    assert first.startswith("lsg-") and len(first) == 36 < 100


def test_message_id_changes_with_the_run_and_the_row():
    meta = look(*SEED_FIELDS)
    base = one(meta, SEED_ROW)["messageId"]
    next_run = build_message_id_namespace(
        dag_id="looker_cohort", task_id="sync", run_id="scheduled__2024-01-06", map_index=-1, look_id="42"
    )
    assert one(meta, SEED_ROW, namespace=next_run)["messageId"] != base
    same_user_other_traits = dict(SEED_ROW, **{"users.sessions_count": 3})
    assert one(meta, same_user_other_traits)["messageId"] != base
    other_user = dict(SEED_ROW, **{"users.id": "other"})
    assert one(meta, other_user)["messageId"] != base


def test_message_id_namespace_is_unambiguous():
    def ns(dag_id: str, task_id: str) -> str:
        return build_message_id_namespace(
            dag_id=dag_id, task_id=task_id, run_id="r", map_index=None, look_id=1
        )

    assert ns("a|b", "c") != ns("a", "b|c")
    assert ns("a", "b") == '["a","b","r",-1,"1"]'


def test_user_id_and_anonymous_id_are_not_interchangeable_in_message_id():
    meta_user = look(fld("t.u", "U", "user_id"))
    meta_anon = look(fld("t.u", "U", "segment_anonymous_id"))
    assert one(meta_user, {"t.u": "x"})["messageId"] != one(meta_anon, {"t.u": "x"})["messageId"]


def test_message_id_namespace_must_be_given():
    with pytest.raises(TransformConfigError, match="message_id_namespace"):
        make_row_transformer(plan_transform(look(*SEED_FIELDS)), ran_at=None, message_id_namespace="")


# ------------------------------------------------------------------------------------------- options


def sync_options(**arguments) -> SyncOptions:
    """The options as the operator reads them (coerced and checked once)."""
    return SyncOptions.from_arguments(look_id="1", **arguments)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"trait_key_style": "camel"}, "label, snake, field"),
        ({"exclude_fields": 5}, "exclude_fields must be a list of strings"),
        ({"trait_names": ["users.name"]}, "mapping"),
        ({"trait_names": {"users.name": " "}}, "non-empty trait key"),
        ({"trait_names": {" ": "name"}}, "trait_names keys must be Looker field names"),
    ],
)
def test_option_validation(options, match):
    with pytest.raises(InvalidParameterError, match=match):
        sync_options(**options)


def test_empty_options_mean_unset():
    options = sync_options(user_id_field="", email_field="  ", exclude_fields=None, trait_names=None)
    assert options.user_id_field is None and options.email_field is None
    assert options.exclude_fields == () and options.trait_names == {}
    assert sync_options(exclude_fields=(" a ", "a")).exclude_fields == ("a",)
    assert sync_options(trait_names={" users.a ": " a "}).trait_names == {"users.a": "a"}


# --------------------------------------------------------------------------------------- property test

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
PROPERTY_META = look(
    fld("users.id", "ID", "user_id"),
    fld("users.email", "Email", "email"),
    fld("users.a", "A"),
    fld("users.b", "B", type="date_time"),
    fld("users.c", "C", pivoted=True),
    pivots=(PivotValue("p1", {}, "one"), PivotValue("p2", {}, "two")),
)
PROPERTY_TRANSFORM = transformer(PROPERTY_META)


@settings(max_examples=300, deadline=None)
@given(
    user_id=JSON_SCALARS,
    email=JSON_SCALARS,
    a=JSON_VALUES,
    b=JSON_VALUES,
    c=JSON_VALUES | st.dictionaries(st.sampled_from(["p1", "p2", "p3"]), JSON_VALUES, max_size=3),
)
def test_any_row_gives_scalar_traits(user_id, email, a, b, c):
    row = {"users.id": user_id, "users.email": email, "users.a": a, "users.b": b, "users.c": c}
    message, reason = PROPERTY_TRANSFORM(row)
    if message is None:
        assert reason == INVALID_NO_IDENTIFIER
        return
    assert isinstance(message.get("userId", message.get("anonymousId")), str)
    assert list(message["traits"]) == ["email", "a", "b", "c | one", "c | two"]
    for value in message["traits"].values():
        assert value is None or isinstance(value, (str, int, float, bool))
        assert not (isinstance(value, float) and not math.isfinite(value))
    encoded = orjson.dumps(message)
    assert message.encoded == encoded  # the one encoding made by the transform is the message's JSON
    assert orjson.loads(encoded)["traits"] == message["traits"]
    assert len(message["messageId"]) < 100
