"""LookerHook against the Looker API stand-in over HTTP, with the real looker_sdk, requests and ijson."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from decimal import Decimal
from itertools import islice

import certifi
import orjson
import pytest
import requests
from airflow.sdk import BaseHook
from looker_helpers import (
    CLIENT_ID,
    CLIENT_SECRET,
    connection_json,
    html_server,
    make_self_signed_cert,
    set_connection,
)
from standins.looker_fixtures import (
    ACCOUNT_USERS_LOOK_ID,
    DELETED_LOOK_ID,
    EDGE_VALUES_LOOK_ID,
    GENERATED_LOOK_BASE,
    HIDDEN_FIELDS_LOOK_ID,
    NEW_SIGNUPS_LOOK_ID,
    PIVOT_LOOK_ID,
    SQL_ERROR_LOOK_ID,
    TABLE_CALCULATION_LOOK_ID,
    TOASTMATES_FIRST_ROW,
    TOASTMATES_LOOK_ID,
    TRUNCATED_LOOK_ID,
    UNTAGGED_LOOK_ID,
    VALUE_TYPES_LOOK_ID,
    FixtureLook,
    fixture_looks,
    generated_look,
    generated_row,
    json_bytes,
)
from standins.looker_standin import LookerStandIn

from airflow_provider_looker_segment import look_stream
from airflow_provider_looker_segment.exceptions import (
    ConnectionConfigError,
    InvalidParameterError,
    LookDeletedError,
    LookerApiError,
    LookerSegmentError,
    LookFilterError,
    LookNotFoundError,
    LookQueryError,
    LookStreamError,
    QueryTaskError,
)
from airflow_provider_looker_segment.hooks import looker as looker_hook
from airflow_provider_looker_segment.hooks.looker import LookerHook
from airflow_provider_looker_segment.look_stream import IJSON, LookStream
from airflow_provider_looker_segment.models import (
    DIMENSION,
    MEASURE,
    TABLE_CALCULATION,
    LookInfo,
    LookRunQuery,
)
from airflow_provider_looker_segment.transform import (
    anonymous_id_from_email,
    make_row_transformer,
    plan_transform,
)

CONN_ID = "looker_test"
WRONG_SECRET = "Wr0ng-S3cret-value-7f3c"


@pytest.fixture
def looker():
    with LookerStandIn() as standin:
        yield standin


@pytest.fixture
def make_hook(monkeypatch):
    """Return a factory: define the connection from ``connection_json`` arguments and build a fast hook."""
    hooks: list[LookerHook] = []

    def make(host: str, *, password: str = CLIENT_SECRET, retries: int = 2, **extra) -> LookerHook:
        set_connection(monkeypatch, CONN_ID, connection_json(host, CLIENT_ID, password, **extra))
        hook = LookerHook(CONN_ID, retries=retries, backoff_factor=0, max_backoff=0.1)
        hooks.append(hook)
        return hook

    yield make
    for hook in hooks:
        hook.close()


@pytest.fixture
def hook(looker, make_hook):
    return make_hook(looker.base_url)


def stream_all(hook: LookerHook, look_id: str, **kwargs):
    with hook.stream_look(look_id, **kwargs) as stream:
        rows = list(stream.rows)
    return stream, rows


# --- connection -> looker_sdk -----------------------------------------------------------------------------


def test_hook_identity():
    assert issubclass(LookerHook, BaseHook)
    assert (LookerHook.conn_type, LookerHook.hook_name) == ("looker", "Looker")
    assert (LookerHook.conn_name_attr, LookerHook.default_conn_name) == ("looker_conn_id", "looker_default")
    assert LookerHook().looker_conn_id == "looker_default"
    assert IJSON.backend_name == "yajl2_c"


def _connection_settings(monkeypatch, host, schema=None, port=None, **extra):
    """The hook's settings for a connection with these Host, Schema, Port and extras."""
    conn = {"conn_type": "looker", "host": host, "schema": schema, "port": port, "extra": extra}
    set_connection(monkeypatch, CONN_ID, json.dumps({**conn, "login": CLIENT_ID, "password": CLIENT_SECRET}))
    return LookerHook(CONN_ID).settings


@pytest.mark.parametrize(
    ("host", "schema", "port", "expected"),
    [
        ("https://x.cloud.looker.com:19999", None, None, "https://x.cloud.looker.com:19999"),
        ("https://X.Cloud.Looker.com/", None, None, "https://x.cloud.looker.com"),
        ("https://x.cloud.looker.com/api/4.0/", None, None, "https://x.cloud.looker.com"),
        ("x.cloud.looker.com", None, 19999, "https://x.cloud.looker.com:19999"),
        ("x.cloud.looker.com", "http", None, "http://x.cloud.looker.com"),
        ("x.cloud.looker.com", "HTTPS", 443, "https://x.cloud.looker.com"),
        ("https://x.cloud.looker.com:8443", None, 19999, "https://x.cloud.looker.com:8443"),
        ("  http://127.0.0.1:8080  ", None, None, "http://127.0.0.1:8080"),
        ("https://[::1]:8443/", None, None, "https://[::1]:8443"),
    ],
)
def test_host_is_normalised(monkeypatch, host, schema, port, expected):
    assert _connection_settings(monkeypatch, host, schema, port).base_url == expected


@pytest.mark.parametrize("host", ["", None, "ftp://x.example.com", "https://x.example.com:notaport"])
def test_unusable_host_is_rejected(monkeypatch, host):
    with pytest.raises(ConnectionConfigError, match="The Looker connection"):
        _connection_settings(monkeypatch, host)


def test_uri_connection_with_port_schema_and_string_extras(monkeypatch):
    set_connection(
        monkeypatch,
        CONN_ID,
        "looker://my-id:my-secret@x.cloud.looker.com:19999/https?verify_ssl=false&timeout=30",
    )
    settings = LookerHook(CONN_ID).settings
    assert settings.base_url == "https://x.cloud.looker.com:19999"
    assert (settings.client_id, settings.verify_ssl, settings.timeout) == ("my-id", False, 30.0)
    assert "my-secret" not in repr(settings)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (False, False),
        ("false", False),
        ("0", False),
        ("no", False),
        (True, True),
        ("True", True),
        ("y", True),
        ("n", False),
        (None, True),
        ("", True),
    ],
)
def test_verify_ssl_extra_forms(monkeypatch, value, expected):
    extra = {} if value is None else {"verify_ssl": value}
    set_connection(monkeypatch, CONN_ID, connection_json("https://x.example.com", **extra))
    assert LookerHook(CONN_ID).settings.verify_ssl is expected


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"verify_ssl": "maybe"},
            "verify_ssl (extra of connection 'looker_test') must be true or false, got 'maybe'",
        ),
        ({"timeout": "soon"}, "timeout (extra of connection 'looker_test') must be a number, got 'soon'"),
        ({"timeout": 0}, "timeout (extra of connection 'looker_test') must be a number above 0, got 0"),
    ],
)
def test_invalid_extras_are_rejected_naming_the_parameter(monkeypatch, extra, message):
    set_connection(monkeypatch, CONN_ID, connection_json("https://x.example.com", **extra))
    with pytest.raises(InvalidParameterError) as caught:
        _ = LookerHook(CONN_ID).settings
    assert str(caught.value) == message


def test_missing_login_or_password_is_named_not_shown(monkeypatch):
    set_connection(monkeypatch, CONN_ID, connection_json("https://x.example.com", "", WRONG_SECRET))
    with pytest.raises(LookerSegmentError, match="Login") as caught:
        _ = LookerHook(CONN_ID).settings
    assert WRONG_SECRET not in str(caught.value)


