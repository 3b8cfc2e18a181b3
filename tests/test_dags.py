"""Every DAG in dags/ imports under Airflow 3 without errors or deprecation warnings."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pendulum
import pytest

DAGS = Path(__file__).resolve().parents[1] / "dags"
DAG_FILES = sorted(DAGS.glob("*.py"))


def _load(path: Path, monkeypatch: pytest.MonkeyPatch, **env: str):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    spec = importlib.util.spec_from_file_location(f"dag_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", PendingDeprecationWarning)
        warnings.filterwarnings("error", category=FutureWarning)
        spec.loader.exec_module(module)
    return module


def test_dags_folder_has_the_examples():
    assert {p.name for p in DAG_FILES} >= {
        "looker_cohort_to_segment.py",
        "looker_cohorts_to_segment_mapped.py",
        "looker_new_signups_to_segment.py",
        "looker_datagroup_to_segment.py",
    }


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_dag_file_imports_without_errors_or_deprecations(path: Path, monkeypatch: pytest.MonkeyPatch):
    module = _load(path, monkeypatch)
    assert module.dag.dag_id == path.stem
    assert module.dag.tags


def test_dagbag_has_no_import_errors():
    from airflow.dag_processing.dagbag import DagBag

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        bag = DagBag(dag_folder=str(DAGS))  # examples are off: AIRFLOW__CORE__LOAD_EXAMPLES=False
    assert bag.import_errors == {}
    assert set(bag.dag_ids) >= {
        "looker_cohort_to_segment",
        "looker_cohorts_to_segment_mapped",
        "looker_new_signups_to_segment",
        "looker_datagroup_to_segment",
    }


def test_cohort_dag_trigger_form(monkeypatch: pytest.MonkeyPatch):
    dag = _load(DAGS / "looker_cohort_to_segment.py", monkeypatch).dag
    params = dag.params
    assert set(params) == {
        "look_id",
        "query_id",
        "query_slug",
        "destinations",
        "dry_run",
        "trait_key_style",
        "sync_mode",
        "full_refresh",
        "state_path",
        "call",
        "event",
        "entered_event",
        "exited_event",
    }
    schema = {name: params.get_param(name).schema for name in params}
    assert schema["look_id"]["type"] == ["null", "string"] and params.get_param("look_id").description
    for query in ("query_id", "query_slug"):  # any Looker query instead of a Look: optional, empty
        assert schema[query]["type"] == ["null", "string"] and params[query] is None
    assert schema["call"]["enum"] == ["identify", "group", "track", None] and params["call"] == "identify"
    for optional in ("event", "entered_event", "exited_event"):  # optional: no red star in the form
        assert schema[optional]["type"] == ["null", "string"] and params[optional] is None
    assert schema["destinations"]["type"] == ["null", "array"] and params["destinations"] is None
    assert schema["dry_run"]["type"] == ["boolean", "null"] and params["dry_run"] is False
    assert schema["trait_key_style"]["enum"] == ["label", "snake", "field", None]
    assert schema["sync_mode"]["enum"] == ["all", "changed", None] and params["sync_mode"] == "all"
    assert params["full_refresh"] is False
    assert schema["state_path"]["type"] == ["null", "string"] and params["state_path"] is None
    assert dag.max_active_runs == 1 and dag.catchup is False
    task = dag.get_task("sync_cohort")
    assert task.upstream_task_ids == {"resolve_look"}
    assert (task.call, task.event) == ("{{ params.call }}", "{{ params.event }}")
    assert task.retries >= 1 and task.retry_delay.total_seconds() > 0
    assert [outlet.uri for outlet in task.outlets] == [
        "segment://segment_default/looker/looker_default/looks/daily"
    ]


def test_example_dags_are_scheduled_out_of_the_box(monkeypatch: pytest.MonkeyPatch):
    for name in ("looker_cohort_to_segment.py", "looker_cohorts_to_segment_mapped.py"):
        dag = _load(DAGS / name, monkeypatch).dag
        assert dag.schedule == "@daily" and dag.catchup is False and dag.max_active_runs == 1


@pytest.fixture
def standins(airflow_db, monkeypatch: pytest.MonkeyPatch):
    from standins.connections import standin_connections
    from standins.looker_standin import LookerStandIn
    from standins.segment_standin import SegmentStandIn

    with LookerStandIn() as looker, SegmentStandIn(record="full") as segment:
        for name, value in standin_connections(looker.base_url, segment.base_url).items():
            monkeypatch.setenv(name, value)
        yield looker, segment


def _states(dag_run) -> dict[str, str]:
    return {ti.task_id: ti.state for ti in dag_run.get_task_instances()}


def test_an_unconfigured_scheduled_run_is_skipped_saying_what_to_set(standins, monkeypatch, capfd):
    _looker, segment = standins
    monkeypatch.delenv("AIRFLOW_VAR_LOOKER_SEGMENT_DAILY_LOOK_ID", raising=False)
    dag = _load(DAGS / "looker_cohort_to_segment.py", monkeypatch).dag
    dag_run = dag.test(logical_date=pendulum.datetime(2026, 11, 28, tz="UTC"))
    assert dag_run.state == "success"  # never a daily failure
    assert _states(dag_run) == {"resolve_look": "skipped", "sync_cohort": "skipped"}
    assert "set the Airflow Variable looker_segment_daily_look_id" in "".join(capfd.readouterr())
    assert segment.stats()["requests"] == 0


def test_a_scheduled_run_syncs_the_look_of_the_variable(standins, monkeypatch):
    _looker, segment = standins
    monkeypatch.setenv("AIRFLOW_VAR_LOOKER_SEGMENT_DAILY_LOOK_ID", "1")
    dag = _load(DAGS / "looker_cohort_to_segment.py", monkeypatch).dag
    dag_run = dag.test(logical_date=pendulum.datetime(2026, 11, 28, tz="UTC"))
    assert _states(dag_run) == {"resolve_look": "success", "sync_cohort": "success"}
    assert len(segment.events()) == 10 and segment.events()[0]["userId"] == "00MWWFOLRcETcTCf"


def test_a_run_triggered_with_a_query_syncs_it(standins, monkeypatch):
    from standins.looker_fixtures import look_query_id
    from standins.looker_sql import query_slug

    _looker, segment = standins
    monkeypatch.delenv("AIRFLOW_VAR_LOOKER_SEGMENT_DAILY_LOOK_ID", raising=False)
    dag = _load(DAGS / "looker_cohort_to_segment.py", monkeypatch).dag
    dag_run = dag.test(run_conf={"query_slug": query_slug(look_query_id("1"))})
    assert _states(dag_run) == {"resolve_look": "success", "sync_cohort": "success"}
    assert len(segment.events()) == 10


def test_an_unconfigured_mapped_run_is_skipped(standins, monkeypatch, capfd):
    monkeypatch.delenv("AIRFLOW_VAR_LOOKER_SEGMENT_LOOK_IDS", raising=False)
    dag = _load(DAGS / "looker_cohorts_to_segment_mapped.py", monkeypatch).dag
    dag_run = dag.test(logical_date=pendulum.datetime(2026, 11, 28, tz="UTC"))
    assert dag_run.state == "success"
    assert _states(dag_run)["list_looks"] == "skipped"
    assert "set the Airflow Variable looker_segment_look_ids" in "".join(capfd.readouterr())


def test_mapped_dag_expands_over_looks(monkeypatch: pytest.MonkeyPatch):
    dag = _load(DAGS / "looker_cohorts_to_segment_mapped.py", monkeypatch).dag
    assert {t.task_id for t in dag.tasks} == {"list_looks", "sync_cohort", "add_up"}
    assert dag.get_task("sync_cohort").upstream_task_ids == {"list_looks"}
    assert dag.get_task("add_up").upstream_task_ids == {"sync_cohort"}


def test_mapped_tasks_share_the_workspaces_1000_events_per_second(monkeypatch: pytest.MonkeyPatch):
    module = _load(DAGS / "looker_cohorts_to_segment_mapped.py", monkeypatch)
    sync = module.dag.get_task("sync_cohort")
    pace, at_once = sync.partial_kwargs["events_per_second"], sync.partial_kwargs["max_active_tis_per_dagrun"]
    assert (pace, at_once) == (250, 4) and pace * at_once == module.WORKSPACE_EVENTS_PER_SECOND == 1000


def test_a_mapped_run_paces_each_task_at_its_share(standins, monkeypatch, capfd):
    _looker, segment = standins
    dag = _load(DAGS / "looker_cohorts_to_segment_mapped.py", monkeypatch).dag
    dag_run = dag.test(run_conf={"look_ids": ["1", "16"]})
    assert dag_run.state == "success"
    assert len(segment.events()) == 13
    assert all(record.events <= 25 for record in segment.records())  # a tenth of 250 per request at most
    text = "".join(capfd.readouterr())
    assert text.count("events paced at 250/s") == 2 and text.count("(events_per_second 250).") == 2


def test_mapped_dag_trigger_form(monkeypatch: pytest.MonkeyPatch):
    dag = _load(DAGS / "looker_cohorts_to_segment_mapped.py", monkeypatch).dag
    params = dag.params
    assert set(params) == {"look_ids", "dry_run", "sync_mode", "full_refresh", "state_path"}
    schema = {name: params.get_param(name).schema for name in params}
    assert schema["look_ids"]["type"] == ["null", "array"] and params["look_ids"] is None
    assert schema["sync_mode"]["enum"] == ["all", "changed", None] and params["sync_mode"] == "all"
    assert params["dry_run"] is False and params["full_refresh"] is False
    assert schema["state_path"]["type"] == ["null", "string"] and params["state_path"] is None
    partial = dag.get_task("sync_cohort").partial_kwargs
    assert partial["sync_mode"] == "{{ params.sync_mode }}"
    assert partial["full_refresh"] == "{{ params.full_refresh }}"


class _Variables:
    """``var.value`` of a template context, with the given Airflow Variables."""

    def __init__(self, **variables: str) -> None:
        self.variables = variables

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.variables.get(key, default)


@pytest.mark.parametrize(
    "path", [p for p in DAG_FILES if "STATE_PATH_VARIABLE" in p.read_text()], ids=lambda p: p.name
)
def test_state_path_comes_from_the_form_else_the_variable(path: Path, monkeypatch: pytest.MonkeyPatch):
    module = _load(path, monkeypatch)
    assert module.STATE_PATH_VARIABLE == "looker_segment_state_path"
    task = module.dag.get_task("sync_cohort")
    template = getattr(task, "partial_kwargs", {}).get("state_path") or task.state_path
    assert template == module.STATE_PATH_TEMPLATE
    env = module.dag.get_template_env()

    def render(state_path: str | None, **variables: str) -> object:
        context = {"params": {"state_path": state_path}, "var": {"value": _Variables(**variables)}}
        return env.from_string(template).render(**context)

    variable = {"looker_segment_state_path": "s3://aws_default@bucket/from-variable/"}
    form = "s3://aws_default@bucket/from-form/"
    assert render(form, **variable) == form  # the trigger form wins
    assert render(None, **variable) == variable["looker_segment_state_path"]
    assert render("", **variable) == variable["looker_segment_state_path"]
    assert render(None) in ("", None)  # neither: the operator's default, $AIRFLOW_HOME/looker_segment_state


# ------------------------------------------------------------------------------------ new sign-ups


def test_signups_dag_is_daily_deferrable_and_filtered_by_its_interval(monkeypatch: pytest.MonkeyPatch):
    dag = _load(DAGS / "looker_new_signups_to_segment.py", monkeypatch).dag
    assert dag.catchup is False and dag.max_active_runs == 1
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"
    task = dag.get_task("sync_signups")
    assert task.deferrable is True and task.query_timeout == 7200
    assert task.upstream_task_ids == {"plan_run"}
    schema = {name: dag.params.get_param(name).schema for name in dag.params}
    for optional in ("look_id", "event"):  # optional: no red star in the trigger form
        assert schema[optional]["type"] == ["null", "string"] and dag.params[optional] is None


def test_signups_of_the_day_through_the_trigger(standins, monkeypatch):
    from standins.looker_fixtures import NEW_SIGNUPS_LOOK_ID

    looker, segment = standins
    rows = looker.look(NEW_SIGNUPS_LOOK_ID).rows  # dated relative to the day the stand-in started
    day = rows[0]["users.created_date"]
    monkeypatch.setenv("AIRFLOW_VAR_LOOKER_SEGMENT_SIGNUPS_LOOK_ID", NEW_SIGNUPS_LOOK_ID)
    dag = _load(DAGS / "looker_new_signups_to_segment.py", monkeypatch).dag
    next_day = pendulum.parse(day).add(days=1).to_date_string()
    # A run at midnight after that day, as the schedule makes it: its data interval is that day.
    dag_run = dag.test(logical_date=pendulum.parse(next_day))
    assert _states(dag_run) == {"plan_run": "success", "sync_signups": "success"}
    assert (dag_run.data_interval_start.date().isoformat(), dag_run.data_interval_end.date().isoformat()) == (
        day,
        next_day,
    )
    expected = sorted(row["users.id"] for row in rows if row["users.created_date"] == day)
    assert sorted(event["userId"] for event in segment.events()) == expected and len(expected) == 2
    assert looker.queries.received[-1]["filters"] == {"users.created_date": f"{day} to {next_day}"}
    assert any(r.path == "/api/4.0/query_tasks" for r in looker.requests)  # it deferred


# ------------------------------------------------------------------------------------ trigger forms' truth


def _starred(schema: dict) -> bool:
    """Airflow 3.3's trigger form marks a field required (a red star) when its type is set without null."""
    kind = schema.get("type")
    return bool(kind) and (not isinstance(kind, list) or "null" not in kind)


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_trigger_forms_star_no_field_that_has_a_default(path: Path, monkeypatch: pytest.MonkeyPatch):
    """Every field may be left empty (its default, or the Variable, applies); the form says so."""
    import jsonschema

    params = _load(path, monkeypatch).dag.params
    for name in params:
        param = params.get_param(name)
        assert not _starred(param.schema), f"{name} is starred as required but has a default"
        jsonschema.validate(None, param.schema)  # left empty: valid
        jsonschema.validate(param.value, param.schema)  # the default: valid
        if param.value not in (None, [], {}):
            shown = {True: "on", False: "off"}.get(param.value, param.value)
            assert f"Default: {shown}." in param.description, (name, param.description)
        if "enum" in param.schema:
            assert None in param.schema["enum"] and param.schema["values_display"][None].startswith(
                "(empty: "
            )


