"""
The deployment test's changed-only sync (tests/deploy): the example DAG's operator with its state path
(trigger form, else the Airflow Variable ``looker_segment_state_path``), but with quick retries, two runs
allowed at once (to make them contend for one sync's lock) and one request in flight (slow enough to be
interrupted on purpose).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param

from airflow_provider_looker_segment.operators.looker_to_segment import LookerToSegmentOperator

with DAG(
    dag_id="lsg_deploy_changed_sync",
    description="Deployment test: a changed-only sync with quick retries",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=2,
    tags=["looker", "segment", "deployment-test"],
    render_template_as_native_obj=True,
    default_args={"retries": 8, "retry_delay": timedelta(seconds=3)},
    params={
        "look_id": Param(type="string", minLength=1),
        "state_path": Param(None, type=["null", "string"]),
    },
) as dag:
    LookerToSegmentOperator(
        task_id="sync_cohort",
        look_id="{{ params.look_id }}",
        sync_mode="changed",
        state_path="{{ params.state_path or var.value.get('looker_segment_state_path', '') }}",
        max_in_flight=1,
    )
