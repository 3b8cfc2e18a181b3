"""A DAG for the operator tests: every option comes from the run's conf (``dag.test(run_conf=...)``)."""

from __future__ import annotations

import datetime

from airflow.sdk import DAG, Param

from airflow_provider_looker_segment.operators.looker_to_segment import LookerToSegmentOperator

with DAG(
    dag_id="lsg_operator_test",
    schedule=None,
    start_date=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
    catchup=False,
    render_template_as_native_obj=True,
    params={
        "look_id": Param("1", type="string"),
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
        "max_exit_ratio": Param(0.5, type="number"),
        "call": Param("identify", type="string"),
        "group_id_field": Param(None, type=["null", "string"]),
        "event": Param(None, type=["null", "string"]),
        "entered_event": Param(None, type=["null", "string"]),
        "exited_event": Param(None, type=["null", "string"]),
    },
    tags=["test"],
) as dag:
    LookerToSegmentOperator(
        task_id="sync",
        look_id="{{ params.look_id }}",
        user_id_field="{{ params.user_id_field }}",
        email_field="{{ params.email_field }}",
        anonymous_id_field="{{ params.anonymous_id_field }}",
        trait_names="{{ params.trait_names }}",
        trait_key_style="{{ params.trait_key_style }}",
        exclude_fields="{{ params.exclude_fields }}",
        destinations="{{ params.destinations }}",
        dry_run="{{ params.dry_run }}",
        limit="{{ params.limit }}",
        max_invalid_rows="{{ params.max_invalid_rows }}",
        sync_mode="{{ params.sync_mode }}",
        state_path="{{ params.state_path }}",
        full_refresh="{{ params.full_refresh }}",
        membership_trait="{{ params.membership_trait }}",
        max_exit_ratio="{{ params.max_exit_ratio }}",
        call="{{ params.call }}",
        group_id_field="{{ params.group_id_field }}",
        event="{{ params.event }}",
        entered_event="{{ params.entered_event }}",
        exited_event="{{ params.exited_event }}",
        progress_interval=0.5,
        retries=1,
        retry_delay=datetime.timedelta(seconds=0),
    )
