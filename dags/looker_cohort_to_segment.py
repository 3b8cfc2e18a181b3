"""
Daily sync of one Looker cohort (a Look) into Segment as identify, group or track calls.

Trigger it from the Airflow UI ("Trigger DAG") to sync another Look or any Looker query (by id, or the
``qid`` of an Explore URL), to choose the call type, to name the destinations to check, or to make a dry
run.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, Asset, Param, Variable, task
from airflow.sdk.exceptions import AirflowSkipException

from airflow_provider_looker_segment.operators.looker_to_segment import LookerToSegmentOperator

#: The Airflow Variable giving the state path of changed-only syncs when the trigger form leaves it empty.
STATE_PATH_VARIABLE = "looker_segment_state_path"
#: ``state_path``: the trigger form's value, else the Variable, else "" (the operator's default folder).
STATE_PATH_TEMPLATE = "{{ params.state_path or var.value.get('looker_segment_state_path', '') }}"

#: The Airflow Variable naming the Look that the daily schedule syncs (Admin → Variables, e.g. ``42``).
DAILY_LOOK_VARIABLE = "looker_segment_daily_look_id"

#: Downstream DAGs can be scheduled on this asset: it is updated after every completed sync, its event
#: carrying the Look id and the figures; a dry run emits no event.
COHORT_SYNCED = Asset(
    name="looker_cohort_synced_to_segment",
    uri="segment://segment_default/looker/looker_default/looks/daily",
)


log = logging.getLogger(__name__)

DOC = """
### Looker cohort → Segment

Reads the Look given by **look_id** from the Looker API (connection `looker_default`) and sends one
Segment call per row through the Tracking API (connection `segment_default`):

* **call**: `identify` (user traits), `group` (account traits; the field tagged `segment_group_id` or
  named like an account id gives `groupId`) or `track` (an event named **event**, the columns as its
  properties);
* the user id column gives `userId`, the email column gives `traits.email`, every other visible column
  becomes a trait (key style set by **trait_key_style**);
* **destinations** (optional): the Segment destinations this source feeds; the run fails before sending
  anything if the Look lacks an identifier one of them needs;
* **look_id**: the Look to sync; empty = the Airflow Variable `looker_segment_daily_look_id`, which is
  what the `@daily` schedule syncs. While neither is set, a run is skipped with a message saying so;
* **query_id** / **query_slug** (instead of a Look): any Looker query, by its id or by the `qid` of an
  Explore URL (`/explore/model/explore?qid=aogBgL6o3cKK1jN3RoZl5s`); give one source only;
* **dry_run**: build and validate every call and log examples, send nothing;
* **sync_mode**: `all` sends every row on every run; `changed` sends only the users who are new or whose
  traits changed since the last sync of this Look; **full_refresh** resends everything and rebuilds that
  state; **entered_event** / **exited_event** (with `changed`) also send a track event for each identity
  that entered or left the cohort;
* **state_path** (optional): where `changed` keeps its state, e.g.
  `s3://aws_default@my-bucket/looker-segment-state/`; empty = the Airflow Variable
  `looker_segment_state_path`, and without it `$AIRFLOW_HOME/looker_segment_state` on the worker, which
  is right only when every task runs on one machine (with several workers, use shared storage).