@pytest.mark.parametrize("path", [p for p in DAG_FILES if "track" in p.read_text()], ids=lambda p: p.name)
def test_the_event_field_says_when_it_is_required(path: Path, monkeypatch: pytest.MonkeyPatch):
    params = _load(path, monkeypatch).dag.params
    event = params.get_param("event")
    assert event.value is None and not _starred(event.schema)
    assert event.description.startswith("Required when Call type is track")
    assert "fails at once, before Looker is read" in event.description


def test_datagroup_dag_is_scheduled_on_an_asset_its_trigger_watches(monkeypatch: pytest.MonkeyPatch):
    from airflow_provider_looker_segment.triggers.looker import (
        DEFAULT_DATAGROUP_POLL_INTERVAL,
        LookerDatagroupTrigger,
    )

    module = _load(DAGS / "looker_datagroup_to_segment.py", monkeypatch)
    assert list(module.dag.timetable.asset_condition.objects) == [module.LOOKER_DATA_REFRESHED]
    (watcher,) = module.LOOKER_DATA_REFRESHED.watchers
    assert isinstance(watcher.trigger, LookerDatagroupTrigger)
    assert watcher.trigger.serialize()[1] == {
        "looker_conn_id": "looker_default",
        "model_name": "toastmates",
        "datagroup_name": "nightly_etl",
        "poll_interval": DEFAULT_DATAGROUP_POLL_INTERVAL,
        "retries": 3,
        "retry_backoff": 2.0,
    }
    configured = _load(
        DAGS / "looker_datagroup_to_segment.py",
        monkeypatch,
        LOOKER_SEGMENT_DATAGROUP_MODEL="b2b",
        LOOKER_SEGMENT_DATAGROUP_NAME="accounts_refresh",
        LOOKER_SEGMENT_DATAGROUP_POLL_INTERVAL="900",
    )
    trigger = configured.LOOKER_DATA_REFRESHED.watchers[0].trigger
    assert (trigger.model_name, trigger.datagroup_name, trigger.poll_interval) == (
        "b2b",
        "accounts_refresh",
        900,
    )
    assert configured.LOOKER_DATA_REFRESHED.uri == "looker://looker_default/datagroups/b2b/accounts_refresh"


def test_a_datagroup_run_syncs_the_look_of_its_variable(standins, monkeypatch, capfd):
    _looker, segment = standins
    monkeypatch.delenv("AIRFLOW_VAR_LOOKER_SEGMENT_DATAGROUP_LOOK_ID", raising=False)
    dag = _load(DAGS / "looker_datagroup_to_segment.py", monkeypatch).dag
    skipped = dag.test()
    assert _states(skipped) == {"resolve_look": "skipped", "sync_cohort": "skipped"}
    assert "set the Airflow Variable looker_segment_datagroup_look_id" in "".join(capfd.readouterr())
    monkeypatch.setenv("AIRFLOW_VAR_LOOKER_SEGMENT_DATAGROUP_LOOK_ID", "1")
    dag_run = dag.test()
    assert _states(dag_run) == {"resolve_look": "success", "sync_cohort": "success"}
    assert len(segment.events()) == 10