def test_sdk_reads_only_the_connection(looker, make_hook, monkeypatch, tmp_path):
    """Neither LOOKERSDK_* variables nor a looker.ini in the working directory change anything."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "looker.ini").write_text("[Looker]\nbase_url=http://127.0.0.1:1\nclient_secret=from-ini\n")
    monkeypatch.setenv("LOOKERSDK_BASE_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("LOOKERSDK_CLIENT_SECRET", "from-env")
    monkeypatch.setenv("LOOKERSDK_VERIFY_SSL", "true")
    hook = make_hook(looker.base_url, timeout="7.5")
    assert hook.test_connection() == (True, f"Connected to {looker.base_url} as Demo API")
    config = hook.sdk.auth.settings.read_config()
    assert all(isinstance(value, str) for value in config.values())
    assert config["base_url"] == looker.base_url
    assert (config["verify_ssl"], config["timeout"]) == ("true", "8")
    assert hook.sdk.auth.settings.timeout == 7.5


def test_connection_is_resolved_once_per_hook(looker, make_hook, monkeypatch):
    hook = make_hook(looker.base_url)
    assert hook.test_connection()[0]
    # A later change of the connection does not reach this hook, not even when it logs in again.
    set_connection(monkeypatch, CONN_ID, connection_json(looker.base_url, CLIENT_ID, WRONG_SECRET))
    looker.revoke_tokens()
    assert hook.get_look(TOASTMATES_LOOK_ID).title == "Active users, last 30 days"
    assert looker.counters["logins"] == 2
    assert looker.counters.get("failed_logins", 0) == 0


def test_test_connection_names_the_host_and_user(hook, looker):
    assert hook.test_connection() == (True, f"Connected to {looker.base_url} as Demo API")


def test_wrong_credentials_never_leak_the_secret(looker, make_hook, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    hook = make_hook(looker.base_url, password=WRONG_SECRET)
    ok, message = hook.test_connection()
    assert not ok
    assert "rejected the API credentials" in message
    assert f"client ID {CLIENT_ID}" in message
    with pytest.raises(LookerApiError) as caught:
        hook.get_look(TOASTMATES_LOOK_ID)
    assert caught.value.status == 404
    output = capfd.readouterr()
    for text in (message, str(caught.value), repr(caught.value), caplog.text, output.out, output.err):
        assert WRONG_SECRET not in text
    assert looker.counters["failed_logins"] == 2


@pytest.mark.parametrize("status", [429, 503])
def test_a_login_answered_429_or_5xx_is_retried_with_retry_after(hook, looker, status, caplog):
    caplog.set_level(logging.INFO, logger="airflow_provider_looker_segment.hooks.looker")
    looker.fail_next_requests(2, path="/api/4.0/login", status=status, retry_after=1)  # waits 0.1 s at most
    assert hook.get_look(TOASTMATES_LOOK_ID).title == "Active users, last 30 days"
    assert [r.status for r in looker.requests if r.path == "/api/4.0/login"] == [status, status, 200]
    retries = [r.getMessage() for r in caplog.records if "POST /api/4.0/login" in r.getMessage()]
    assert retries == [
        f"Looker answered HTTP {status} to POST /api/4.0/login; retry 1 of 2 in 0.1 s (Retry-After)",
        f"Looker answered HTTP {status} to POST /api/4.0/login; retry 2 of 2 in 0.1 s (Retry-After)",
    ]
    assert CLIENT_SECRET not in caplog.text


def test_a_login_still_refused_by_an_upgrade_does_not_blame_the_credentials(hook, looker):
    looker.fail_next_requests(6, path="/api/4.0/login", status=503, retry_after=0)  # two logins of 3 tries
    with pytest.raises(LookerApiError) as caught:
        hook.get_look(TOASTMATES_LOOK_ID)
    assert str(caught.value) == (
        f"Logging in to Looker at {looker.base_url} failed (HTTP 503, still after 2 retries): Service "
        "temporarily unavailable. Looker is limiting requests or unavailable (e.g. during an upgrade); this "
        "is not about the credentials: let the task retry later."
    )
    assert caught.value.status == 503 and "Check the client ID" not in str(caught.value)
    ok, message = hook.test_connection()
    assert not ok and "not about the credentials" in message


@pytest.mark.parametrize("path", ["/api/4.0/queries", "/api/4.0/query_tasks"])
def test_creating_a_query_or_a_query_task_is_retried_on_429_and_5xx(hook, looker, path):
    looker.fail_next_requests(1, path=path, status=429, retry_after=0)
    looker.fail_next_requests(1, path=path, status=502)
    filters = {"users.plan": "pro"}
    if path.endswith("/queries"):
        with hook.stream_look(NEW_SIGNUPS_LOOK_ID, filters=filters) as stream:
            assert stream.query.query_id == "2000001"
    else:
        assert looker.query_tasks.get(hook.start_query_task(TOASTMATES_LOOK_ID)) is not None
    assert [r.status for r in looker.requests if r.path == path] == [429, 502, 200]
    assert looker.counters.get("queries_created", 0) + looker.counters.get("query_tasks", 0) == 1


def test_unreachable_host(make_hook, looker):
    url = looker.base_url
    looker.stop()
    ok, message = make_hook(url, retries=1).test_connection()
    assert not ok
    assert message.startswith(f"Reading the API user: cannot reach {url}: [Errno 111] Connection refused")


def test_https_to_a_plain_http_port_names_the_scheme(make_hook, looker):
    url = looker.base_url.replace("http://", "https://")
    ok, message = make_hook(url, retries=0).test_connection()
    assert not ok
    assert message == (
        f"Reading the API user: TLS failure talking to {url}: the server answered in plain HTTP. The Host "
        "says https:// but this port speaks plain HTTP: use http://, or the port of Looker's HTTPS API"
    )


def test_a_connection_closed_without_an_answer(make_hook, looker):
    looker.drop_next_runs(1)
    with pytest.raises(LookerApiError) as caught:
        stream_all(make_hook(looker.base_url, retries=0), TOASTMATES_LOOK_ID)
    reasons = (
        "connection reset by the server",
        "connection closed without an answer",
    )  # as the OS reports it
    assert str(caught.value) in [
        f"Running Look 1: cannot reach {looker.base_url}: {reason}" for reason in reasons
    ]


def test_missing_connection_is_reported_by_test_connection():
    ok, message = LookerHook("no_such_connection_defined").test_connection()
    assert not ok
    assert "no_such_connection_defined" in message


def test_answers_that_are_not_lookers_become_looker_api_errors(make_hook):
    with html_server() as url:
        hook = make_hook(url)
        ok, message = hook.test_connection()
        assert not ok
        assert "could not be read" in message
        with pytest.raises(LookerApiError) as caught:
            hook.get_look(TOASTMATES_LOOK_ID)
        assert caught.value.status == 200


def test_malformed_look_body_becomes_a_looker_api_error(hook, looker):
    class MalformedLook(FixtureLook):
        def look_json(self) -> dict:
            return {"id": self.id, "title": "x", "can": "not a mapping", "query": ["not", "an", "object"]}

    base = fixture_looks()[TOASTMATES_LOOK_ID]
    looker.add_look(MalformedLook("77", "Malformed", "toastmates", "users", base.fields, base.rows))
    with pytest.raises(LookerApiError, match="could not be read") as caught:
        hook.get_look("77")
    assert caught.value.status == 200
    assert caught.value.look_id == "77"


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_verify_ssl_false_is_honoured(make_hook, tmp_path, monkeypatch):
    cert, key = make_self_signed_cert(tmp_path)
    with LookerStandIn(tls_certfile=cert, tls_keyfile=key) as looker:
        ok, message = make_hook(looker.base_url, retries=0).test_connection()
        assert not ok
        assert message.startswith(f"Reading the API user: TLS failure talking to {looker.base_url}")
        assert "CERTIFICATE_VERIFY_FAILED" in message

        assert make_hook(looker.base_url, verify_ssl=False).test_connection()[0]
        # requests lets REQUESTS_CA_BUNDLE override a session's verify=False; the hook does not
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
        hook = make_hook(looker.base_url, verify_ssl="false")
        assert hook.test_connection()[0]
        _, rows = stream_all(hook, TOASTMATES_LOOK_ID)
        assert rows[0] == TOASTMATES_FIRST_ROW

        uri = f"looker://{CLIENT_ID}:{CLIENT_SECRET}@127.0.0.1:{looker.base_url.rsplit(':', 1)[1]}/https"
        set_connection(monkeypatch, "looker_uri", f"{uri}?verify_ssl=false")
        uri_hook = LookerHook("looker_uri", retries=0)
        try:
            assert uri_hook.test_connection()[0]
        finally:
            uri_hook.close()


def test_timeout_is_applied(looker, make_hook):
    hook = make_hook(looker.base_url, retries=0, timeout=0.3)
    looker.set_delay(2.0, path_prefix="/api/4.0/user")
    ok, message = hook.test_connection()
    assert not ok
    assert message == f"Reading the API user: {looker.base_url} did not answer within 0.3 seconds (timeout)"
    looker.set_delay(2.0, path_prefix="/api/4.0/looks/1/run")
    with pytest.raises(LookerApiError, match=r"Running Look 1: .* did not answer within 0.3 seconds"):
        stream_all(hook, TOASTMATES_LOOK_ID)
    looker.clear_faults()


# --- reading Looks ----------------------------------------------------------------------------------------


def test_get_look(hook):
    look = hook.get_look(1)
    assert (look.id, look.title, look.model, look.view) == (
        "1",
        "Active users, last 30 days",
        "toastmates",
        "users",
    )
    assert look.fields == ("users.id", "users.name", "users.email", "users.sessions_count")
    assert (look.limit, look.pivots, look.hidden_fields, look.deleted) == (500, (), (), False)
    assert hook.get_look(HIDDEN_FIELDS_LOOK_ID).hidden_fields == ("users.internal_score",)
    assert hook.get_look(PIVOT_LOOK_ID).pivots == ("orders.status",)


def test_missing_look(hook):
    with pytest.raises(LookNotFoundError) as caught:
        hook.get_look(999)
    assert str(caught.value) == "Look 999 not found, or the API user cannot see it"
    assert (caught.value.status, caught.value.look_id) == (404, "999")
    with pytest.raises(LookNotFoundError):
        stream_all(hook, "999")


def test_deleted_look(hook, looker):
    with pytest.raises(LookDeletedError, match=r"^Look 11 is deleted"):
        hook.get_look(DELETED_LOOK_ID)
    with pytest.raises(LookDeletedError):
        stream_all(hook, DELETED_LOOK_ID)
    assert looker.run_requests() == []


def test_stream_toastmates_cohort(hook, looker):
    with hook.stream_look(TOASTMATES_LOOK_ID) as stream:
        meta = stream.meta
        assert looker.counters["runs"] == 1
        rows = list(stream.rows)
    assert rows[0] == TOASTMATES_FIRST_ROW
    assert len(rows) == stream.row_count == 10
    assert stream.exhausted and not stream.possibly_truncated
    assert [f.name for f in meta.fields] == ["users.id", "users.name", "users.email", "users.sessions_count"]
    user_id = meta.field_by_name("users.id")
    assert (user_id.label, user_id.label_short, user_id.type, user_id.tags) == (
        "Users User ID",
        "User ID",
        "string",
        ("user_id",),
    )
    assert meta.field_by_name("users.email").tags == ("email",)
    assert meta.field_by_name("users.sessions_count").type == "number"
    assert all(f.category == DIMENSION and not f.hidden and not f.pivoted for f in meta.fields)
    assert (meta.look_id, meta.pivots, meta.limit) == ("1", (), -1)
    assert isinstance(meta.ran_at, datetime) and meta.ran_at.utcoffset() is not None
    run = looker.run_requests()[0]
    assert run.path == "/api/4.0/looks/1/run/json_detail"
    assert run.query == {
        "apply_formatting": "false",
        "apply_vis": "false",
        "cache": "true",
        "generate_drill_links": "false",  # per-cell URLs the sync never reads
        "limit": "-1",
    }
    assert run.authorization and run.auth_scheme == "bearer"


def test_cache_is_configurable(hook, looker):
    stream_all(hook, TOASTMATES_LOOK_ID, cache=False)
    assert looker.run_requests()[0].query["cache"] == "false"


def test_untagged_fields(hook):
    stream, rows = stream_all(hook, UNTAGGED_LOOK_ID)
    assert [(f.name, f.label_short, f.tags) for f in stream.meta.fields][:2] == [
        ("customers.customer_id", "Customer ID", ()),
        ("customers.email_address", "Email Address", ()),
    ]
    assert rows[1]["customers.lifetime_orders"] == 0


def test_hidden_fields(hook):
    stream, rows = stream_all(hook, HIDDEN_FIELDS_LOOK_ID)
    hidden = {f.name: f.hidden for f in stream.meta.fields}
    assert hidden == {
        "users.id": False,
        "users.email": False,
        "users.name": False,
        "users.internal_score": True,  # hidden in the visualisation
        "users.row_key": True,  # hidden in LookML
    }
    assert rows[0]["users.internal_score"] == Decimal("0.82")
    assert rows[2]["users.internal_score"] is None


def test_pivots(hook):
    stream, rows = stream_all(hook, PIVOT_LOOK_ID)
    meta = stream.meta
    assert [(p.key, p.data, p.label) for p in meta.pivots] == [
        ("complete", {"orders.status": "complete"}, "complete"),
        ("pending", {"orders.status": "pending"}, "pending"),
        ("cancelled", {"orders.status": "cancelled"}, "cancelled"),
    ]
    assert [(f.name, f.category, f.pivoted) for f in meta.fields] == [
        ("users.id", DIMENSION, False),
        ("users.email", DIMENSION, False),
        ("orders.count", MEASURE, True),
        ("orders.total_revenue", MEASURE, True),
    ]
    assert rows[1] == {
        "users.id": "01HQZ3V8K2M5N7PB",
        "users.email": "priya.raman@toastmates.com",
        "orders.count": {"complete": 7, "pending": None, "cancelled": 2},
        "orders.total_revenue": {"complete": 310.0, "pending": None, "cancelled": 45.25},
    }


def test_table_calculations(hook):
    stream, rows = stream_all(hook, TABLE_CALCULATION_LOOK_ID)
    calcs = [f for f in stream.meta.fields if f.category == TABLE_CALCULATION]
    assert [(f.name, f.label, f.type) for f in calcs] == [
        ("average_order_value", "Average Order Value", "number"),
        ("is_big_spender", "Is Big Spender", "yesno"),
    ]
    assert [r["is_big_spender"] for r in rows] == [False, True, False]
    assert rows[2]["average_order_value"] is None
    assert rows[0]["average_order_value"] == Decimal("35.1225")


def test_value_types_are_raw(hook):
    stream, rows = stream_all(hook, VALUE_TYPES_LOOK_ID)
    assert rows[0] == {
        "users.id": "00MWWFOLRcETcTCf",
        "users.email": "ty.arthur@segment.com",
        "users.name": "Ty Arthur",
        "users.age": 34,
        "users.balance": 120.75,
        "users.external_id": 9007199254740993,
        "users.created_date": "2024-02-29",
        "users.last_seen_time": "2024-03-01 08:15:30",
        "users.created_month": "2024-02",
        "users.is_verified": "Yes",
        "users.lifetime_value": 512.5,
        "is_new": True,
    }
    assert (rows[1]["users.email"], rows[1]["users.name"], rows[1]["users.age"]) == (None, "", 0)
    assert (rows[1]["users.lifetime_value"], rows[1]["is_new"], rows[1]["users.balance"]) == (0, False, -12.5)
    assert rows[2]["users.name"] == "Zoë Ümlaut 😀"
    assert all(
        v is None
        for k, v in rows[2].items()
        if k not in ("users.id", "users.email", "users.name", "users.balance")
    )
    types = {f.name: f.type for f in stream.meta.fields}
    assert (types["users.created_date"], types["users.last_seen_time"], types["users.is_verified"]) == (
        "date_date",
        "date_time",
        "yesno",
    )
    # fractions are read exactly, as Decimal (the transform makes them floats)
    assert [rows[0]["users.balance"], rows[2]["users.balance"]] == [Decimal("120.75"), Decimal("0.0")]
    assert all(isinstance(v, Decimal) for v in (rows[0]["users.balance"], rows[2]["users.balance"]))


def test_failed_sql_raises_with_lookers_message(hook):
    with pytest.raises(LookQueryError) as caught:
        with hook.stream_look(SQL_ERROR_LOOK_ID) as stream:
            pytest.fail(f"no stream expected, got {stream}")
    assert str(caught.value).startswith("Look 10: Looker could not run the query: An error occurred")
    assert "column users.last_login does not exist" in str(caught.value)
    assert caught.value.look_id == "10"


def test_a_result_with_drill_links_reads_as_one_without(hook, looker):
    """Should a Looker ignore generate_drill_links=false, its cells' links are skipped like any other key."""
    looker.add_look(generated_look(5000, look_id="77"))
    token = looker.issue_token()
    bodies = [
        requests.get(
            f"{looker.base_url}/api/4.0/looks/77/run/json_detail",
            params={"generate_drill_links": links},
            headers={"Authorization": f"token {token}"},
            timeout=30,
        ).content
        for links in ("true", "false")
    ]
    assert b'"links":[{' in bodies[0] and b'"links"' not in bodies[1]
    info = hook.get_look("77")
    rows = [list(LookStream("77", io.BytesIO(body), info, -1).rows) for body in bodies]
    assert rows[0] == rows[1] and len(rows[0]) == 5000 and rows[0][4999] == generated_row(4999)


