"""
Lineage through OpenLineage: ``dag.test()`` of the operator with the OpenLineage provider's file transport
(in a process of its own: OpenLineage reads its configuration once), against the Looker and Segment
stand-ins. The START and COMPLETE events name the Look or query read (and the warehouse tables its SQL
reads) and the Segment source written, and carry no secret. Skipped only when the extra ``openlineage`` is
not installed (``make install`` installs it with the test extra).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from standins.connections import looker_connection, standin_connections
from standins.looker_fixtures import ACCOUNT_USERS_LOOK_ID, fixture_looks, look_query_id
from standins.looker_sql import query_slug
from standins.looker_standin import DEFAULT_CLIENT_SECRET, LookerStandIn
from standins.segment_standin import DEFAULT_WRITE_KEY, SegmentStandIn

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("airflow.providers.openlineage") is None,
    reason="the extra 'openlineage' (apache-airflow-providers-openlineage) is not installed",
)

RUNNER = Path(__file__).resolve().parent / "lineage_run.py"
DAG_FILES = Path(__file__).resolve().parent / "dag_files"
#: A Look like 16 (users joined to their accounts) whose results do not carry their SQL: the lineage asks
#: Looker for it (GET /queries/{id}/run/sql).
NO_SQL_LOOK_ID = "716"


def _events(tmp_path: Path, looker: LookerStandIn, segment: SegmentStandIn, runs: list[dict]) -> list[dict]:
    """Run the DAG once per run in a fresh process with the file transport; return every event written."""
    events_file = tmp_path / "openlineage.ndjson"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "OPENLINEAGE"))}
    env.update(standin_connections(looker.base_url, segment.base_url))
    env.update(
        {
            "AIRFLOW_HOME": str(tmp_path / "airflow-home"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAG_FILES),
            "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
                {"type": "file", "log_file_path": str(events_file), "append": True}
            ),
            "AIRFLOW__OPENLINEAGE__NAMESPACE": "lsg-test",
        }
    )
    done = subprocess.run(
        [sys.executable, str(RUNNER), json.dumps(runs)], env=env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    states = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("LINEAGE-RUN ")]
    assert states == ["success"] * len(runs), done.stdout[-5000:]
    return [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]


def _task_events(events: list[dict], event_type: str) -> list[dict]:
    return [e for e in events if e["eventType"] == event_type and e["job"]["name"].endswith(".sync")]


@pytest.fixture
def standins():
    with LookerStandIn() as looker, SegmentStandIn(record="full") as segment:
        look = fixture_looks()[ACCOUNT_USERS_LOOK_ID]
        looker.add_look(dataclasses.replace(look, id=NO_SQL_LOOK_ID, sql_in_results=False))
        yield looker, segment


def test_start_and_complete_events_name_the_look_the_tables_and_the_segment_source(tmp_path, standins):
    looker, segment = standins
    named = json.dumps(
        {
            "conn_type": "segment_tracking",
            "host": segment.base_url,
            "password": DEFAULT_WRITE_KEY,
            "extra": {"source_name": "looker-cohorts"},
        }
    )
    warehouse = json.dumps(
        {
            **json.loads(looker_connection(looker.base_url)),
            "extra": {"warehouse_namespace": "postgres://dwh:5432"},
        }
    )
    query_id = look_query_id(NO_SQL_LOOK_ID)
    runs = [
        {"conf": {"look_id": ACCOUNT_USERS_LOOK_ID}},
        {
            "conf": {"look_id": None, "query_id": query_id, "call": "track", "event": "Owner synced"},
            "env": {"AIRFLOW_CONN_SEGMENT_DEFAULT": named, "AIRFLOW_CONN_LOOKER_DEFAULT": warehouse},
        },
    ]
    looker.clear_records()
    events = _events(tmp_path, looker, segment, runs)
    starts, completes = _task_events(events, "START"), _task_events(events, "COMPLETE")
    assert len(starts) == 2 and len(completes) == 2

    # The Look: its explore as the input, its tables parsed from the SQL of its result, the Segment source.
    look_event = completes[0]
    host = looker.base_url.split("://", 1)[1]
    look, *tables = look_event["inputs"]
    assert (look["namespace"], look["name"]) == (f"looker://{host}", "toastmates.users")
    facet = look["facets"]["looker"]
    assert (facet["kind"], facet["lookId"], facet["title"]) == (
        "look",
        ACCOUNT_USERS_LOOK_ID,
        "Account owners",
    )
    assert facet["url"] == f"{looker.base_url}/looks/{ACCOUNT_USERS_LOOK_ID}"
    assert look["facets"]["documentation"]["description"] == "Account owners"
    fields = [field["name"] for field in look["facets"]["schema"]["fields"]]
    assert fields[0] == "users.id" and "accounts.id" in fields and "users.email" in fields
    assert sorted((t["namespace"], t["name"]) for t in tables) == [
        (f"looker-sql://{host}", "public.accounts"),
        (f"looker-sql://{host}", "public.users"),
    ]
    (output,) = look_event["outputs"]
    segment_host = segment.base_url.split("://", 1)[1]
    assert output["namespace"] == f"segment://{segment_host}"
    assert output["name"].startswith("source-") and len(output["name"]) == len("source-") + 12
    assert output["facets"]["segment"]["call"] == "identify"

    # The query: its Explore, the SQL Looker was asked for (its results did not carry it), the named source.
    query_event = completes[1]
    source, *tables = query_event["inputs"]
    assert source["facets"]["looker"]["kind"] == "query" and source["facets"]["looker"]["queryId"] == query_id
    slug = query_slug(query_id)
    assert source["facets"]["looker"]["querySlug"] == slug
    assert source["facets"]["looker"]["url"] == f"{looker.base_url}/explore/toastmates/users?qid={slug}"
    assert sorted(t["name"] for t in tables) == ["public.accounts", "public.users"]
    assert {t["namespace"] for t in tables} == {"postgres://dwh:5432"}
    assert [r.path for r in looker.requests if r.path.endswith("/run/sql")] == [
        f"/api/4.0/queries/{query_id}/run/sql"
    ]
    (output,) = query_event["outputs"]
    assert output["name"] == "looker-cohorts"
    assert output["facets"]["segment"] == {
        **output["facets"]["segment"],
        "call": "track",
        "event": "Owner synced",
    }

    # No secret anywhere in the events.
    text = json.dumps(events)
    assert DEFAULT_WRITE_KEY not in text and DEFAULT_CLIENT_SECRET not in text


def test_the_operator_works_without_the_extra(tmp_path):
    """With OpenLineage's client not importable, the operator still imports and builds: it imports it only
    when the provider asks for the facets."""
    code = (
        "import sys\n"
        "for name in ('openlineage', 'openlineage.client'):\n"
        "    sys.modules[name] = None  # as if the extra were not installed\n"
        "from airflow_provider_looker_segment.operators.looker_to_segment import LookerToSegmentOperator\n"
        "task = LookerToSegmentOperator(task_id='t', query_slug='aBc')\n"
        "print(task.query_slug, 'airflow_provider_looker_segment.lineage' in sys.modules)\n"
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
        "AIRFLOW_HOME": str(tmp_path),
    }
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "aBc False"
