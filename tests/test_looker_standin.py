"""The Looker API 4.0 stand-in, exercised with the unmodified looker_sdk and with plain HTTP requests."""

from __future__ import annotations

import csv
import io
import json
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import date, datetime, timezone
from decimal import Decimal

import looker_sdk
import pytest
import requests
from looker_helpers import CLIENT_ID, CLIENT_SECRET, make_self_signed_cert, unmodified_sdk
from looker_sdk import error as sdk_error
from looker_sdk.sdk.api40 import models as models40
from standins.looker_fixtures import (
    DELETED_LOOK_ID,
    EDGE_VALUES_LOOK_ID,
    GENERATED_LOOK_BASE,
    HIDDEN_FIELDS_LOOK_ID,
    NEW_SIGNUPS_LOOK_ID,
    PIVOT_LOOK_ID,
    SQL_ERROR_LOOK_ID,
    TOASTMATES_FIRST_ROW,
    TOASTMATES_LOOK_ID,
    TRUNCATED_LOOK_ID,
    VALUE_TYPES_LOOK_ID,
    FixtureLook,
    fixture_looks,
    generated_look,
    generated_row,
    look_id_of_query,
    look_query_id,
    new_signups,
)
from standins.looker_queries import QUERY_KEYS
from standins.looker_standin import DOCS_BASE, PROXY_PAGE, LookerStandIn

DOCS_PREFIX = "https://docs.cloud.google.com/looker/docs/r/err/"


@pytest.fixture
def looker():
    with LookerStandIn() as standin:
        yield standin


@pytest.fixture
def sdk(looker, monkeypatch):
    """The unmodified looker_sdk, configured the documented way (LOOKERSDK_* variables)."""
    return unmodified_sdk(looker.base_url, monkeypatch)