def test_looker_error_row_inside_data_is_not_yielded(hook, looker):
    class ErrorInData(FixtureLook):
        def encode_rows(self, fmt, columns, start, stop, links=False) -> bytes:
            return b'{"users.id":{"value":"a"}},{"looker_error":"Query killed by admin"}'

    base = fixture_looks()[TOASTMATES_LOOK_ID]
    looker.add_look(ErrorInData("78", "Error in data", "toastmates", "users", base.fields, base.rows[:2]))
    with hook.stream_look("78") as stream:
        rows = stream.rows
        assert next(rows) == {"users.id": "a"}
        with pytest.raises(
            LookQueryError, match="Look 78: Looker could not run the query: Query killed by admin"
        ):
            next(rows)
    assert stream.row_count == 1


def test_truncation_at_the_saved_limit(hook, capfd, caplog):
    stream, rows = stream_all(hook, TRUNCATED_LOOK_ID, limit=None)
    assert (len(rows), stream.row_count, stream.possibly_truncated, stream.meta.limit) == (5, 5, True, 5)
    logged = caplog.text + "".join(capfd.readouterr())
    assert "Look 12: the result has 5 rows, as many as the row limit of 5, so it may be truncated" in logged

    stream, rows = stream_all(hook, TRUNCATED_LOOK_ID)
    assert (len(rows), stream.possibly_truncated, stream.meta.limit) == (8, False, -1)
    stream, rows = stream_all(hook, TRUNCATED_LOOK_ID, limit=8)
    assert (len(rows), stream.possibly_truncated) == (8, True)
    stream, rows = stream_all(hook, TRUNCATED_LOOK_ID, limit=20)
    assert (len(rows), stream.possibly_truncated) == (8, False)


