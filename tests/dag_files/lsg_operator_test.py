"""
DAGs for the operator tests: every option comes from the run's conf (``dag.test(run_conf=...)``).

``lsg_operator_test`` runs the operator as it is by default; ``lsg_operator_deferrable_test`` runs it with
``deferrable=True`` (``dag.test()`` runs the trigger in line), polling every 50 ms. Every task has two
retries, as the example DAGs, without delay: an error that can heal is tried three times, one that cannot
fails after the first.
"""

from __future__ import annotations

import datetime

from airflow.sdk import DAG, Param

from airflow_provider_looker_segment.operators.looker_to_segment import LookerToSegmentOperator

PARAMS = {
    "look_id": Param("1", type=["null", "string"]),
    "query_id": Param(None, type=["null", "string"]),
    "query_slug": Param(None, type=["null", "string"]),
    "user_id_field": Param(None, type=["null", "string"]),
    "email_field": Param(None, type=["null", "string"]),
    "anonymous_id_field": Param(None, type=["null", "string"]),
    "trait_names": Param({}, type="object"),
    "trait_key_style": Param("label", type="string"),
    "exclude_fields": Param([], type="array"),
    "destinations": Param([], type="array"),
    "dry_run": Param(False, type="boolean"),
    "limit": Param(-1, type="integer"),
    "max_invalid_rows": Param(None, type=["null", "integer"]),
    "sync_mode": Param("all", type="string"),
    "full_refresh": Param(False, type="boolean"),
    "membership_trait": Param(None, type=["null", "string"]),
    "state_path": Param(None, type=["null", "string"]),
    "state_key": Param(None, type=["null", "string"]),
    "max_exit_ratio": Param(0.5, type="number"),
    "call": Param("identify", type="string"),
    "group_id_field": Param(None, type=["null", "string"]),
    "group_without_user": Param("anonymous_id", type="string"),
    "event": Param(None, type=["null", "string"]),
    "entered_event": Param(None, type=["null", "string"]),
    "exited_event": Param(None, type=["null", "string"]),
    "filters": Param({}, type="object"),
}


def _dag(dag_id: str, **operator_options: object) -> DAG:
    with DAG(
        dag_id=dag_id,
        schedule=None,
        start_date=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
        catchup=False,
        render_template_as_native_obj=True,
        params=PARAMS,
        tags=["test"],
    ) as dag:
        LookerToSegmentOperator(
            task_id="sync",
            **{name: f"{{{{ params.{name} }}}}" for name in PARAMS},
            progress_interval=0.5,
            retries=2,
            retry_delay=datetime.timedelta(seconds=0),
            **operator_options,
        )
    return dag


dag = _dag("lsg_operator_test")
deferrable_dag = _dag("lsg_operator_deferrable_test", deferrable=True, poll_interval=0.05, query_timeout=30)
#: Gives up on a query task after half a second (and asks Looker to kill its query).
timeout_dag = _dag("lsg_operator_timeout_test", deferrable=True, poll_interval=0.05, query_timeout=0.5)