def login(looker: LookerStandIn) -> str:
    answer = requests.post(
        f"{looker.base_url}/api/4.0/login", data={"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    )
    assert answer.status_code == 200
    return answer.json()["access_token"]


def run(looker: LookerStandIn, look_id: str, fmt: str, token: str, **params: str) -> requests.Response:
    return requests.get(
        f"{looker.base_url}/api/4.0/looks/{look_id}/run/{fmt}",
        params=params,
        headers={"Authorization": f"token {token}"},
        timeout=10,
    )


# --- looker_sdk against the stand-in ----------------------------------------------------------------------


def test_sdk_logs_in_reads_the_user_and_a_look(sdk, looker):
    assert sdk.me().display_name == "Demo API"
    look = sdk.look(TOASTMATES_LOOK_ID)
    assert look.title == "Active users, last 30 days"
    assert (look.query.model, look.query.view, look.query.limit) == ("toastmates", "users", "500")
    assert look.query.fields == ["users.id", "users.name", "users.email", "users.sessions_count"]
    assert look.query.vis_config["hidden_fields"] == []
    assert look.deleted is False
    assert looker.counters["logins"] == 1
    assert all(r.auth_scheme == "bearer" for r in looker.requests if r.path != "/api/4.0/login")


def test_sdk_runs_a_look_in_json_csv_and_json_detail(sdk):
    rows = json.loads(sdk.run_look(TOASTMATES_LOOK_ID, "json"))
    assert rows[0] == TOASTMATES_FIRST_ROW
    assert len(rows) == 10

    lines = list(csv.reader(io.StringIO(sdk.run_look(TOASTMATES_LOOK_ID, "csv"))))
    assert lines[0] == ["Users User ID", "Users Name", "Users Email", "Users Sessions Count"]
    assert lines[1] == ["00MWWFOLRcETcTCf", "Ty Arthur", "ty.arthur@segment.com", "2"]

    detail = json.loads(
        sdk.run_look(TOASTMATES_LOOK_ID, "json_detail", apply_formatting=False, generate_drill_links=False)
    )
    assert list(detail)[: list(detail).index("data")] == [
        "id",
        "from_cache",
        "fields",
        "pivots",
        "ran_at",
        "timezone",
        "runtime",
        "has_totals",
        "has_subtotals",
        "has_row_totals",
        "sql",
    ]
    user_id = detail["fields"]["dimensions"][0]
    assert {
        k: user_id[k] for k in ("name", "label", "label_short", "type", "tags", "hidden", "category")
    } == {
        "name": "users.id",
        "label": "Users User ID",
        "label_short": "User ID",
        "type": "string",
        "tags": ["user_id"],
        "hidden": False,
        "category": "dimension",
    }
    assert detail["fields"]["dimensions"][3]["is_numeric"] is True
    assert detail["data"][0] == {k: {"value": v} for k, v in TOASTMATES_FIRST_ROW.items()}


def test_sdk_wrong_credentials_fail_with_lookers_404(looker, monkeypatch):
    monkeypatch.setenv("LOOKERSDK_BASE_URL", looker.base_url)
    monkeypatch.setenv("LOOKERSDK_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("LOOKERSDK_CLIENT_SECRET", "not-the-secret")
    with pytest.raises(sdk_error.SDKError) as caught:
        looker_sdk.init40().me()
    body = json.loads(caught.value.message)
    assert body == {"message": "Not found", "documentation_url": f"{DOCS_BASE}/404/post/login"}
    assert looker.counters["failed_logins"] == 1


def test_error_documentation_urls_are_not_fetched_by_the_sdk(sdk):
    with pytest.raises(sdk_error.SDKError) as caught:
        sdk.look("999")
    assert caught.value.message == "Not found"
    assert caught.value.documentation_url.startswith(DOCS_PREFIX)
    # looker_sdk downloads documentation only for URLs its pattern matches (docs.looker.com, cloud.google.com)
    assert sdk_error.ErrorDocHelper.pattern.search(caught.value.documentation_url) is None
    assert caught.value.error_doc_url == ""


def test_sdk_logout_ends_the_session(sdk, looker):
    sdk.me()
    token = sdk.auth.token.access_token
    sdk.auth.logout()
    assert looker.counters["logouts"] == 1
    assert looker.requests[-1].path == "/api/logout"
    assert not looker.token_valid(token)


# --- HTTP behaviour ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["Bearer", "token", "bearer"])
def test_bearer_and_token_schemes_are_accepted(looker, scheme):
    token = login(looker)
    answer = requests.get(f"{looker.base_url}/api/4.0/user", headers={"Authorization": f"{scheme} {token}"})
    assert answer.status_code == 200
    assert looker.requests[-1].auth_scheme == scheme.lower()


@pytest.mark.parametrize("header", [None, "Bearer nope", "Basic abc"])
def test_missing_or_bad_token_is_a_lookers_401(looker, header):
    headers = {"Authorization": header} if header else {}
    answer = requests.get(f"{looker.base_url}/api/4.0/looks/1", headers=headers)
    assert answer.status_code == 401
    assert answer.json() == {
        "message": "Requires authentication.",
        "documentation_url": f"{DOCS_BASE}/401/get/looks/:look_id",
    }
    assert looker.requests[-1].authorization is (header is not None)


def test_wrong_credentials_answer_404_without_echoing_them(looker):
    answer = requests.post(
        f"{looker.base_url}/api/4.0/login", data={"client_id": CLIENT_ID, "client_secret": "wrong-secret-42"}
    )
    assert answer.status_code == 404
    assert answer.json()["documentation_url"].startswith(DOCS_PREFIX)
    assert "wrong-secret-42" not in answer.text


@pytest.mark.parametrize("path", ["/api/logout", "/api/4.0/logout"])
def test_logout_paths_revoke_the_token(looker, path):
    token = login(looker)
    assert (
        requests.delete(f"{looker.base_url}{path}", headers={"Authorization": f"token {token}"}).status_code
        == 204
    )
    assert (
        requests.get(
            f"{looker.base_url}/api/4.0/user", headers={"Authorization": f"token {token}"}
        ).status_code
        == 401
    )


def test_tokens_expire_after_their_lifetime():
    with LookerStandIn(token_lifetime=0.3, advertised_token_lifetime=3600) as looker:
        answer = requests.post(
            f"{looker.base_url}/api/4.0/login", data={"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
        ).json()
        assert answer["expires_in"] == 3600
        assert answer["token_type"] == "Bearer"
        headers = {"Authorization": f"Bearer {answer['access_token']}"}
        assert requests.get(f"{looker.base_url}/api/4.0/user", headers=headers).status_code == 200
        time.sleep(0.4)
        assert requests.get(f"{looker.base_url}/api/4.0/user", headers=headers).status_code == 401


def test_revoked_tokens_are_refused(looker):
    token = login(looker)
    assert looker.revoke_tokens() == 1
    assert run(looker, TOASTMATES_LOOK_ID, "json", token).status_code == 401


def test_limit_defaults_to_the_saved_limit_and_minus_one_means_all(looker):
    token = login(looker)
    assert len(run(looker, TRUNCATED_LOOK_ID, "json", token).json()) == 5
    assert len(run(looker, TRUNCATED_LOOK_ID, "json", token, limit="-1").json()) == 8
    assert len(run(looker, TRUNCATED_LOOK_ID, "json", token, limit="3").json()) == 3
    assert len(run(looker, TRUNCATED_LOOK_ID, "json_detail", token).json()["data"]) == 5
    assert len(run(looker, TRUNCATED_LOOK_ID, "csv", token, limit="-1").text.splitlines()) == 9


def test_run_parameters_are_recorded_and_apply_vis_drops_hidden_fields(looker):
    token = login(looker)
    params = {"limit": "-1", "apply_formatting": "false", "apply_vis": "true", "cache": "false"}
    rows = run(looker, HIDDEN_FIELDS_LOOK_ID, "json", token, **params).json()
    assert "users.internal_score" not in rows[0]
    assert "users.internal_score" in run(looker, HIDDEN_FIELDS_LOOK_ID, "json", token).json()[0]
    recorded = looker.run_requests()[0]
    assert recorded.query == params
    assert (recorded.authorization, recorded.auth_scheme, recorded.status) == (True, "token", 200)


def test_deleted_look_is_served_with_its_flag_but_does_not_run(sdk, looker):
    assert sdk.look(DELETED_LOOK_ID).deleted is True
    token = login(looker)
    assert run(looker, DELETED_LOOK_ID, "json", token).status_code == 404


def test_sql_failure_is_http_200_with_a_looker_error_row_in_json(looker):
    token = login(looker)
    answer = run(looker, SQL_ERROR_LOOK_ID, "json", token)
    assert answer.status_code == 200
    assert list(answer.json()[0]) == ["looker_error"]
    assert "users.last_login does not exist" in answer.json()[0]["looker_error"]


def test_sql_failure_of_a_json_detail_run_has_the_json_detail_shape(looker):
    """The reference: json_detail reports a failed query in ``errors``, with an empty ``data``."""
    token = login(looker)
    answer = run(looker, SQL_ERROR_LOOK_ID, "json_detail", token)
    assert answer.status_code == 200
    detail = answer.json()
    assert isinstance(detail, dict) and detail["data"] == []
    (error,) = detail["errors"]
    assert "users.last_login does not exist" in error["message"] and error["level"] == "error"


def test_json_detail_cells_carry_drill_links_unless_asked_not_to(looker):
    """Looker's default (generate_drill_links=true): every cell with a value carries its drill links."""
    token = login(looker)
    detail = run(looker, TOASTMATES_LOOK_ID, "json_detail", token).json()
    cell = detail["data"][0]["users.id"]
    assert cell["value"] == "00MWWFOLRcETcTCf"
    assert cell["links"] == [
        {
            "label": "Users User ID details",
            "url": "/explore/toastmates/users?fields=users.detail*&f[users.id]=00MWWFOLRcETcTCf&limit=500",
            "type": "drill",
            "type_label": None,
        }
    ]
    pivoted = run(looker, PIVOT_LOOK_ID, "json_detail", token).json()["data"][0]["orders.count"]["complete"]
    assert pivoted["links"][0]["type"] == "measure_default"
    assert pivoted["links"][0]["label"].startswith("Show All")
    plain = run(looker, TOASTMATES_LOOK_ID, "json_detail", token, generate_drill_links="false")
    with_links = run(looker, TOASTMATES_LOOK_ID, "json_detail", token, generate_drill_links="true")
    assert all(set(c) == {"value"} for row in plain.json()["data"] for c in row.values())
    assert len(with_links.content) > 2 * len(plain.content)
    generated = run(looker, str(GENERATED_LOOK_BASE + 3), "json_detail", token).json()["data"]
    email_drill = generated[2]["users.email"]["links"][0]["url"]
    assert email_drill.endswith("f[users.email]=user00000002%40example.com&limit=500")


def test_pivoted_look_nests_measures_by_pivot_key(looker):
    token = login(looker)
    detail = run(looker, PIVOT_LOOK_ID, "json_detail", token, generate_drill_links="false").json()
    assert [p["key"] for p in detail["pivots"]] == ["complete", "pending", "cancelled"]
    assert detail["fields"]["pivots"][0]["name"] == "orders.status"
    assert detail["data"][1]["orders.count"]["pending"] == {"value": None}
    assert detail["data"][0]["users.id"] == {"value": "00MWWFOLRcETcTCf"}


def test_edge_values_are_written_as_exact_json_numbers_and_surrogate_escapes(looker):
    token = login(looker)
    answer = run(looker, EDGE_VALUES_LOOK_ID, "json_detail", token, generate_drill_links="false")
    text = answer.content.decode("utf-8")  # valid UTF-8: lone surrogates are escapes, not bytes
    assert '"users.external_id":{"value":18446744073709551616}' in text
    assert '"users.score":{"value":1E+400}' in text and '"users.score":{"value":-1E+400}' in text
    assert '"Ty \\ud800Arthur"' in text and '"Marcus \\ud83d\\ude00"' in text
    rows = [{k: c["value"] for k, c in row.items()} for row in json.loads(text, parse_float=Decimal)["data"]]
    assert rows[0] == {
        "users.id": "  00MWWFOLRcETcTCf ",
        "users.email": "ty.arthur@segment.com",
        "users.name": "Ty \ud800Arthur",
        "users.external_id": 2**64,
        "users.score": Decimal("1E+400"),
    }
    assert [r["users.id"] for r in rows] == [rows[0]["users.id"], 2**64, Decimal("42.0"), "   "]
    assert [r["users.external_id"] for r in rows][1:] == [-(2**64) - 1, 2**63 - 1, 0]
    assert rows[2]["users.name"] == "Marcus 😀"
    assert json.loads(run(looker, EDGE_VALUES_LOOK_ID, "json", token).text)[0]["users.external_id"] == 2**64
    lines = run(looker, EDGE_VALUES_LOOK_ID, "csv", token).text.splitlines()
    assert lines[1:4] == [
        "  00MWWFOLRcETcTCf ,ty.arthur@segment.com,Ty \ufffdArthur,18446744073709551616,1E+400",
        "18446744073709551616,priya.raman@toastmates.com,Priya \ufffdRaman,-18446744073709551617,-1E+400",
        "42.0,marcus.oyelaran@example.org,Marcus 😀,9223372036854775807,1.5",
    ]


def test_generated_look_streams_in_chunks(looker):
    looker.chunk_rows = 700
    token = login(looker)
    look_id = str(GENERATED_LOOK_BASE + 5000)
    answer = run(looker, look_id, "json_detail", token, limit="-1")
    assert answer.headers["Transfer-Encoding"] == "chunked"
    data = answer.json()["data"]
    assert len(data) == 5000
    assert {k: c["value"] for k, c in data[4999].items()} == generated_row(4999)
    assert [row for row in run(looker, look_id, "json", token, limit="-1").json()][:2] == [
        generated_row(0),
        generated_row(1),
    ]
    lines = list(csv.reader(io.StringIO(run(looker, look_id, "csv", token, limit="10").text)))
    assert lines[1] == [str(v) for v in generated_row(0).values()]
    assert len(lines) == 11
    assert looker.counters["rows_sent"] == 5000 + 5000 + 10


def test_looks_can_be_added_and_removed_at_runtime(sdk, looker):
    base = fixture_looks()[TOASTMATES_LOOK_ID]
    looker.add_look(FixtureLook("500", "Added", "toastmates", "users", base.fields, base.rows[:2], "10"))
    looker.add_look(generated_look(3, look_id="501"))
    assert sdk.look("500").title == "Added"
    assert len(json.loads(sdk.run_look("500", "json"))) == 2
    assert json.loads(sdk.run_look("501", "json"))[2] == generated_row(2)
    looker.remove_look("500")
    with pytest.raises(sdk_error.SDKError):
        sdk.look("500")


def test_unknown_paths_and_formats(looker):
    token = login(looker)
    assert requests.get(f"{looker.base_url}/api/4.0/nope").status_code == 404
    assert run(looker, TOASTMATES_LOOK_ID, "png", token).status_code == 400
    versions = requests.get(f"{looker.base_url}/api/versions").json()
    assert versions["current_version"]["version"] == "4.0"


# --- fault injection --------------------------------------------------------------------------------------


def test_fail_next_runs_answers_status_and_retry_after(looker):
    token = login(looker)
    looker.fail_next_runs(2, status=429, retry_after=1)
    for _ in range(2):
        answer = run(looker, TOASTMATES_LOOK_ID, "json", token)
        assert (answer.status_code, answer.headers["Retry-After"]) == (429, "1")
        assert answer.json()["documentation_url"].startswith(DOCS_PREFIX)
    assert run(looker, TOASTMATES_LOOK_ID, "json", token).status_code == 200


def test_drop_next_runs_closes_without_answering(looker):
    token = login(looker)
    looker.drop_next_runs(1)
    with pytest.raises(requests.ConnectionError):
        run(looker, TOASTMATES_LOOK_ID, "json", token)
    assert run(looker, TOASTMATES_LOOK_ID, "json", token).status_code == 200


def test_cut_connection_after_rows(looker):
    token = login(looker)
    looker.cut_connection_after(TOASTMATES_LOOK_ID, 7)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        run(looker, TOASTMATES_LOOK_ID, "json_detail", token).json()
    assert looker.counters["rows_sent"] == 7
    assert len(run(looker, TOASTMATES_LOOK_ID, "json_detail", token).json()["data"]) == 10


def test_garble_after_rows_sends_garbage_and_ends_the_body(looker):
    token = login(looker)
    looker.garble_after(TOASTMATES_LOOK_ID, 3)
    answer = run(looker, TOASTMATES_LOOK_ID, "json_detail", token)  # the whole body arrives
    assert (answer.status_code, answer.headers["Content-Type"]) == (200, "application/json; charset=utf-8")
    assert answer.content.endswith(b"}}" + PROXY_PAGE)
    assert answer.content.count(b'{"users.id":{"value"') == 3
    with pytest.raises(ValueError):
        answer.json()
    assert looker.counters["rows_sent"] == 3
    looker.garble_after(TOASTMATES_LOOK_ID, 0, garbage=b"upstream timed out")
    body = run(looker, TOASTMATES_LOOK_ID, "json_detail", token).content
    assert body.endswith(b'"data":[upstream timed out')
    assert len(run(looker, TOASTMATES_LOOK_ID, "json_detail", token).json()["data"]) == 10


def test_answer_html_next_runs_serves_a_gateway_page_with_http_200(looker):
    token = login(looker)
    looker.answer_html_next_runs(2)
    answer = run(looker, TOASTMATES_LOOK_ID, "json_detail", token)
    assert (answer.status_code, answer.headers["Content-Type"]) == (200, "text/html; charset=utf-8")
    assert answer.content == PROXY_PAGE and answer.text.startswith("<!DOCTYPE html>")
    assert run(looker, TOASTMATES_LOOK_ID, "csv", token).content == PROXY_PAGE
    assert len(run(looker, TOASTMATES_LOOK_ID, "json_detail", token).json()["data"]) == 10
    looker.answer_html_next_runs(1, echo_authorization=True)
    assert f"Authorization: token {token} -->" in run(looker, TOASTMATES_LOOK_ID, "json", token).text
    assert [r.status for r in looker.run_requests()] == [200] * 4


def test_delay_applies_to_matching_paths(looker):
    token = login(looker)
    looker.set_delay(1.0, path_prefix="/api/4.0/user")
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(
            f"{looker.base_url}/api/4.0/user", headers={"Authorization": f"token {token}"}, timeout=0.2
        )
    assert run(looker, TOASTMATES_LOOK_ID, "json", token).status_code == 200
    looker.clear_faults()


def test_counters_are_thread_safe(looker):
    def many_logins() -> None:
        with requests.Session() as session:
            for _ in range(10):
                form = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
                assert session.post(f"{looker.base_url}/api/4.0/login", data=form).status_code == 200

    threads = [threading.Thread(target=many_logins) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert looker.counters["logins"] == 80
    assert len(looker.requests) == 80


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_https_with_a_self_signed_certificate(tmp_path):
    cert, key = make_self_signed_cert(tmp_path)
    with LookerStandIn(tls_certfile=cert, tls_keyfile=key) as looker:
        assert looker.base_url.startswith("https://127.0.0.1:")
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{looker.base_url}/api/versions", timeout=5)
        assert requests.get(f"{looker.base_url}/api/versions", verify=False, timeout=5).status_code == 200


# --- the module entry point -------------------------------------------------------------------------------


def test_module_entry_point_serves_until_interrupted():
    process = subprocess.Popen(
        [sys.executable, "-m", "standins.looker_standin", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        first = process.stdout.readline().strip()
        url = first.rsplit(" ", 1)[-1]
        assert first.startswith("Looker API stand-in listening on http://127.0.0.1:")
        assert process.stdout.readline().strip() == f"client_id={CLIENT_ID} client_secret={CLIENT_SECRET}"
        assert json.loads(process.stdout.readline().split("=", 1)[1].strip("'\n"))["host"] == url
        answer = requests.post(
            f"{url}/api/4.0/login", data={"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}, timeout=5
        )
        assert answer.status_code == 200
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()


# --- queries and filters ----------------------------------------------------------------------------------


def post(
    looker: LookerStandIn, path: str, token: str | None, body: object, **params: str
) -> requests.Response:
    headers = {"Authorization": f"token {token}"} if token else {}
    return requests.post(
        f"{looker.base_url}/api/4.0/{path}", json=body, params=params, headers=headers, timeout=10
    )


def get(looker: LookerStandIn, path: str, token: str, **params: str) -> requests.Response:
    headers = {"Authorization": f"token {token}"}
    return requests.get(f"{looker.base_url}/api/4.0/{path}", params=params, headers=headers, timeout=10)


def look_query(look_id: str, **filters: str) -> dict:
    """The writable part of a fixture Look's query, with ``filters`` over its own."""
    query = fixture_looks()[look_id].look_json()["query"]
    body = {key: query[key] for key in QUERY_KEYS if key in query}
    body["filters"] = {**(query["filters"] or {}), **filters}
    return body


def ids(rows: list[dict]) -> list[str]:
    return [row["users.id"] for row in rows]


def test_look_ids_and_query_ids_map_both_ways():
    looks = fixture_looks()
    assert [look_query_id(i) for i in ("1", "17", "42", "1001000")] == [
        "100001",
        "100017",
        "100042",
        "11001000",
    ]
    assert all(look_id_of_query(look_query_id(i)) == i for i in [*looks, "1001000", "2000000"])
    assert look_id_of_query("2000001") is None
    assert looks[TOASTMATES_LOOK_ID].look_json()["query_id"] == "100001"


def test_new_signups_look_has_two_signups_a_day_over_the_last_seven_days():
    look = new_signups(date(2026, 11, 27))
    days = [row["users.created_date"] for row in look.rows]
    assert days == [f"2026-11-{day}" for day in range(21, 28) for _ in range(2)]
    assert look.look_json()["query"]["filters"] == {"users.created_date": "7 days"}
    created = next(f for f in look.fields if f.name == "users.created_date")
    assert created.type == "date_date"
    today = fixture_looks()[NEW_SIGNUPS_LOOK_ID].rows[-1]["users.created_date"]
    assert today == datetime.now(timezone.utc).date().isoformat()


def test_sdk_creates_a_query_with_filters_and_runs_it(sdk, looker):
    look = sdk.look(NEW_SIGNUPS_LOOK_ID)
    query = look.query
    body = models40.WriteQuery(
        model=query.model,
        view=query.view,
        fields=query.fields,
        filters={**query.filters, "users.plan": "pro,enterprise"},
        sorts=query.sorts,
        limit=query.limit,
        vis_config=query.vis_config,
    )
    created = sdk.create_query(body)
    assert created.id == "2000001" and created.filters["users.plan"] == "pro,enterprise"
    assert sdk.create_query(body).id == "2000001"  # an identical query is the existing one
    assert sdk.query("2000001").model == "toastmates"
    rows = json.loads(sdk.run_query("2000001", "json"))
    plans = {row["users.plan"] for row in rows}
    assert plans == {"pro", "enterprise"} and len(rows) == 7
    detail = json.loads(sdk.run_query("2000001", "json_detail", limit=2))
    assert len(detail["data"]) == 2 and detail["fields"]["dimensions"][4]["name"] == "users.created_date"
    assert looker.counters["runs"] == 2


def test_a_looks_query_id_runs_the_look(sdk, looker):
    token = login(looker)
    by_query = get(looker, f"queries/{look_query_id(TRUNCATED_LOOK_ID)}/run/json", token).json()
    assert by_query == run(looker, TRUNCATED_LOOK_ID, "json", token).json()
    assert len(by_query) == 5  # the saved limit, as for the Look
    assert len(get(looker, "queries/100012/run/json", token, limit="-1").json()) == 8
    assert get(looker, "queries/100011/run/json", token).status_code == 404  # Look 11 is deleted
    assert get(looker, "queries/999999/run/json", token).status_code == 404


def test_run_inline_query_applies_filters_limit_and_apply_vis(looker):
    token = login(looker)
    body = look_query(HIDDEN_FIELDS_LOOK_ID, **{"users.name": "-Ty Arthur"})
    answer = post(looker, "queries/run/json_detail", token, body, apply_vis="true", limit="1")
    assert answer.status_code == 200
    detail = answer.json()
    assert [d["name"] for d in detail["fields"]["dimensions"]] == [
        "users.id",
        "users.email",
        "users.name",
        "users.row_key",
    ]
    assert ids([{k: c["value"] for k, c in row.items()} for row in detail["data"]]) == ["01HQZ3V8K2M5N7PB"]
    csv_rows = list(csv.reader(io.StringIO(post(looker, "queries/run/csv", token, body).text)))
    assert len(csv_rows) == 3 and csv_rows[1][0] == "01HQZ3V8K2M5N7PB"


_VALUE_TYPES_IDS = ["00MWWFOLRcETcTCf", "01HQZ3V8K2M5N7PB", "02J4X9C1D6F8G3HK"]


@pytest.mark.parametrize(
    ("field_name", "expression", "kept"),
    [
        ("users.name", "Ty Arthur", [0]),
        ("users.name", "Ty Arthur,Zoë Ümlaut 😀", [0, 2]),
        ("users.name", "-Ty Arthur", [1, 2]),
        ("users.name", "-Ty Arthur,-Zoë Ümlaut 😀", [1]),
        ("users.name", "ty arthur", []),  # case-sensitive
        ("users.name", "Ty%", [0]),
        ("users.name", "%a%,-Ty%", [2]),
        ("users.name", "EMPTY", [1]),
        ("users.name", "-EMPTY", [0, 2]),
        ("users.email", "NULL", [1]),
        ("users.email", "-NULL", [0, 2]),
        ("users.email", "NOT NULL", [0, 2]),
        ("users.email", "_y.%", [0]),
        ("users.email", "ty^_%", []),
        ("users.is_verified", "Yes", [0]),
        ("users.age", "34", [0]),
        ("users.age", "0,34", [0, 1]),
        ("users.age", "NOT 34", [1]),
        ("users.age", ">=1", [0]),
        ("users.balance", "<0", [1]),
        ("users.balance", "-12.5", [1]),
        ("users.age", "NULL", [2]),
        ("users.created_date", "2024-02-29", [0]),
        ("users.created_date", "2024/02/29", [0]),
        ("users.created_date", "2023-12-31 to 2024-02-29", [1]),
        ("users.created_date", "2023-12-31 to 2024-03-01", [0, 1]),
        ("users.created_date", "after 2024-02-29", [0]),
        ("users.created_date", "before 2024-02-29", [1]),
        ("users.created_date", "NULL", [2]),
        ("users.last_seen_time", "2024-03-01", [0]),
    ],
)
def test_filter_expressions_the_standin_applies(looker, field_name, expression, kept):
    token = login(looker)
    answer = post(
        looker, "queries/run/json", token, look_query(VALUE_TYPES_LOOK_ID, **{field_name: expression})
    )
    assert answer.status_code == 200, answer.text
    assert ids(answer.json()) == [_VALUE_TYPES_IDS[i] for i in kept]


def test_saved_filters_are_already_applied_and_can_be_replaced(looker):
    token = login(looker)
    look = fixture_looks()[NEW_SIGNUPS_LOOK_ID]
    day = look.rows[4]["users.created_date"]
    assert len(post(looker, "queries/run/json", token, look_query(NEW_SIGNUPS_LOOK_ID)).json()) == 14
    rows = post(
        looker, "queries/run/json", token, look_query(NEW_SIGNUPS_LOOK_ID, **{"users.created_date": day})
    ).json()
    assert [row["users.created_date"] for row in rows] == [day, day]
    # dropping a saved filter would need rows the fixture does not have: refused, loudly
    body = look_query(NEW_SIGNUPS_LOOK_ID)
    body["filters"] = {}
    answer = post(looker, "queries/run/json", token, body)
    assert answer.status_code == 400
    assert "no fixture Look has a query" in answer.json()["message"]


def test_a_filter_on_a_field_not_in_the_explore_is_refused_as_looker_does(looker):
    token = login(looker)
    body = look_query(NEW_SIGNUPS_LOOK_ID, **{"users.nope": "x"})
    created = post(looker, "queries", token, body)
    doc = f"{DOCS_BASE}/422/post/queries"
    refusal = "Invalid filter: users.nope: the field is not in the explore toastmates::users"
    assert (created.status_code, created.json()) == (
        422,
        {
            "message": "Validation Failed",
            "errors": [
                {
                    "field": "filters",
                    "code": "invalid",
                    "message": refusal,
                    "documentation_url": doc,
                }
            ],
            "documentation_url": doc,
        },
    )
    inline = post(looker, "queries/run/json", token, body)
    assert (inline.status_code, inline.json()["message"]) == (400, "Invalid filter: users.nope")
    looker.validate_queries_on_create = False  # Looker may accept the query and refuse it when it runs
    query_id = post(looker, "queries", token, body).json()["id"]
    answer = get(looker, f"queries/{query_id}/run/json_detail", token)
    assert (answer.status_code, answer.json()) == (
        400,
        {
            "message": "Invalid filter: users.nope",
            "documentation_url": f"{DOCS_BASE}/400/get/queries/:query_id/run/:result_format",
        },
    )
    assert (
        post(looker, "query_tasks", token, {"query_id": query_id, "result_format": "json_detail"}).status_code
        == 400
    )


@pytest.mark.parametrize(
    ("look_id", "field_name", "expression", "named"),
    [
        (VALUE_TYPES_LOOK_ID, "users.created_date", "7 days", "date filter users.created_date = '7 days'"),
        (NEW_SIGNUPS_LOOK_ID, "users.created_date", "last week", "users.created_date = 'last week'"),
        (VALUE_TYPES_LOOK_ID, "users.age", "[1, 10]", "the number filter users.age = '[1, 10]'"),
        (VALUE_TYPES_LOOK_ID, "users.created_month", "2024-02", "users.created_month"),
        (NEW_SIGNUPS_LOOK_ID, "users.country", "NL", "have no values for users.country"),
        (PIVOT_LOOK_ID, "orders.count", ">1", "pivot or pivoted field"),
    ],
)
def test_expressions_the_standin_cannot_interpret_fail_loudly(looker, look_id, field_name, expression, named):
    token = login(looker)
    answer = post(looker, "queries/run/json", token, look_query(look_id, **{field_name: expression}))
    assert answer.status_code == 400
    message = answer.json()["message"]
    assert message.startswith("The Looker stand-in cannot interpret ") and named in message
    assert looker.counters["stand_in_cannot"] == 1


def test_query_bodies_are_checked(looker):
    token = login(looker)
    missing = post(looker, "queries", token, {"view": "users"})
    assert missing.status_code == 422
    assert [(e["field"], e["code"]) for e in missing.json()["errors"]] == [("model", "missing")]
    answer = requests.post(
        f"{looker.base_url}/api/4.0/queries",
        data=b"[",
        headers={"Authorization": f"token {token}"},
        timeout=10,
    )
    assert answer.status_code == 400
    assert post(looker, "queries", None, look_query(TOASTMATES_LOOK_ID)).status_code == 401
    assert get(looker, "queries/2000001", token).status_code == 404
    assert post(looker, "queries", token, look_query(TOASTMATES_LOOK_ID), fields="id").json() == {
        "id": "2000001"
    }


# --- query tasks ------------------------------------------------------------------------------------------


def new_task(
    looker: LookerStandIn, token: str, query_id: str, fmt: str = "json_detail", **params: str
) -> str:
    answer = post(
        looker, "query_tasks", token, {"query_id": query_id, "result_format": fmt, "look_id": "1"}, **params
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["id"]


def task_status(looker: LookerStandIn, token: str, task_id: str) -> str:
    return get(looker, f"query_tasks/{task_id}", token, fields="id,status").json()["status"]


def test_sdk_runs_a_query_task_from_added_to_complete(sdk, looker):
    body = models40.WriteCreateQueryTask(
        query_id=look_query_id(TOASTMATES_LOOK_ID),
        result_format=models40.ResultFormat.json_detail,
        look_id="1",
    )
    task = sdk.create_query_task(
        body, limit=3, apply_formatting=False, cache=False, generate_drill_links=False
    )
    assert re.fullmatch(r"[0-9a-f]{32}", task.id) and task.status == "added" and task.look_id == "1"
    assert [sdk.query_task(task.id, fields="id,status").status for _ in range(3)] == [
        "added",
        "running",
        "complete",
    ]
    assert sdk.query_task(task.id).status == "complete"
    detail = json.loads(sdk.query_task_results(task.id))
    assert len(detail["data"]) == 3 and detail["data"][0]["users.id"] == {
        "value": TOASTMATES_FIRST_ROW["users.id"]
    }
    assert looker.query_tasks.get(task.id).history == ["added", "running", "complete", "complete", "complete"]
    assert looker.counters["query_tasks"] == 1


@pytest.mark.parametrize("pending", [202, 204])
def test_results_answer_202_or_204_without_a_body_until_the_task_ends(pending):
    with LookerStandIn(pending_results_status=pending) as looker:
        token = login(looker)
        task_id = new_task(looker, token, look_query_id(TOASTMATES_LOOK_ID), "csv", limit="2")
        answers = [get(looker, f"query_tasks/{task_id}/results", token) for _ in range(3)]
        assert [(a.status_code, a.content) for a in answers[:2]] == [(pending, b""), (pending, b"")]
        assert answers[2].status_code == 200 and len(answers[2].text.splitlines()) == 3


def test_polls_per_step_slow_a_task_down(looker):
    looker.polls_per_step = 3
    token = login(looker)
    task_id = new_task(looker, token, look_query_id(TOASTMATES_LOOK_ID))
    statuses = [task_status(looker, token, task_id) for _ in range(7)]
    assert statuses == ["added"] * 3 + ["running"] * 3 + ["complete"]


def test_a_failing_query_ends_its_task_in_error_with_errors_in_json_detail(looker):
    token = login(looker)
    query_id = look_query_id(SQL_ERROR_LOOK_ID)
    task_id = new_task(looker, token, query_id)
    assert [task_status(looker, token, task_id) for _ in range(3)] == ["added", "running", "error"]
    answer = get(looker, f"query_tasks/{task_id}/results", token)
    assert answer.status_code == 200
    body = answer.json()
    assert body["data"] == [] and list(body).index("errors") > list(body).index("data")
    assert body["errors"][0]["message"].endswith("column users.last_login does not exist\n  Position: 87")
    assert body["errors"][0]["sql_error_loc"] == {"line": 1, "character": 87}
    csv_task = new_task(looker, token, query_id, "csv")
    for _ in range(3):
        task_status(looker, token, csv_task)
    answer = get(looker, f"query_tasks/{csv_task}/results", token)
    assert answer.status_code == 400 and "users.last_login does not exist" in answer.json()["message"]


@pytest.mark.parametrize("outcome", ["error", "killed", "expired", "never"])
def test_query_tasks_can_be_told_how_to_end(looker, outcome):
    token = login(looker)
    looker.end_next_query_tasks(outcome)
    task_id = new_task(looker, token, look_query_id(TOASTMATES_LOOK_ID))
    statuses = [task_status(looker, token, task_id) for _ in range(5)]
    ended = "running" if outcome == "never" else outcome
    assert statuses == ["added", "running", ended, ended, ended]
    results = get(looker, f"query_tasks/{task_id}/results", token)
    expected = {"error": 200, "killed": 404, "expired": 404, "never": 202}[outcome]
    assert results.status_code == expected
    if outcome == "error":
        assert results.json()["errors"][0] == {
            "message": "Query failed",
            "message_details": "the stand-in was told to fail this query task",
            "params": {},
            "sql_error_loc": None,
            "level": "error",
        }
    assert task_status(looker, token, new_task(looker, token, look_query_id(TOASTMATES_LOOK_ID))) == "added"


def test_kill_query_kills_a_task_that_has_not_ended(looker):
    token = login(looker)
    looker.end_next_query_tasks("never")
    task_id = new_task(looker, token, look_query_id(TOASTMATES_LOOK_ID))
    headers = {"Authorization": f"token {token}"}
    kill = requests.delete(
        f"{looker.base_url}/api/4.0/running_queries/{task_id}", headers=headers, timeout=10
    )
    assert (kill.status_code, kill.content) == (204, b"")
    assert task_status(looker, token, task_id) == "killed"
    again = requests.delete(
        f"{looker.base_url}/api/4.0/running_queries/{task_id}", headers=headers, timeout=10
    )
    assert again.status_code == 404
    assert (
        requests.delete(f"{looker.base_url}/api/4.0/running_queries/nope", headers=headers).status_code == 404
    )
    assert looker.counters["queries_killed"] == 1


@pytest.mark.parametrize(
    ("body", "status", "fields"),
    [
        ({"result_format": "json_detail"}, 422, [("query_id", "missing")]),
        ({"query_id": "100001"}, 422, [("result_format", "missing")]),
        ({"query_id": "100001", "result_format": "png"}, 422, [("result_format", "invalid")]),
        ({"query_id": "100001", "result_format": "xlsx"}, 400, None),
        ({"query_id": "999999", "result_format": "json"}, 404, None),
    ],
)
def test_create_query_task_checks_its_body(looker, body, status, fields):
    answer = post(looker, "query_tasks", login(looker), body)
    assert answer.status_code == status
    if fields:
        assert [(e["field"], e["code"]) for e in answer.json()["errors"]] == fields


def test_unknown_query_tasks_are_404(looker):
    token = login(looker)
    assert get(looker, "query_tasks/0123", token).status_code == 404
    assert get(looker, "query_tasks/0123/results", token).status_code == 404
    assert requests.get(f"{looker.base_url}/api/4.0/query_tasks/0123").status_code == 401


def test_fail_next_task_polls_answers_errors_then_drops(looker):
    token = login(looker)
    task_id = new_task(looker, token, look_query_id(TOASTMATES_LOOK_ID))
    looker.fail_next_task_polls(1, status=503)
    looker.fail_next_task_polls(1, status=None)
    assert get(looker, f"query_tasks/{task_id}", token).status_code == 503
    with pytest.raises(requests.ConnectionError):
        get(looker, f"query_tasks/{task_id}", token)
    assert task_status(looker, token, task_id) == "added"  # failed polls do not move the task on
    looker.fail_next_task_polls(1, status=429, retry_after=10)
    limited = get(looker, f"query_tasks/{task_id}", token)
    assert (limited.status_code, limited.headers["Retry-After"]) == (429, "10")
    assert limited.json()["message"] == "Too Many Requests"


def test_any_route_can_be_answered_429_or_503_first(looker):
    """A Looker upgrade's 503 or a 429 on the login, the queries, the query tasks (Looker's error shape)."""
    looker.fail_next_requests(1, path="/api/4.0/login", status=503, retry_after=30)
    form = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    refused = requests.post(f"{looker.base_url}/api/4.0/login", data=form, timeout=10)
    assert (refused.status_code, refused.headers["Retry-After"]) == (503, "30")
    assert set(refused.json()) == {"message", "documentation_url"}
    assert looker.counters.get("logins", 0) == 0  # not looked at
    token = login(looker)
    looker.fail_next_requests(1, method="GET", path="/api/4.0/looks/1", status=429)
    assert get(looker, "looks/1", token).status_code == 429 and get(looker, "looks/1", token).ok
    assert looker.counters["request_faults"] == 2


def test_results_of_a_complete_task_can_be_late(looker):
    token = login(looker)
    task_id = new_task(looker, token, look_query_id(TOASTMATES_LOOK_ID))
    assert [task_status(looker, token, task_id) for _ in range(3)] == ["added", "running", "complete"]
    looker.delay_results_after_complete(1)
    answers = [get(looker, f"query_tasks/{task_id}/results", token) for _ in range(2)]
    assert [(a.status_code, a.content[:1]) for a in answers] == [(202, b""), (200, b"{")]