def test_empty_result(hook):
    stream, rows = stream_all(hook, "13")
    assert rows == [] and stream.row_count == 0 and not stream.possibly_truncated
    assert stream.meta.fields[0].name == "users.id"


# --- tokens, retries, broken bodies -----------------------------------------------------------------------


def test_token_expiring_during_a_run(make_hook):
    with LookerStandIn(token_lifetime=0.5, advertised_token_lifetime=3600) as looker:
        hook = make_hook(looker.base_url)
        assert hook.get_look(TOASTMATES_LOOK_ID).title
        time.sleep(0.6)  # the token expires on the server while looker_sdk still trusts it
        _, rows = stream_all(hook, TOASTMATES_LOOK_ID)
        assert rows[0] == TOASTMATES_FIRST_ROW
        assert looker.counters["logins"] == 2
        assert looker.counters["unauthorized"] == 1


def test_401_on_the_result_request_logs_in_again_once(hook, looker):
    looker.fail_next_runs(1, status=401, retry_after=None)
    _, rows = stream_all(hook, TOASTMATES_LOOK_ID)
    assert len(rows) == 10
    assert looker.counters["logins"] == 2
    assert [r.status for r in looker.run_requests()] == [401, 200]

    looker.fail_next_runs(2, status=401, retry_after=None)
    with pytest.raises(LookerApiError, match="refused the API user even after logging in again") as caught:
        stream_all(hook, TOASTMATES_LOOK_ID)
    assert caught.value.status == 401


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(hook, looker, status):
    looker.fail_next_runs(2, status=status, retry_after=0)
    _, rows = stream_all(hook, TOASTMATES_LOOK_ID)
    assert len(rows) == 10
    assert [r.status for r in looker.run_requests()] == [status, status, 200]


def test_retries_are_bounded(hook, looker):
    looker.fail_next_runs(5, status=503, retry_after=0)
    with pytest.raises(LookerApiError, match=r"Running Look 1 failed \(HTTP 503\)") as caught:
        stream_all(hook, TOASTMATES_LOOK_ID)
    assert caught.value.status == 503
    assert len(looker.run_requests()) == 3  # the first try and two retries


def test_retry_after_is_capped(looker, make_hook):
    hook = make_hook(looker.base_url)
    looker.fail_next_runs(1, status=429, retry_after=3600)
    _, rows = stream_all(hook, TOASTMATES_LOOK_ID)  # waits max_backoff (0.1 s), not an hour
    assert len(rows) == 10


def test_dropped_connections_before_the_body_are_retried(hook, looker):
    looker.drop_next_runs(2)
    _, rows = stream_all(hook, TOASTMATES_LOOK_ID)
    assert len(rows) == 10
    assert len(looker.run_requests()) == 3


def test_body_cut_off_mid_stream(hook, looker):
    looker.add_look(generated_look(20_000, look_id="42"))
    looker.cut_connection_after("42", 12_345)
    received = []
    with pytest.raises(LookStreamError) as caught:
        with hook.stream_look(42) as stream:
            received.extend(stream.rows)
    assert str(caught.value) == "Look 42: result ended after 12,345 rows: connection closed"
    assert caught.value.look_id == "42"
    assert len(received) == stream.row_count == 12_345
    assert received[-1] == generated_row(12_344)
    assert not stream.exhausted
    assert len(looker.run_requests()) == 1  # a broken body is never retried silently


def test_body_cut_off_before_the_first_row(hook, looker):
    looker.cut_connection_after(TOASTMATES_LOOK_ID, 0)
    with pytest.raises(LookStreamError, match=r"^Look 1: result ended after 0 rows: connection closed$"):
        stream_all(hook, TOASTMATES_LOOK_ID)


def test_read_timeout_mid_stream_is_a_stream_error(looker, make_hook):
    class StallingLook(FixtureLook):
        def encode_rows(self, fmt, columns, start, stop, links=False) -> bytes:
            if start >= 2:
                time.sleep(1.0)
            return super().encode_rows(fmt, columns, start, stop, links)

    base = fixture_looks()[TOASTMATES_LOOK_ID]
    looker.chunk_rows = 2
    looker.add_look(StallingLook("79", "Stalls", "toastmates", "users", base.fields, base.rows))
    hook = make_hook(looker.base_url, retries=0, timeout=0.3)
    with pytest.raises(
        LookStreamError, match=r"^Look 79: result ended after 2 rows: no data for 0.3 seconds"
    ):
        stream_all(hook, "79")


def test_waits_before_retries_are_logged_without_secrets(looker, make_hook, caplog):
    caplog.set_level(logging.INFO, logger="airflow_provider_looker_segment.hooks.looker")
    hook = make_hook(looker.base_url)  # 2 retries, max_backoff 0.1 s
    looker.fail_next_runs(1, status=429, retry_after=1)
    stream_all(hook, TOASTMATES_LOOK_ID)
    looker.fail_next_runs(2, status=503, retry_after=None)
    stream_all(hook, TOASTMATES_LOOK_ID)
    looker.drop_next_runs(1)
    stream_all(hook, TOASTMATES_LOOK_ID)
    run = "GET /api/4.0/looks/1/run/json_detail"
    assert [r.getMessage() for r in caplog.records if r.name.endswith("hooks.looker")] == [
        f"Looker answered HTTP 429 to {run}; retry 1 of 2 in 0.1 s (Retry-After)",
        f"Looker answered HTTP 503 to {run}; retry 1 of 2 in 0 s (backoff)",
        f"Looker answered HTTP 503 to {run}; retry 2 of 2 in 0 s (backoff)",
        f"Looker request {run} failed (ProtocolError); retry 1 of 2 in 0 s (backoff)",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name.endswith("hooks.looker"))
    for secret in (CLIENT_SECRET, hook.sdk.auth.token.access_token):
        assert secret not in caplog.text


# --- values at JSON's edges; bodies that are not JSON -----------------------------------------------------


def test_numbers_beyond_64_bits_or_beyond_a_float_are_read_exactly(hook):
    stream, rows = stream_all(hook, EDGE_VALUES_LOOK_ID)
    assert stream.exhausted and stream.row_count == 4
    assert [r["users.external_id"] for r in rows] == [2**64, -(2**64) - 1, 2**63 - 1, 0]
    assert [r["users.score"] for r in rows] == [
        Decimal("1E+400"),
        Decimal("-1E+400"),
        Decimal("1.5"),
        Decimal("0.1"),
    ]
    assert [r["users.id"] for r in rows] == ["  00MWWFOLRcETcTCf ", 2**64, Decimal("42.0"), "   "]


def test_numbers_beyond_64_bits_in_the_head_and_in_pivoted_cells(hook, looker):
    base = fixture_looks()[PIVOT_LOOK_ID]
    revenue = {"complete": Decimal("1E+400"), "pending": 2**64, "cancelled": None}
    pivots = ({"key": "complete", "data": {"orders.status": 2**64}}, *base.pivot_values[1:])
    row = dict(base.rows[0], **{"orders.total_revenue": revenue})
    looker.add_look(dataclasses.replace(base, id="80", rows=(row,), pivot_values=pivots))
    stream, rows = stream_all(hook, "80")
    assert [p.label for p in stream.meta.pivots] == ["18446744073709551616", "pending", "cancelled"]
    assert stream.meta.ran_at is not None  # the head is read past the pivots
    assert rows == [{**base.rows[0], "orders.total_revenue": revenue}]


def test_lone_surrogate_escapes_are_read_as_replacement_characters(hook):
    _, rows = stream_all(hook, EDGE_VALUES_LOOK_ID)
    names = ["Ty \ufffdArthur", "Priya \ufffdRaman", "Marcus \U0001f600", "Zo\u00eb \ufffd\ufffd"]
    assert [r["users.name"] for r in rows] == names


