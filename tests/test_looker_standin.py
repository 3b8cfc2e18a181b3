"""The Looker API 4.0 stand-in, exercised with the unmodified looker_sdk and with plain HTTP requests."""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal

import looker_sdk
import pytest
import requests
from looker_helpers import CLIENT_ID, CLIENT_SECRET, make_self_signed_cert
from looker_sdk import error as sdk_error
from standins.looker_fixtures import (
    DELETED_LOOK_ID,
    EDGE_VALUES_LOOK_ID,
    GENERATED_LOOK_BASE,
    HIDDEN_FIELDS_LOOK_ID,
    PIVOT_LOOK_ID,
    SQL_ERROR_LOOK_ID,
    TOASTMATES_FIRST_ROW,
    TOASTMATES_LOOK_ID,
    TRUNCATED_LOOK_ID,
    FixtureLook,
    fixture_looks,
    generated_look,
    generated_row,
)
from standins.looker_standin import DOCS_BASE, PROXY_PAGE, LookerStandIn

DOCS_PREFIX = "https://docs.cloud.google.com/looker/docs/r/err/"


@pytest.fixture
def looker():
    with LookerStandIn() as standin:
        yield standin


@pytest.fixture
def sdk(looker, monkeypatch):
    """The unmodified looker_sdk, configured the documented way (LOOKERSDK_* variables)."""
    monkeypatch.setenv("LOOKERSDK_BASE_URL", looker.base_url)
    monkeypatch.setenv("LOOKERSDK_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("LOOKERSDK_CLIENT_SECRET", CLIENT_SECRET)
    monkeypatch.setenv("LOOKERSDK_TIMEOUT", "10")
    return looker_sdk.init40()


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

    detail = json.loads(sdk.run_look(TOASTMATES_LOOK_ID, "json_detail", apply_formatting=False))
    assert list(detail)[: list(detail).index("data")] == [
        "id",
        "from_cache",
        "fields",
        "pivots",
        "ran_at",
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


def test_sql_failure_is_http_200_with_a_looker_error_row(looker):
    token = login(looker)
    answer = run(looker, SQL_ERROR_LOOK_ID, "json_detail", token)
    assert answer.status_code == 200
    assert list(answer.json()[0]) == ["looker_error"]
    assert "users.last_login does not exist" in answer.json()[0]["looker_error"]


def test_pivoted_look_nests_measures_by_pivot_key(looker):
    token = login(looker)
    detail = run(looker, PIVOT_LOOK_ID, "json_detail", token).json()
    assert [p["key"] for p in detail["pivots"]] == ["complete", "pending", "cancelled"]
    assert detail["fields"]["pivots"][0]["name"] == "orders.status"
    assert detail["data"][1]["orders.count"]["pending"] == {"value": None}
    assert detail["data"][0]["users.id"] == {"value": "00MWWFOLRcETcTCf"}


def test_edge_values_are_written_as_exact_json_numbers_and_surrogate_escapes(looker):
    token = login(looker)
    answer = run(looker, EDGE_VALUES_LOOK_ID, "json_detail", token)
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
