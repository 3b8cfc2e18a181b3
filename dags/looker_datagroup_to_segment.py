"""
Sync a Looker cohort into Segment each time Looker's data refreshes: the DAG is scheduled on an Asset watched
by ``LookerDatagroupTrigger``, which fires when a datagroup of a LookML model is triggered (the ETL behind it
finished), instead of at a fixed hour.

The datagroup is set where the DAG file is read (the trigger's arguments are part of the parsed DAG):
environment variables ``LOOKER_SEGMENT_DATAGROUP_MODEL`` and ``LOOKER_SEGMENT_DATAGROUP_NAME`` (default
``toastmates`` / ``nightly_etl``, the demo's) and ``LOOKER_SEGMENT_DATAGROUP_POLL_INTERVAL`` (seconds, default
one hour: 744 administrative API calls in a 31-day month, within Looker Standard's 1,000). The Look it syncs
is read at run time from the Airflow Variable ``looker_segment_datagroup_look_id``.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, Asset, AssetWatcher, Variable, task
from airflow.sdk.exceptions import AirflowSkipException

from airflow_provider_looker_segment.operators.looker_to_segment import LookerToSegmentOperator
from airflow_provider_looker_segment.triggers.looker import (
    DEFAULT_DATAGROUP_POLL_INTERVAL,
    LookerDatagroupTrigger,
)

#: The datagroup watched: its LookML model and name, and the seconds between two polls of GET /datagroups.
MODEL_NAME = os.environ.get("LOOKER_SEGMENT_DATAGROUP_MODEL", "toastmates")
DATAGROUP_NAME = os.environ.get("LOOKER_SEGMENT_DATAGROUP_NAME", "nightly_etl")
POLL_INTERVAL = float(
    os.environ.get("LOOKER_SEGMENT_DATAGROUP_POLL_INTERVAL") or DEFAULT_DATAGROUP_POLL_INTERVAL
)
#: The Airflow Variable naming the Look synced on each refresh (Admin → Variables, e.g. ``42``).
LOOK_VARIABLE = "looker_segment_datagroup_look_id"

#: Updated by the watcher each time the datagroup is triggered; the DAG runs on it.
LOOKER_DATA_REFRESHED = Asset(
    name="looker_datagroup_refreshed",
    uri=f"looker://looker_default/datagroups/{MODEL_NAME}/{DATAGROUP_NAME}",
    watchers=[
        AssetWatcher(
            name="looker_datagroup_watcher",
            trigger=LookerDatagroupTrigger(
                looker_conn_id="looker_default",
                model_name=MODEL_NAME,
                datagroup_name=DATAGROUP_NAME,
                poll_interval=POLL_INTERVAL,
            ),
        )
    ],
)

log = logging.getLogger(__name__)

DOC = f"""
### Looker data refreshed → Segment

Runs each time the Looker datagroup **{MODEL_NAME}::{DATAGROUP_NAME}** is triggered (its ETL finished):
the triggerer polls Looker's `GET /datagroups` every {POLL_INTERVAL:g} s and updates the asset
`looker_datagroup_refreshed` when the datagroup's `triggered_at` advances, which starts this DAG. The run
syncs the Look named by the Airflow Variable `{LOOK_VARIABLE}` (connections `looker_default` and
`segment_default`); while it is not set, runs are skipped with a message saying so.

The watcher remembers the last refresh it saw across triggerer restarts (the asset's state store): a restart
neither starts a run again for a refresh already synced nor misses one that happened meanwhile.
"""

with DAG(
    dag_id="looker_datagroup_to_segment",
    description="Sync a Looker cohort into Segment each time its Looker datagroup refreshes",
    doc_md=DOC,
    schedule=[LOOKER_DATA_REFRESHED],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["looker", "segment", "cohort", "datagroup"],
    default_args={"retries": 2, "retry_delay": timedelta(minutes=5)},
) as dag:

    @task
    def resolve_look(triggering_asset_events: Any = None) -> str:
        """The Look to sync (the Variable's); skip the run when it is not set. Logs the refresh behind it."""
        for events in (triggering_asset_events or {}).values():
            for event in events:
                payload = (event.extra or {}).get("payload") or {}
                log.info(
                    "Started by Looker datagroup %s::%s, triggered at %s (UNIX seconds; before: %s)",
                    payload.get("model_name"),
                    payload.get("datagroup_name"),
                    payload.get("triggered_at"),
                    payload.get("previous_triggered_at"),
                )
        look_id = str(Variable.get(LOOK_VARIABLE, default="") or "").strip()
        if not look_id:
            message = (
                f"No Look to sync: set the Airflow Variable {LOOK_VARIABLE} to the id of the Look to sync "
                f"when the datagroup {MODEL_NAME}::{DATAGROUP_NAME} refreshes (Admin > Variables, e.g. 42)."
            )
            log.warning("%s", message)
            raise AirflowSkipException(message)
        return look_id

    LookerToSegmentOperator(task_id="sync_cohort", look_id=resolve_look())
