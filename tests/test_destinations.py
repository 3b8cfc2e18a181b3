"""The destination table shipped with the package, name resolution and the identifier checks."""

from __future__ import annotations

import pytest

from airflow_provider_looker_segment.destinations import (
    ALIASES,
    Destination,
    check_destinations,
    load_destinations,
    normalise_name,
    parse_table,
    resolve_destinations,
)
from airflow_provider_looker_segment.exceptions import DestinationError

HEADER = "destination\temail\tuser_id\teither\tnote\n"


def check(names, *, user_id=False, email=False, anonymous_id=False, traits=()):
    return check_destinations(
        resolve_destinations(names),
        has_user_id=user_id,
        has_email=email,
        has_anonymous_id=anonymous_id,
        trait_keys=set(traits),
    )


# ------------------------------------------------------------------------------------------------ table


def test_every_row_of_the_table_is_parsed():
    table = load_destinations()
    assert len(table) == 77
    assert list(table)[:2] == ["aboardly", "activecampaign"] and list(table)[-1] == "zendesk"
    assert table["hubspot"].requirement == "email"
    assert table["amplitude"].requirement == "user_id"
    assert table["intercom"].requirement == "either"
    assert table["blueshift"].requirement == "both"
    assert table["salesmachine"].requirement == "none" and table["salesmachine"].note == "*account_uid"
    assert table["iterable"].requirement == "either" and "misaligned" in table["iterable"].note
    assert table["zendesk"] == Destination("zendesk", email="X*", note="*Also requires a name trait")
    assert table["braze"].note == "(previously appboy)"


def test_requirement_counts():
    requirements = [d.requirement for d in load_destinations().values()]
    counts = {r: requirements.count(r) for r in set(requirements)}
    assert counts == {"user_id": 39, "email": 17, "either": 15, "both": 5, "none": 1}


def test_starred_rows_all_have_a_rule():
    starred = {d.name for d in load_destinations().values() if "X*" in (d.email, d.user_id, d.either)}
    assert starred == {"amazon-kinesis", "calq", "kissmetrics", "pardot", "totango", "woopra", "zendesk"}
    anonymous = {d.name for d in load_destinations().values() if d.accepts_anonymous_id}
    assert anonymous == {"amazon-kinesis", "calq", "kissmetrics"}


def test_normalised_names_and_aliases_are_unambiguous():
    table = load_destinations()
    keys = [normalise_name(name) for name in table]
    assert len(set(keys)) == len(keys)
    assert all(target in table for target in ALIASES.values())


def test_load_is_cached():
    assert load_destinations() is load_destinations()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("name\temail\n", "header"),
        (HEADER + "a\tY\t\t\t\n", "unknown mark 'Y'"),
        (HEADER + "a\tX\t\n", "5 tab-separated columns"),
        (HEADER + "a\tX\t\t\t\na\tX\t\t\t\n", "appears twice"),
        (HEADER + "\tX\t\t\t\n", "no destination name"),
    ],
)
def test_malformed_tables_are_refused(text, match):
    with pytest.raises(ValueError, match=match):
        parse_table(text)


def test_blank_lines_are_skipped():
    assert list(parse_table(HEADER + "a\tX\t\t\t\n\n")) == ["a"]


# ---------------------------------------------------------------------------------------------- resolve


def test_resolve_ignores_case_spaces_and_punctuation():
    names = ["HubSpot", " Customer IO ", "customer.io", "Amazon Kinesis Firehose", "help scout"]
    assert [d.name for d in resolve_destinations(names)] == [
        "hubspot",
        "customer.io",
        "amazon-kinesis-firehose",
        "help-scout",
    ]


def test_resolve_aliases_and_comma_separated_string():
    assert [d.name for d in resolve_destinations("appboy, customerio,marketo")] == [
        "braze",
        "customer.io",
        "marketo-v2",
    ]
    assert resolve_destinations(None) == [] and resolve_destinations([]) == []


def test_unknown_names_suggest_close_matches():
    with pytest.raises(DestinationError) as err:
        resolve_destinations(["hubspt", "amplitude", "zzzz"])
    text = str(err.value)
    assert "'hubspt' (did you mean hubspot?)" in text
    assert "'zzzz'" in text and "amplitude'" not in text
    assert "Known destinations" in text and "zendesk" in text


def test_non_string_names_are_refused():
    with pytest.raises(DestinationError, match="must be strings"):
        resolve_destinations(["hubspot", 3])


# ------------------------------------------------------------------------------------------------ check


def test_email_destination_without_email_names_what_to_do():
    result = check(["hubspot"], user_id=True)
    assert not result.ok
    assert result.errors == [
        "hubspot needs an email trait: the Look provides none (tag a field `email` in LookML or set "
        "email_field, and do not exclude it)"
    ]


def test_user_id_destination():
    assert check(["amplitude"], user_id=True).ok
    assert check(["amplitude"], email=True, anonymous_id=True).errors == [
        "amplitude needs a userId: the Look provides none "
        "(tag a field `user_id` in LookML or set user_id_field)"
    ]


def test_both_and_either():
    assert len(check(["blueshift"]).errors) == 2
    assert check(["blueshift"], user_id=True, email=True).ok
    assert check(["intercom"], email=True).ok and check(["intercom"], user_id=True).ok
    assert "a userId or an email trait" in check(["intercom"], anonymous_id=True).errors[0]


def test_or_anonymous_id_exceptions():
    for name in ("amazon-kinesis", "calq", "kissmetrics"):
        assert check([name], anonymous_id=True).ok
        assert check([name], user_id=True).ok
        assert f"{name} needs a userId or an anonymousId" in check([name]).errors[0]


def test_totango_is_an_error():
    result = check(["totango"], user_id=True)
    assert len(result.errors) == 1 and "context.groupId" in result.errors[0]


def test_zendesk_needs_a_name_trait():
    assert "`name` trait" in check(["zendesk"], email=True).errors[0]
    assert check(["zendesk"], email=True, traits={"name", "email"}).ok
    assert len(check(["zendesk"], traits={"name"}).errors) == 1


def test_salesmachine_needs_account_uid():
    assert "account_uid" in check(["salesmachine"], user_id=True).errors[0]
    assert check(["salesmachine"], user_id=True, traits={"account_uid"}).ok


def test_settings_notes_are_warnings():
    woopra = check(["woopra"], email=True)
    assert woopra.ok and "cookie" in woopra.warnings[0]
    assert check(["woopra"], user_id=True).warnings == []
    pardot = check(["pardot"], email=True)
    assert pardot.ok and len(pardot.warnings) == 1 and "unique identifier" in pardot.warnings[0]
    assert len(check(["pardot"], user_id=True).warnings) == 2
    marketo = check(["marketo"], user_id=True, traits={"plan", "email"})
    assert marketo.ok and marketo.warnings[0].endswith("settings before sending the Look: email, plan.")


def test_every_failing_destination_is_reported():
    result = check(["hubspot", "amplitude", "intercom", "heap"], anonymous_id=True)
    assert [e.split(" ", 1)[0] for e in result.errors] == ["hubspot", "amplitude", "intercom", "heap"]


def test_whole_table_with_every_identifier():
    result = check(
        list(load_destinations()), user_id=True, email=True, anonymous_id=True, traits={"name", "account_uid"}
    )
    assert result.errors == [result.errors[0]] and result.errors[0].startswith("totango")