The task returns a summary (XCom `return_value`): rows read, events sent, invalid rows by reason,
rejected and failed events, batches, which fields gave the identifiers, and the trait keys.
"""

with DAG(
    dag_id="looker_cohort_to_segment",
    description="Sync a Looker cohort (Look) into Segment as identify, group or track calls",
    doc_md=DOC,
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["looker", "segment", "cohort"],
    render_template_as_native_obj=True,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=5)},
    params={
        "look_id": Param(
            None,
            type=["null", "string"],
            title="Look id",
            description="Id of the Look to sync, as in https://company.cloud.looker.com/looks/42. "
            f"Empty: the Airflow Variable {DAILY_LOOK_VARIABLE} (the Look of the daily schedule), unless a "
            "query is given below.",
        ),
        "query_id": Param(
            None,
            type=["null", "string"],
            title="Query id (instead of a Look)",
            description="Any Looker query, by its id (an Explore's query, as the API names it). Leave Look "
            "id empty when you give it.",
        ),
        "query_slug": Param(
            None,
            type=["null", "string"],
            title="Explore URL's qid (instead of a Look)",
            description="Any Looker query, by the qid of its Explore URL (/explore/model/explore?qid="
            "aogBgL6o3cKK1jN3RoZl5s) or the last part of a share URL (/x/vwGSbfc). Leave Look id empty.",
        ),
        "destinations": Param(
            None,
            type=["null", "array"],
            items={"type": "string"},
            title="Destinations to check",
            description="Segment destinations fed by this source (e.g. hubspot, intercom); the run "
            "fails before sending if the Look lacks an identifier one of them needs. "
            "Leave empty to skip the check.",
        ),
        "dry_run": Param(
            False,
            type=["boolean", "null"],
            title="Dry run",
            description="Read the Look and build every call, but send nothing (and tell no downstream DAG "
            "that a sync happened). Default: off.",
        ),
        "call": Param(
            "identify",
            type=["string", "null"],
            enum=["identify", "group", "track", None],
            values_display={None: "(empty: identify)"},
            title="Call type",
            description="identify: user traits; group: account traits with a groupId (Totango, "
            "Gainsight...); track: an event per row, the columns as its properties (Braze, Customer.io...); "
            "track needs an Event name. Default: identify.",
        ),
        "event": Param(
            None,
            type=["null", "string"],
            title="Event name",
            description="Required when Call type is track: the event name, e.g. 'Joined VIP cohort' (a "
            "track run without it fails at once, before Looker is read). Leave it empty otherwise.",
        ),
        "entered_event": Param(
            None,
            type=["null", "string"],
            title="Entered event",
            description="With sync mode 'changed': also send this track event for each identity that "
            "entered the cohort since the last sync (e.g. 'Entered VIP cohort').",
        ),
        "exited_event": Param(
            None,
            type=["null", "string"],
            title="Exited event",
            description="With sync mode 'changed': also send this track event for each identity that "
            "left the cohort since the last sync (e.g. 'Left VIP cohort').",
        ),
        "trait_key_style": Param(
            "label",
            type=["string", "null"],
            enum=["label", "snake", "field", None],
            values_display={None: "(empty: label)"},
            title="Trait key style",
            description="label: 'sessions count' (Segment's Looker source); snake: 'sessions_count'; "
            "field: 'users.sessions_count' (Looker's own Segment action). Default: label.",
        ),
        "sync_mode": Param(
            "all",
            type=["string", "null"],
            enum=["all", "changed", None],
            values_display={None: "(empty: all)"},
            title="Sync mode",
            description="all: send every row; changed: send only users who are new or whose traits "
            "changed since the last sync of this Look to this Segment source. Default: all.",
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
    def resolve_look(params: dict[str, Any] | None = None) -> str | None:
        """
        The Look to sync: the trigger form's, else the Variable's (none when the form names a query); skip
        the run when there is nothing to sync.
        """
        params = params or {}
        look_id = str(params.get("look_id") or "").strip()
        if not look_id and (params.get("query_id") or params.get("query_slug")):
            return None  # the operator syncs the query (and refuses a Look given with it)
        if not look_id:
            look_id = str(Variable.get(DAILY_LOOK_VARIABLE, default="") or "").strip()
        if not look_id:
            message = (
                f"No Look to sync: set the Airflow Variable {DAILY_LOOK_VARIABLE} to the id of the Look "
                "of the daily sync (Admin > Variables, e.g. 42), or trigger the DAG with a look_id."
            )
            log.warning("%s", message)  # the task log shows it; the skip alone would not
            raise AirflowSkipException(message)
        return look_id

    LookerToSegmentOperator(
        task_id="sync_cohort",
        look_id=resolve_look(),
        query_id="{{ params.query_id }}",
        query_slug="{{ params.query_slug }}",
        destinations="{{ params.destinations }}",
        dry_run="{{ params.dry_run }}",
        call="{{ params.call }}",
        event="{{ params.event }}",
        entered_event="{{ params.entered_event }}",
        exited_event="{{ params.exited_event }}",
        trait_key_style="{{ params.trait_key_style }}",
        sync_mode="{{ params.sync_mode }}",
        full_refresh="{{ params.full_refresh }}",
        state_path=STATE_PATH_TEMPLATE,
        outlets=[COHORT_SYNCED],
    )