def test_edge_values_become_identify_calls(hook):
    stream, rows = stream_all(hook, EDGE_VALUES_LOOK_ID)
    plan = plan_transform(stream.meta)
    transform = make_row_transformer(plan, ran_at=stream.meta.ran_at, message_id_namespace="edge")
    messages = [transform(row)[0] for row in rows]
    assert [m.get("userId") for m in messages] == ["00MWWFOLRcETcTCf", "18446744073709551616", "42", None]
    assert messages[3]["anonymousId"] == anonymous_id_from_email("zoe@example.com")
    assert [m["traits"]["external id"] for m in messages] == [
        "18446744073709551616",
        "-18446744073709551617",
        2**63 - 1,
        0,
    ]
    assert [m["traits"]["score"] for m in messages] == ["1E+400", "-1E+400", 1.5, 0.1]
    assert messages[0]["traits"]["name"] == "Ty \ufffdArthur"
    assert all(m.encoded == orjson.dumps(m) for m in messages)


_INFO = LookInfo("1", "t", None, None, ("users.name",), None, (), (), False)


class _Trickle:
    """A body handed over ``size`` bytes at a time, so that escapes are split at every place."""

    def __init__(self, data: bytes, size: int) -> None:
        self._data, self._size = data, size

    def read(self, size: int = -1) -> bytes:
        piece, self._data = self._data[: min(size, self._size)], self._data[min(size, self._size) :]
        return piece


#: JSON string contents: lone surrogates, pairs (any case), escaped backslashes before "u", a high
#: surrogate before a non-surrogate escape or at the end of the string.
_ESCAPES = [
    r"\ud800",
    r"a\udc00b",
    r"x\ud800\ud800y",
    r"\ud83d\ude00",
    r"\uD83D\uDE00!",
    r"\\ud800",
    r"\\\ud800",
    r"\\\\ud800",
    r"\ud800\u0041",
    r"end\ud83d",
    r"\\",
    r"\u00e9\\u",
]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 11, 13, 64 * 1024])
def test_surrogate_escapes_split_between_reads(size):
    cells = ",".join(f'{{"users.name":{{"value":"{text}"}}}}' for text in _ESCAPES)
    body = f'{{"fields":{{"dimensions":[{{"name":"users.name"}}]}},"data":[{cells}]}}'.encode()
    stream = LookStream("1", _Trickle(body, size), _INFO, -1)
    # what json.loads reads, with each lone surrogate replaced (pairs joined), as every JSON decoder does
    expected = [
        json.loads(f'"{text}"').encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        for text in _ESCAPES
    ]
    assert [row["users.name"] for row in stream.rows] == expected
    assert expected[:4] == ["\ufffd", "a\ufffdb", "x\ufffd\ufffdy", "\U0001f600"]


# --- rows read a chunk at a time (msgspec), exactly as ijson reads them ------------------------------------


def _detail_body(rows: list[dict], *, pretty: bool = False) -> bytes:
    """A json_detail body of ``rows`` (field name -> raw value; Decimals written as the numbers they are)."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    head = {
        "fields": {"dimensions": [{"name": name} for name in names]},
        "pivots": [],
        "ran_at": "2024-01-05",
    }
    cells = [json_bytes({name: {"value": value} for name, value in row.items()}) for row in rows]
    separator = b",\n  " if pretty else b","
    return json_bytes(head)[:-1] + b',"data":[' + separator.join(cells) + b'],"expired":false}'


def _ijson_rows(body: bytes) -> list[dict]:
    """The rows as ijson reads them (as LookStream read them before it parsed chunks of rows at once)."""
    items = IJSON.items(io.BytesIO(body), "data.item", use_float=False)
    return [{name: cell["value"] for name, cell in raw.items()} for raw in items]


def _typed(rows: list[dict]) -> list[list[tuple[str, str, str]]]:
    """Rows with the class of every value (1 == 1.0 == Decimal(1) == True, but not for a Segment trait)."""
    return [[(name, type(value).__name__, repr(value)) for name, value in row.items()] for row in rows]


def _tricky_rows(count: int) -> list[dict]:
    """Generated rows, some with a number beyond a float or 64 bits, or a string that looks like JSON."""
    rows = [dict(generated_row(index)) for index in range(count)]
    specials = [
        Decimal("0.1"),
        Decimal("-2.5E-7"),
        Decimal("1E+400"),
        2**64,
        -(2**63) - 1,
        2**63 - 1,
        'a},{"users.id":{"value":"x"}},{',
        '"data":[',
        [{"a": 1}, {"b": Decimal("2.5")}],
        {"k": [1, {"n": None}]},
        "\u00e9 \U0001f600",
        True,
        None,
    ]
    for index, value in enumerate(specials):
        rows[(index + 1) * count // (len(specials) + 1)]["users.sessions_count"] = value
    return rows


@pytest.mark.parametrize("pretty", [False, True])
@pytest.mark.parametrize("size", [7, 4096, 128 * 1024])
def test_rows_read_in_chunks_are_the_rows_ijson_reads(pretty, size):
    body = _detail_body(_tricky_rows(3000), pretty=pretty)
    assert len(body) > 4 * look_stream.CHUNK_BYTES  # several chunks
    stream = LookStream("1", _Trickle(body, size), _INFO, -1)
    rows = list(stream.rows)
    assert _typed(rows) == _typed(_ijson_rows(body))
    assert stream.row_count == 3000 and stream.exhausted
    first_special = rows[3000 // 14]["users.sessions_count"]
    assert (type(first_special), first_special) == (Decimal, Decimal("0.1"))  # not the float 0.1
    assert rows[1] == generated_row(1)


def test_numbers_are_read_exactly_in_chunks_of_any_size(monkeypatch):
    monkeypatch.setattr(look_stream, "CHUNK_BYTES", 300)  # a chunk of one or two rows
    rows = _tricky_rows(60)
    body = _detail_body(rows)
    read = list(LookStream("1", io.BytesIO(body), _INFO, -1).rows)
    assert _typed(read) == _typed(_ijson_rows(body))
    values = [row["users.sessions_count"] for row in read]
    assert Decimal("1E+400") in values and 2**64 in values and -(2**63) - 1 in values
    assert not any(isinstance(value, float) for value in values)


def test_rows_longer_than_a_chunk_or_than_the_pending_limit():
    rows = [dict(generated_row(index)) for index in range(200)]
    rows[50]["users.name"] = "x" * (look_stream.CHUNK_BYTES * 3)
    rows[120]["users.name"] = "y},{" * (look_stream.MAX_PENDING_BYTES // 3)
    body = _detail_body(rows)
    assert list(LookStream("1", io.BytesIO(body), _INFO, -1).rows) == rows


def test_a_looker_error_row_inside_a_chunk_is_reported_after_the_rows_before_it():
    rows: list[dict] = [generated_row(index) for index in range(3000)]
    body = _detail_body(rows).replace(
        json_bytes({k: {"value": v} for k, v in rows[2500].items()}), b'{"looker_error":"killed"}'
    )
    stream = LookStream("1", io.BytesIO(body), _INFO, -1)
    received = []
    with pytest.raises(LookQueryError, match=r"^Look 1: Looker could not run the query: killed$"):
        received.extend(stream.rows)
    assert received == rows[:2500] and stream.row_count == 2500


@pytest.mark.parametrize(
    ("garbage", "message"),
    [
        (
            b"<html>",
            "the body is not valid JSON (lexical error: invalid char in json text.; content type not",
        ),
        (b",]", "the body is not valid JSON (parse error: unallowed token at this point in JSON text"),
    ],
)
def test_bad_json_inside_the_rows_is_reported_after_the_rows_before_it(garbage, message):
    rows = [generated_row(index) for index in range(3000)]
    body = _detail_body(rows)
    cut = body.index(json_bytes({k: {"value": v} for k, v in rows[2000].items()})) - 1  # before its comma
    stream = LookStream("1", io.BytesIO(body[:cut] + garbage + body[cut:]), _INFO, -1)
    received = []
    with pytest.raises(LookStreamError) as caught:
        received.extend(stream.rows)
    assert str(caught.value).startswith(f"Look 1: result ended after 2,000 rows: {message}")
    assert received == rows[:2000] and stream.row_count == 2000


def test_the_row_count_of_a_stream_left_part_way():
    body = _detail_body([generated_row(index) for index in range(3000)])
    stream = LookStream("1", io.BytesIO(body), _INFO, -1)
    for _row in islice(stream.rows, 1500):
        pass
    stream.rows.close()  # type: ignore[attr-defined]
    assert stream.row_count == 1500 and not stream.exhausted


def test_an_html_page_with_http_200_is_not_json(hook, looker):
    looker.answer_html_next_runs(1, echo_authorization=True)
    with pytest.raises(LookStreamError) as caught:
        stream_all(hook, TOASTMATES_LOOK_ID)
    message = str(caught.value)
    assert message.startswith(
        "Look 1: result ended after 0 rows: the body is not valid JSON (lexical error: invalid char in json "
        "text.; content type text/html; charset=utf-8); the body starts with: '<!DOCTYPE html> <html> "
        "<head><title>Sign in - Corporate Access Gateway</title></head> <body> "
        "<!-- request headers: Authorization: Bearer *** --> <h1>"
    )
    assert len(message) < 500 and "\n" not in message
    assert hook.sdk.auth.token.access_token not in message
    assert len(looker.run_requests()) == 1  # not retried


def test_garbage_after_rows_is_not_json(hook, looker):
    looker.add_look(generated_look(5_000, look_id="42"))
    looker.garble_after("42", 4_000)
    received = []
    with pytest.raises(LookStreamError) as caught:
        with hook.stream_look(42) as stream:
            received.extend(stream.rows)
    message = str(caught.value)
    assert message.startswith(
        "Look 42: result ended after 4,000 rows: the body is not valid JSON (lexical error: invalid char in "
        "json text.; content type application/json; charset=utf-8); the last bytes received: '"
    )
    assert message.endswith(
        "<h1>Your session has expired</h1> <p>Sign in again to reach looker.example.com.</p> </body> </html>'"
    )
    assert len(received) == stream.row_count == 4_000
    assert received[-1] == generated_row(3_999)


def test_the_excerpt_is_redacted_before_it_is_cut():
    secret = "s3cr3t-" * 6
    body = io.BytesIO(("<html>" + "x" * 180 + secret + "</html>").encode())  # the secret spans char 200
    with pytest.raises(LookStreamError, match="not valid JSON") as caught:
        LookStream("1", body, _INFO, -1, redact=lambda text: text.replace(secret, "***"))
    assert str(caught.value).endswith("xxx***</html>'") and "s3cr" not in str(caught.value)


def test_a_body_ending_inside_a_row_is_a_closed_connection(hook, looker):
    # yajl calls this a "lexical error" too: only the end of the body tells it is not bad JSON
    looker.garble_after(TOASTMATES_LOOK_ID, 3, garbage=b',{"users.id":{"value":tr')
    with pytest.raises(LookStreamError, match=r"^Look 1: result ended after 3 rows: connection closed$"):
        stream_all(hook, TOASTMATES_LOOK_ID)


# --- the end of a run: one logout, failed or not ---------------------------------------------------------


class _CallerFailed(Exception):
    """Raised by the code using the stream (e.g. the delivery failed)."""


def test_a_run_ends_with_one_logout(looker, make_hook):
    with make_hook(looker.base_url) as hook, hook.stream_look(TOASTMATES_LOOK_ID) as stream:
        token = hook.sdk.auth.token.access_token
        assert len(list(stream.rows)) == 10
        assert looker.counters.get("logouts", 0) == 0
    assert looker.counters["logouts"] == 1
    assert not looker.token_valid(token)
    assert looker.requests[-1].method == "DELETE" and looker.requests[-1].path == "/api/4.0/logout"
    hook.close()  # closing again does not log out again
    assert looker.counters["logouts"] == 1


@pytest.mark.parametrize("failure", ["body cut off", "SQL error", "caller failed"])
def test_a_failed_run_ends_with_one_logout(looker, make_hook, failure):
    looker.add_look(generated_look(2_000, look_id="42"))
    looker.cut_connection_after("42", 1_000)
    look_id = {"body cut off": "42", "SQL error": SQL_ERROR_LOOK_ID}.get(failure, TOASTMATES_LOOK_ID)
    expected = _CallerFailed if failure == "caller failed" else LookerApiError
    with pytest.raises(expected):
        with make_hook(looker.base_url) as hook, hook.stream_look(look_id) as stream:
            for _row in stream.rows:
                if failure == "caller failed":
                    raise _CallerFailed
    assert looker.counters["logouts"] == 1
    assert looker.revoke_tokens() == 0  # no token left alive


def test_close_never_raises_nor_logs_a_secret(looker, make_hook, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    make_hook(looker.base_url).close()  # never logged in: nothing to log out of
    assert looker.counters.get("requests", 0) == 0
    hook = make_hook(looker.base_url, retries=0)
    assert hook.test_connection()[0]
    token = hook.sdk.auth.token.access_token
    looker.revoke_tokens()  # Looker answers the logout with 401
    hook.close()
    output = capfd.readouterr()
    logs = caplog.text + output.out + output.err
    assert "Could not log out of Looker (SDKError); the token expires on its own" in logs
    for secret in (token, CLIENT_SECRET):
        assert secret not in logs


# --- scale --------------------------------------------------------------------------------------------------

_STREAM_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    from airflow_provider_looker_segment.hooks.looker import LookerHook

    hook = LookerHook("looker_big", retries=0)
    count = 0
    with hook.stream_look(sys.argv[1]) as stream:
        for row in stream.rows:
            count += 1
    assert stream.exhausted and stream.row_count == count
    print(count, flush=True)
    """
)
# Runs the streaming script as its own child, so RUSAGE_CHILDREN is that one process's peak RSS.
_MEASURE = (
    "import resource, subprocess, sys\n"
    "subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2]], check=True)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def _peak_rss_streaming(looker: LookerStandIn, look_id: str, monkeypatch, tmp_path) -> tuple[int, float]:
    """Stream a Look in a fresh process; return (rows, peak RSS in MB)."""
    env_conn = connection_json(looker.base_url)
    monkeypatch.setenv("AIRFLOW_CONN_LOOKER_BIG", env_conn)
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, _STREAM_SCRIPT, look_id],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split()
    return int(lines[-2]), int(lines[-1]) / 1024


