"""
Sync several Looker cohorts into Segment in parallel, one mapped task per Look, then add up the results.

The Looks come from the trigger form (``look_ids``) or, when it is left empty, from the Airflow Variable
``looker_segment_look_ids`` (a JSON list such as ``["1", "7"]``), which is what the daily schedule syncs;
while neither is set, a run is skipped with a message saying what to set.

The tasks that run at once share one Segment workspace's budget: Segment takes 1,000 events per second per
workspace (all its sources together) and queues the excess, so each of the ``PARALLEL_LOOKS`` tasks gets
``events_per_second = WORKSPACE_EVENTS_PER_SECOND / PARALLEL_LOOKS``.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, Variable, task
from airflow.sdk.exceptions import AirflowSkipException

from airflow_provider_looker_segment.operators.looker_to_segment import LookerToSegmentOperator

LOOK_IDS_VARIABLE = "looker_segment_look_ids"
#: The Airflow Variable giving the state path of changed-only syncs when the trigger form leaves it empty.
STATE_PATH_VARIABLE = "looker_segment_state_path"
#: ``state_path``: the trigger form's value, else the Variable, else "" (the operator's default folder).
STATE_PATH_TEMPLATE = "{{ params.state_path or var.value.get('looker_segment_state_path', '') }}"

#: What the workspace takes without prior arrangement (Segment's limit since 2024-01-25; Engage: 1,000 too).
#: Raise it if Segment raised your workspace's limit; lower it if other DAGs send to the workspace as well.
WORKSPACE_EVENTS_PER_SECOND = 1000
#: Mapped tasks that run at once (one Look each).
PARALLEL_LOOKS = 4

log = logging.getLogger(__name__)

DOC = """
### Several Looker cohorts → Segment

One `LookerToSegmentOperator` task per Look (dynamic task mapping), all sending to the same Segment
source. The Looks come from the **look_ids** param, or from the Airflow Variable
`looker_segment_look_ids` (a JSON list) when the param is empty: the `@daily` schedule syncs the Looks of
that Variable, and while it is not set, runs are skipped with a message saying so. A Look listed twice is
synced once. The
last task adds up the summaries and is the DAG's result: rows read, events sent, invalid, rejected and
failed, per Look and in total.

**One workspace, one budget.** Segment takes 1,000 events per second per workspace, from all its sources
together; beyond it, Segment queues the excess (nothing is dropped, destinations get the events later).
At most 4 Looks sync at once (`max_active_tis_per_dagrun`), each with `events_per_second=250`: 4 x 250 =
1,000. If other DAGs send to the same workspace at the same time, put every such task in one Airflow pool
(e.g. `pool="segment_workspace"` with 4 slots) and give each task 1,000 / (the pool's slots).

* **dry_run**: build and validate every call, send nothing;
* **sync_mode**: `all` sends every row on every run; `changed` sends only the users who are new or whose
  traits changed since the last sync of each Look; **full_refresh** resends everything and rebuilds that
  state;
* **state_path** (optional): where `changed` keeps its state, e.g.
  `s3://aws_default@my-bucket/looker-segment-state/`; empty = the Airflow Variable
  `looker_segment_state_path`, and without it `$AIRFLOW_HOME/looker_segment_state` on the worker, which
  is right only when every task runs on one machine (with several workers, use shared storage).
"""

SUMMED = ("rows", "sent", "invalid", "rejected", "failed", "batches")

with DAG(
    dag_id="looker_cohorts_to_segment_mapped",
    description="Sync several Looker cohorts into Segment in parallel",
    doc_md=DOC,
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["looker", "segment", "cohort"],
    render_template_as_native_obj=True,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=5)},
    params={
        "look_ids": Param(
            None,
            type=["null", "array"],
            items={"type": "string"},
            title="Look ids",
            description=f"Looks to sync; empty = the Airflow Variable {LOOK_IDS_VARIABLE} (a JSON list).",
        ),
        "dry_run": Param(
            False,
            type=["boolean", "null"],
            title="Dry run",
            description="Build every call, send nothing. Default: off.",
        ),
        "sync_mode": Param(
            "all",
            type=["string", "null"],
            enum=["all", "changed", None],
            values_display={None: "(empty: all)"},
            title="Sync mode",
            description="all: send every row; changed: send only users who are new or whose traits "
            "changed since the last sync of the Look to this Segment source. Default: all.",
        ),
        "full_refresh": Param(
            False,
            type=["boolean", "null"],
            title="Full refresh",
            description="With sync mode 'changed': send every row and rebuild the sync state. Default: off.",
        ),
        "state_path": Param(
            None,
            type=["null", "string"],
            title="State path",
            description="With sync mode 'changed': the folder of the sync state, shared by every worker "
            "(e.g. s3://aws_default@my-bucket/looker-segment-state/). Empty: the Airflow Variable "
            f"{STATE_PATH_VARIABLE}, else $AIRFLOW_HOME/looker_segment_state on the worker.",
        ),
    },
) as dag:

    @task
    def list_looks(params: dict[str, Any] | None = None) -> list[str]:
        """Return the Looks to sync: the param, else the Variable."""
        look_ids = list((params or {}).get("look_ids") or [])
        if not look_ids:
            look_ids = Variable.get(LOOK_IDS_VARIABLE, default=[], deserialize_json=True)
        # Each Look once, in the order given: two tasks of one Look would contend for its sync state.
        look_ids = list(dict.fromkeys(str(look_id).strip() for look_id in look_ids if str(look_id).strip()))
        if not look_ids:
            message = (
                f"No Looks to sync: set the Airflow Variable {LOOK_IDS_VARIABLE} to a JSON list such as "
                '["1", "7"] (Admin > Variables), or trigger the DAG with look_ids.'
            )
            log.warning("%s", message)  # the task log shows it; the skip alone would not
            raise AirflowSkipException(message)
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
        sync_mode="{{ params.sync_mode }}",
        full_refresh="{{ params.full_refresh }}",
        state_path=STATE_PATH_TEMPLATE,
        # The workspace's 1,000 events/s shared by the tasks that run at once (a ceiling per task).
        max_active_tis_per_dagrun=PARALLEL_LOOKS,
        events_per_second=WORKSPACE_EVENTS_PER_SECOND / PARALLEL_LOOKS,
        # The grid names each mapped task after its Look ("Look 7"), not 0, 1, 2.
        map_index_template="Look {{ task.look_id }}",
    ).expand(look_id=list_looks())
    add_up(synced.output)
