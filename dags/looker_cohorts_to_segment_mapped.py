"""
Sync several Looker cohorts into Segment in parallel, one mapped task per Look, then add up the results.

The Looks come from the trigger form (``look_ids``) or, when it is left empty, from the Airflow Variable
``looker_segment_look_ids`` (a JSON list such as ``["1", "7"]``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, Variable, task

from airflow_provider_looker_segment.operators.looker_to_segment import LookerToSegmentOperator

LOOK_IDS_VARIABLE = "looker_segment_look_ids"

DOC = """
### Several Looker cohorts → Segment

One `LookerToSegmentOperator` task per Look (dynamic task mapping), all sending to the same Segment
source. The Looks come from the **look_ids** param, or from the Airflow Variable
`looker_segment_look_ids` (a JSON list) when the param is empty. The last task adds up the summaries and
is the DAG's result: rows read, events sent, invalid, rejected and failed, per Look and in total.
"""

SUMMED = ("rows", "sent", "invalid", "rejected", "failed", "batches")

with DAG(
    dag_id="looker_cohorts_to_segment_mapped",
    description="Sync several Looker cohorts into Segment in parallel",
    doc_md=DOC,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["looker", "segment", "cohort"],
    render_template_as_native_obj=True,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=5)},
    params={
        "look_ids": Param(
            [],
            type="array",
            items={"type": "string"},
            title="Look ids",
            description=f"Looks to sync; empty = the Airflow Variable {LOOK_IDS_VARIABLE} (a JSON list).",
        ),
        "dry_run": Param(
            False, type="boolean", title="Dry run", description="Build every call, send nothing."
        ),
    },
) as dag:

    @task
    def list_looks(params: dict[str, Any] | None = None) -> list[str]:
        """Return the Looks to sync: the param, else the Variable."""
        look_ids = list((params or {}).get("look_ids") or [])
        if not look_ids:
            look_ids = Variable.get(LOOK_IDS_VARIABLE, default=[], deserialize_json=True)
        look_ids = [str(look_id).strip() for look_id in look_ids if str(look_id).strip()]
        if not look_ids:
            raise ValueError(
                f"No Looks to sync: pass look_ids when triggering, or set the Variable {LOOK_IDS_VARIABLE} "
                'to a JSON list such as ["1", "7"].'
            )
        return look_ids

    @task
    def add_up(summaries: list[dict[str, Any]]) -> dict[str, Any]:
        """Add up the per-Look summaries."""
        per_look = {s["look_id"]: {key: s[key] for key in SUMMED} for s in summaries}
        total = {key: sum(s[key] for s in summaries) for key in SUMMED}
        return {"looks": len(summaries), "total": total, "per_look": per_look}

    synced = LookerToSegmentOperator.partial(
        task_id="sync_cohort",
        dry_run="{{ params.dry_run }}",
        max_active_tis_per_dagrun=4,
    ).expand(look_id=list_looks())
    add_up(synced.output)