def test_one_million_rows_stream_in_bounded_memory(looker, monkeypatch, tmp_path):
    small_rows, small_mb = _peak_rss_streaming(
        looker, str(GENERATED_LOOK_BASE + 1_000), monkeypatch, tmp_path
    )
    rows, peak_mb = _peak_rss_streaming(looker, str(GENERATED_LOOK_BASE + 1_000_000), monkeypatch, tmp_path)
    print(f"peak RSS: {small_mb:.1f} MB for {small_rows:,} rows, {peak_mb:.1f} MB for {rows:,} rows")
    assert (small_rows, rows) == (1_000, 1_000_000)
    assert peak_mb < 150
    assert peak_mb - small_mb < 25  # memory does not grow with the number of rows
    assert looker.counters["rows_sent"] == 1_001_000
    assert json.dumps(looker.counters)  # counters stay plain data


# --- runs with filters ------------------------------------------------------------------------------------


def signup_days(looker: LookerStandIn) -> list[str]:
    """The days of Look 17's sign-ups, oldest first (two a day)."""
    return [row["users.created_date"] for row in looker.look(NEW_SIGNUPS_LOOK_ID).rows]


def test_filters_run_the_looks_query_with_them(hook, looker):
    with hook.stream_look(NEW_SIGNUPS_LOOK_ID, filters={"users.plan": "pro"}) as stream:
        rows = list(stream.rows)
    assert {row["users.plan"] for row in rows} == {"pro"} and len(rows) == 5
    assert stream.query == LookRunQuery(
        look_id="17",
        query_id="2000001",
        filters={"users.plan": "pro"},
        query_filters={"users.created_date": "7 days", "users.plan": "pro"},
        replaced={},
    )
    run = looker.run_requests()[0]
    assert run.path == "/api/4.0/queries/2000001/run/json_detail"
    assert run.query == {
        "apply_formatting": "false",
        "apply_vis": "false",
        "cache": "true",
        "generate_drill_links": "false",  # per-cell URLs the sync never reads
        "limit": "-1",
    }
    saved = looker.look(NEW_SIGNUPS_LOOK_ID).look_json()["query"]
    created = looker.queries.get("2000001")
    copied = ("model", "view", "fields", "sorts", "limit", "vis_config", "query_timezone", "total")
    assert {key: created[key] for key in copied} == {key: saved[key] for key in copied}
    assert created["filters"] == {"users.created_date": "7 days", "users.plan": "pro"}
    (sent,) = looker.queries.received
    assert saved["client_id"] and "client_id" not in sent  # a copied client_id would not be unique
    assert not ({"id", "can", "filter_config", "has_table_calculations"} & set(sent))


