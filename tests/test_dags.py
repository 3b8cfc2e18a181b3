"""Every DAG in dags/ imports under Airflow 3 without errors or deprecation warnings."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

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
    assert set(bag.dag_ids) >= {"looker_cohort_to_segment", "looker_cohorts_to_segment_mapped"}


def test_cohort_dag_trigger_form(monkeypatch: pytest.MonkeyPatch):
    dag = _load(DAGS / "looker_cohort_to_segment.py", monkeypatch).dag
    params = dag.params
    assert set(params) == {
        "look_id",
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
    assert schema["look_id"]["type"] == "string" and params.get_param("look_id").description
    assert schema["call"]["enum"] == ["identify", "group", "track"] and params["call"] == "identify"
    for optional in ("event", "entered_event", "exited_event"):  # optional: no red star in the form
        assert schema[optional]["type"] == ["null", "string"] and params[optional] is None
    assert schema["destinations"]["type"] == "array"
    assert schema["dry_run"]["type"] == "boolean" and params["dry_run"] is False
    assert schema["trait_key_style"]["enum"] == ["label", "snake", "field"]
    assert schema["sync_mode"]["enum"] == ["all", "changed"] and params["sync_mode"] == "all"
    assert params["full_refresh"] is False
    assert schema["state_path"]["type"] == ["null", "string"] and params["state_path"] is None
    assert dag.max_active_runs == 1 and dag.catchup is False
    task = dag.get_task("sync_cohort")
    assert task.look_id == "{{ params.look_id }}"
    assert (task.call, task.event) == ("{{ params.call }}", "{{ params.event }}")
    assert task.retries >= 1 and task.retry_delay.total_seconds() > 0
    assert [outlet.uri for outlet in task.outlets] == [
        "segment://segment_default/looker/looker_default/looks/triggered"
    ]


def test_cohort_dag_runs_daily_once_a_look_is_configured(monkeypatch: pytest.MonkeyPatch):
    without = _load(DAGS / "looker_cohort_to_segment.py", monkeypatch).dag
    assert without.schedule is None  # look_id is required: Airflow refuses a schedule without defaults
    with_look = _load(
        DAGS / "looker_cohort_to_segment.py", monkeypatch, LOOKER_SEGMENT_DAILY_LOOK_ID="42"
    ).dag
    assert with_look.schedule == "@daily"
    assert with_look.params["look_id"] == "42"
    assert with_look.get_task("sync_cohort").outlets[0].uri.endswith("/looks/42")


def test_mapped_dag_expands_over_looks(monkeypatch: pytest.MonkeyPatch):
    dag = _load(DAGS / "looker_cohorts_to_segment_mapped.py", monkeypatch).dag
    assert {t.task_id for t in dag.tasks} == {"list_looks", "sync_cohort", "add_up"}
    assert dag.get_task("sync_cohort").upstream_task_ids == {"list_looks"}
    assert dag.get_task("add_up").upstream_task_ids == {"sync_cohort"}


def test_mapped_dag_trigger_form(monkeypatch: pytest.MonkeyPatch):
    dag = _load(DAGS / "looker_cohorts_to_segment_mapped.py", monkeypatch).dag
    params = dag.params
    assert set(params) == {"look_ids", "dry_run", "sync_mode", "full_refresh", "state_path"}
    schema = {name: params.get_param(name).schema for name in params}
    assert schema["look_ids"]["type"] == "array" and params["look_ids"] == []
    assert schema["sync_mode"]["enum"] == ["all", "changed"] and params["sync_mode"] == "all"
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


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
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