def test_filters_replace_the_looks_own_and_can_bind_a_data_interval(hook, looker):
    days = signup_days(looker)
    start, end = days[4], days[8]  # a two-day interval: [start, end)
    with hook.stream_look(NEW_SIGNUPS_LOOK_ID, filters={"users.created_date": f"{start} to {end}"}) as stream:
        rows = list(stream.rows)
    assert [row["users.created_date"] for row in rows] == days[4:8]
    assert stream.query.replaced == {"users.created_date": "7 days"}
    assert stream.query.query_filters == {"users.created_date": f"{start} to {end}"}
    assert (
        stream.query.describe() == f"users.created_date = '{start} to {end}' (replaces the Look's '7 days')"
    )
    with hook.stream_look(NEW_SIGNUPS_LOOK_ID, filters={"users.created_date": days[-1]}) as stream:
        assert [row["users.email"] for row in stream.rows] == [
            "signup.13@toastmates.com",
            "signup.14@toastmates.com",
        ]


def test_the_looks_metadata_rules_still_apply_with_filters(hook):
    with hook.stream_look(HIDDEN_FIELDS_LOOK_ID, filters={"users.internal_score": "NOT NULL"}) as stream:
        rows = list(stream.rows)
    assert [row["users.id"] for row in rows] == ["00MWWFOLRcETcTCf", "01HQZ3V8K2M5N7PB"]
    assert {f.name: f.hidden for f in stream.meta.fields}["users.internal_score"] is True  # vis_config
    assert {f.name: f.hidden for f in stream.meta.fields}["users.row_key"] is True  # LookML
    with hook.stream_look(TOASTMATES_LOOK_ID, filters={"users.name": "Ty Arthur"}) as stream:
        assert list(stream.rows) == [TOASTMATES_FIRST_ROW]
    assert stream.meta.field_by_name("users.email").tags == ("email",)
    plan = plan_transform(stream.meta)
    assert (plan.user_id.field, plan.email.field) == ("users.id", "users.email")


@pytest.mark.parametrize("filters", [None, {}])
def test_without_filters_the_saved_look_runs(hook, looker, filters):
    with hook.stream_look(NEW_SIGNUPS_LOOK_ID, filters=filters) as stream:
        assert len(list(stream.rows)) == 14
    assert stream.query is None
    assert looker.run_requests()[0].path == "/api/4.0/looks/17/run/json_detail"
    assert len(looker.queries) == 0


def test_the_log_says_which_filters_were_applied(hook, looker, caplog, capfd):
    caplog.set_level(logging.INFO)
    day = signup_days(looker)[0]
    filters = {"users.created_date": day, "users.plan": "free"}
    with hook.stream_look(NEW_SIGNUPS_LOOK_ID, filters=filters) as stream:
        assert [row["users.id"] for row in stream.rows] == ["11SH6M9P4S7V2Y5B"]
    logged = caplog.text + "".join(capfd.readouterr())
    assert (
        f"Running Look 17 (New sign-ups) with filters: users.created_date = '{day}' (replaces the Look's "
        "'7 days'); users.plan = 'free' (added) (Looker query 2000001): limit -1, cache True"
    ) in logged
    assert CLIENT_SECRET not in logged and hook.sdk.auth.token.access_token not in logged


@pytest.mark.parametrize(("validate_on_create", "status"), [(True, 422), (False, 400)])
def test_a_filter_on_a_field_not_in_the_explore_is_a_clear_error(hook, looker, validate_on_create, status):
    looker.validate_queries_on_create = validate_on_create
    filters = {"users.plan": "pro", "users.nope": "x"}
    with pytest.raises(LookFilterError) as caught:
        with hook.stream_look(NEW_SIGNUPS_LOOK_ID, filters=filters):
            pytest.fail("no stream expected")
    error = caught.value
    assert (error.status, error.look_id, error.fields) == (status, "17", ("users.nope",))
    assert str(error).startswith(
        "Look 17: Looker refused the filter on users.nope: a filter must name a field of the explore "
        "toastmates::users and give a Looker filter expression. "
    )
    assert "Invalid filter: users.nope" in str(error)
    assert isinstance(error, LookerApiError)
    with pytest.raises(LookFilterError) as caught:  # refused by create_query, or by create_query_task
        hook.start_query_task(NEW_SIGNUPS_LOOK_ID, filters=filters)
    assert (caught.value.status, caught.value.fields) == (status, ("users.nope",))
    assert looker.counters.get("query_tasks", 0) == 0


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        (["users.plan", "pro"], "filters must be a mapping of Looker field name to filter expression"),
        ({" ": "pro"}, "filters: ' ' is not a Looker field name"),
        ({"users.plan": " "}, "filters['users.plan'] is empty: Looker would ignore it"),
        ({"users.plan": None}, "filters['users.plan'] has no expression (None): give a Looker filter"),
        ({"users.plan": True}, "filters['users.plan'] must be a Looker filter expression (text), got True"),
        (
            {"users.plan": "pro", " users.plan ": "free"},
            "filters name the field users.plan twice: 'users.plan' and ' users.plan ' differ only by blanks",
        ),
    ],
)
def test_unusable_filters_are_refused_before_looker_is_called(hook, looker, filters, message):
    with pytest.raises(InvalidParameterError, match=re.escape(message)):
        with hook.stream_look(NEW_SIGNUPS_LOOK_ID, filters=filters):
            pass
    with pytest.raises(InvalidParameterError):
        hook.start_query_task(NEW_SIGNUPS_LOOK_ID, filters=filters)
    assert looker.counters.get("requests", 0) == 0


def test_a_long_filter_value_is_shortened_in_the_log(hook, looker, caplog, capfd):
    caplog.set_level(logging.INFO)
    ids = ",".join(f"u{number:07d}" for number in range(120_000))  # about 1 MB of user ids
    with hook.stream_look(ACCOUNT_USERS_LOOK_ID, filters={"users.id": ids}) as stream:
        assert list(stream.rows) == []
    assert looker.queries.received[-1]["filters"]["users.id"] == ids  # Looker gets it whole
    assert stream.query.filters["users.id"] == ids
    output = capfd.readouterr()
    logged = caplog.text + output.out + output.err
    assert "Running Look 16 (Account owners) with filters: users.id = 'u0000000,u0000001," in logged
    assert f"... ({len(ids):,} characters)' (added)" in logged
    assert ids not in logged and len(logged) < 20_000
    # The web URL with the filters would carry the megabyte too: the log shows the Look's own and says why.
    assert f"in Looker: {looker.base_url}/looks/16 (with the filters, its URL has " in logged


def test_a_filter_equal_to_the_looks_own_runs_the_same_rows(hook, looker):
    with hook.stream_look(NEW_SIGNUPS_LOOK_ID, filters={"users.created_date": "7 days"}) as stream:
        assert len(list(stream.rows)) == 14
    assert stream.query.describe() == "users.created_date = '7 days' (the Look's own)"


def test_numbers_are_filter_expressions_too(hook):
    with hook.stream_look(VALUE_TYPES_LOOK_ID, filters={"users.age": 34}) as stream:
        assert [row["users.id"] for row in stream.rows] == ["00MWWFOLRcETcTCf"]
    assert stream.query.filters == {"users.age": "34"}


# --- async query tasks ------------------------------------------------------------------------------------


def complete(looker: LookerStandIn, task_id: str) -> list[str]:
    """Poll the stand-in's task (as Looker's status requests do) until it ends; return what was seen."""
    for _ in range(10):
        task = looker.query_tasks.look_at(task_id, looker.polls_per_step)
        if task.status in ("complete", "error", "killed", "expired"):
            return task.history
    raise AssertionError("the task did not end")


def test_a_query_task_of_a_look_as_saved(hook, looker):
    task_id = hook.start_query_task(TRUNCATED_LOOK_ID, limit=None, cache=False)
    task = looker.query_tasks.get(task_id)
    assert (task.query_id, task.look_id, task.result_format) == ("100012", "12", "json_detail")
    started = next(r for r in looker.requests if r.path == "/api/4.0/query_tasks")
    assert started.query == {
        "apply_formatting": "false",
        "apply_vis": "false",
        "cache": "false",
        "generate_drill_links": "false",
    }
    assert task.json()["generate_links"] is False
    assert [hook.query_task_status(task_id) for _ in range(3)] == ["added", "running", "complete"]
    with hook.stream_query_task(task_id, TRUNCATED_LOOK_ID, None) as stream:
        rows = list(stream.rows)
    assert len(rows) == 5 and stream.possibly_truncated and stream.meta.limit == 5  # the saved limit
    assert looker.requests[-1].path == f"/api/4.0/query_tasks/{task_id}/results"
    assert len(looker.queries) == 0


def test_a_query_task_with_filters_gives_what_the_run_gives(hook, looker):
    filters = {"users.created_date": f"after {signup_days(looker)[10]}"}
    with hook.stream_look(NEW_SIGNUPS_LOOK_ID, filters=filters) as stream:
        expected, expected_meta = list(stream.rows), stream.meta
    task_id = hook.start_query_task(NEW_SIGNUPS_LOOK_ID, limit=-1, filters=filters)
    task = looker.query_tasks.get(task_id)
    assert task.query_id == "2000001"  # the same filtered query as the run's
    assert looker.requests[-1].query["limit"] == "-1"
    complete(looker, task_id)
    with hook.stream_query_task(task_id, NEW_SIGNUPS_LOOK_ID, -1) as stream:
        rows = list(stream.rows)
    assert rows == expected and len(rows) == 4
    assert stream.meta.fields == expected_meta.fields and stream.exhausted and not stream.possibly_truncated


@pytest.mark.parametrize("pending", [202, 204])
def test_results_of_a_task_that_has_not_ended(make_hook, pending, monkeypatch):
    with LookerStandIn(pending_results_status=pending, polls_per_step=2) as looker:
        hook = make_hook(looker.base_url)
        task_id = hook.start_query_task(TOASTMATES_LOOK_ID)
        with pytest.raises(QueryTaskError) as caught:
            monkeypatch.setattr(looker_hook, "RESULTS_WAIT", 0)  # ask once
            with hook.stream_query_task(task_id, TOASTMATES_LOOK_ID):
                pytest.fail("no stream expected")
        error = caught.value
        assert (error.status, error.task_id, error.task_status, error.look_id) == (
            pending,
            task_id,
            "added",  # its status, asked when the results were not ready
            "1",
        )
        assert str(error) == (
            f"Reading the results of Looker query task {task_id} (Look 1): Looker answered HTTP {pending} "
            "(results not ready): the task has not completed (its status is added); wait for its status to "
            "be complete before reading its results"
        )
        # waiting: the results are asked for again until the task ends (each ask moves the stand-in's task on)
        monkeypatch.setattr(looker_hook, "RESULTS_WAIT", 30)
        monkeypatch.setattr(looker_hook, "RESULTS_POLL_INTERVAL", 0.01)
        with hook.stream_query_task(task_id, TOASTMATES_LOOK_ID) as stream:
            assert len(list(stream.rows)) == 10
        assert looker.query_tasks.get(task_id).history == ["added", "added", "running", "running", "complete"]


def test_results_not_ready_after_complete_are_asked_for_again_briefly(hook, looker, monkeypatch):
    """Looker may answer 202 right after the task reported complete: asked again, then read."""
    task_id = hook.start_query_task(TOASTMATES_LOOK_ID)
    assert [hook.query_task_status(task_id) for _ in range(3)] == ["added", "running", "complete"]
    looker.delay_results_after_complete(2)
    monkeypatch.setattr(looker_hook, "RESULTS_POLL_INTERVAL", 0.01)
    with hook.stream_query_task(task_id, TOASTMATES_LOOK_ID) as stream:
        assert len(list(stream.rows)) == 10
    results = [r.status for r in looker.requests if r.path.endswith("/results")]
    assert results == [202, 202, 200]


def test_results_still_not_ready_after_the_wait_fail_saying_what_happened(hook, looker, monkeypatch):
    task_id = hook.start_query_task(TOASTMATES_LOOK_ID)
    assert [hook.query_task_status(task_id) for _ in range(3)] == ["added", "running", "complete"]
    looker.delay_results_after_complete(1000)
    with pytest.raises(QueryTaskError) as caught:
        monkeypatch.setattr(looker_hook, "RESULTS_WAIT", 0.2)
        monkeypatch.setattr(looker_hook, "RESULTS_POLL_INTERVAL", 0.05)
        with hook.stream_query_task(task_id, TOASTMATES_LOOK_ID):
            pytest.fail("no stream expected")
    asks = len([r for r in looker.requests if r.path.endswith("/results")])
    assert asks >= 2  # asked again (bounded by the wait), not failed at once
    assert str(caught.value) == (
        f"Reading the results of Looker query task {task_id} (Look 1): Looker answered HTTP 202 (results not "
        f"ready) after asking {asks} times over 0.2 s, although the task's status is complete: Looker did "
        "not hand over the results; let the task retry (it starts a new query task)"
    )
    assert (caught.value.status, caught.value.task_status) == (202, "complete")


def test_a_failed_query_task_raises_lookers_sql_error(hook, looker):
    task_id = hook.start_query_task(SQL_ERROR_LOOK_ID)
    assert complete(looker, task_id)[-1] == "error"
    with pytest.raises(LookQueryError) as caught:
        with hook.stream_query_task(task_id, SQL_ERROR_LOOK_ID):
            pytest.fail("no stream expected")
    assert str(caught.value) == (
        "Look 10: Looker could not run the query: An error occurred while running the query: ERROR: column "
        "users.last_login does not exist\n  Position: 87"
    )
    looker.end_next_query_tasks("error")
    task_id = hook.start_query_task(TOASTMATES_LOOK_ID)
    complete(looker, task_id)
    with pytest.raises(LookQueryError, match=r"could not run the query: Query failed: the stand-in was told"):
        with hook.stream_query_task(task_id, TOASTMATES_LOOK_ID):
            pass


def test_errors_that_are_notes_do_not_fail_a_result():
    head = b'{"fields":{"dimensions":[{"name":"users.name"}]},"data":[],'
    notes = (
        b'"errors":[{"message":"Note: This query contains derived tables with Development Mode filters."}]}'
    )
    stream = LookStream("1", io.BytesIO(head + notes), _INFO, -1)
    assert list(stream.rows) == []
    broken = b'{"data":[],"errors":[{"message":"SQL error","message_details":"near SELEC"},"disk full"]}'
    with pytest.raises(
        LookQueryError, match=r"^Look 1: Looker could not run the query: SQL error: near SELEC \| disk"
    ):
        LookStream("1", io.BytesIO(broken), _INFO, -1)


@pytest.mark.parametrize("outcome", ["killed", "expired"])
def test_results_of_a_killed_or_expired_task(hook, looker, outcome):
    looker.end_next_query_tasks(outcome)
    task_id = hook.start_query_task(TOASTMATES_LOOK_ID)
    assert complete(looker, task_id)[-1] == outcome
    assert hook.query_task_status(task_id) == outcome
    with pytest.raises(QueryTaskError, match="Looker has no results for it \\(HTTP 404\\)") as caught:
        with hook.stream_query_task(task_id, TOASTMATES_LOOK_ID):
            pass
    assert (caught.value.status, caught.value.task_id) == (404, task_id)


def test_kill_query_task(hook, looker):
    looker.end_next_query_tasks("never")
    task_id = hook.start_query_task(TOASTMATES_LOOK_ID)
    assert hook.query_task_status(task_id) == "added"
    assert hook.kill_query_task(task_id) is True
    assert hook.query_task_status(task_id) == "killed"
    assert hook.kill_query_task(task_id) is False  # nothing left to kill
    assert looker.counters["queries_killed"] == 1


def test_unknown_query_tasks(hook):
    with pytest.raises(QueryTaskError) as caught:
        hook.query_task_status("0123abc")
    assert (
        str(caught.value)
        == "Looker has no query task 0123abc (HTTP 404): it is unknown or its results expired"
    )
    assert hook.kill_query_task("0123abc") is False
    with pytest.raises(LookerApiError, match="A query task id is required"):
        hook.query_task_status(" ")


def test_query_tasks_of_missing_or_deleted_looks(hook, looker):
    with pytest.raises(LookNotFoundError):
        hook.start_query_task("999")
    with pytest.raises(LookDeletedError):
        hook.start_query_task(DELETED_LOOK_ID)
    assert looker.counters.get("query_tasks", 0) == 0


def test_query_task_status_polls_are_retried(hook, looker):
    task_id = hook.start_query_task(TOASTMATES_LOOK_ID)
    looker.fail_next_task_polls(2, status=503)
    assert hook.query_task_status(task_id) == "added"
    looker.fail_next_task_polls(3, status=503)
    with pytest.raises(LookerApiError, match=r"Reading Looker query task .* failed \(HTTP 503\)"):
        hook.query_task_status(task_id)


def test_query_tasks_never_leak_secrets_and_end_with_one_logout(looker, make_hook, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    with make_hook(looker.base_url) as hook:
        task_id = hook.start_query_task(NEW_SIGNUPS_LOOK_ID, filters={"users.plan": "pro"})
        token = hook.sdk.auth.token.access_token
        complete(looker, task_id)
        with hook.stream_query_task(task_id, NEW_SIGNUPS_LOOK_ID) as stream:
            assert len(list(stream.rows)) == 5
        with pytest.raises(QueryTaskError) as caught:
            hook.query_task_status("nope")
    assert looker.counters["logouts"] == 1
    output = capfd.readouterr()
    for text in (caplog.text, output.out, output.err, str(caught.value)):
        assert CLIENT_SECRET not in text and token not in text
    assert "Started Looker query task" in caplog.text + output.out + output.err
