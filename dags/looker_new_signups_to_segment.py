"""
New sign-ups of the day, from Looker to Segment: a daily, deferrable sync whose Look is filtered on the
run's data interval.

The Look (set in the Airflow Variable ``looker_segment_signups_look_id``) lists users with their sign-up
date; each run replaces the Look's own date filter with the run's data interval (the day before the run),
waits for Looker's query in the triggerer (no worker slot held), and sends those users to Segment.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, Variable, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException
from airflow.timetables.interval import CronDataIntervalTimetable

from airflow_provider_looker_segment.operators.looker_to_segment import LookerToSegmentOperator

#: The Airflow Variable naming the sign-ups Look (Admin → Variables, e.g. ``17``).
SIGNUPS_LOOK_VARIABLE = "looker_segment_signups_look_id"
#: The sign-up date field filtered on the run's data interval when the trigger form leaves it empty.
DEFAULT_DATE_FIELD = "users.created_date"

log = logging.getLogger(__name__)

DOC = """
### New sign-ups of the day → Segment

Every day, the users who signed up the day before: the Look set in the Airflow Variable
`looker_segment_signups_look_id` runs with its **date_field** filter replaced by the run's data interval
(`2026-11-28 to 2026-11-29`: that day, in Looker's filter syntax), as a Looker query task that the
triggerer waits for (the task shows **deferred** meanwhile, holding no worker slot); then each row becomes
one call (**call**, default `identify`; `track` with **event** for a journey tool). The task's
**Looker Look** link (Details > Extra Links) opens the Look with the day's filter. While the Variable is
not set, runs are skipped with a message saying so. `catchup` is off: a paused DAG does not send past days
when it is switched back on (trigger a run with a logical date to send a past day); unpausing it once the
Variable is set sends the latest day at once.
"""

with DAG(
    dag_id="looker_new_signups_to_segment",
    description="Send the day's new sign-ups from a Looker Look to Segment (deferrable, filtered by day)",
    doc_md=DOC,
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
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
            description=f"The sign-ups Look; empty: the Airflow Variable {SIGNUPS_LOOK_VARIABLE}.",
        ),
        "date_field": Param(
            DEFAULT_DATE_FIELD,
            type=["string", "null"],
            minLength=1,
            title="Sign-up date field",
            description="The Looker field filtered on the run's data interval. Default: "
            f"{DEFAULT_DATE_FIELD}.",
        ),
        "call": Param(
            "identify",
            type=["string", "null"],
            enum=["identify", "track", None],
            values_display={None: "(empty: identify)"},
            title="Call type",
            description="identify: user traits; track: an event per new user (set the Event name). "
            "Default: identify.",
        ),
        "event": Param(
            None,
            type=["null", "string"],
            title="Event name",
            description="Required when Call type is track: the event name, e.g. 'Signed Up' (a track run "
            "without it fails at once, before Looker is read). Leave it empty otherwise.",
        ),
        "dry_run": Param(
            False,
            type=["boolean", "null"],
            title="Dry run",
            description="Build every call, send none. Default: off.",
        ),
    },
) as dag:

    @task
    def plan_run(params: dict[str, Any] | None = None) -> dict[str, Any]:
        """
        The sign-ups Look (the trigger form's, else the Variable's; skip the run when neither is set) and its
        filter: the date field → the run's data interval in Looker's syntax, ``"2026-11-28 to 2026-11-29"``
        (start day included, end day excluded). A run triggered without a logical date has no data
        interval: it takes the day before it started.
        """
        params = params or {}
        look_id = str(params.get("look_id") or "").strip()
        if not look_id:
            look_id = str(Variable.get(SIGNUPS_LOOK_VARIABLE, default="") or "").strip()
        if not look_id:
            message = (
                f"No Look to sync: set the Airflow Variable {SIGNUPS_LOOK_VARIABLE} to the id of the "
                "sign-ups Look (Admin > Variables, e.g. 17), or trigger the DAG with a look_id."
            )
            log.warning("%s", message)  # the task log shows it; the skip alone would not
            raise AirflowSkipException(message)
        context = get_current_context()
        start, end = context.get("data_interval_start"), context.get("data_interval_end")
        if start is None or end is None:
            end = context["dag_run"].run_after.replace(hour=0, minute=0, second=0, microsecond=0)
            start = end - timedelta(days=1)
        interval = f"{start.date().isoformat()} to {end.date().isoformat()}"
        date_field = str(params.get("date_field") or "").strip() or DEFAULT_DATE_FIELD
        log.info("Sign-ups of %s (Looker filter %s = %r)", start.date(), date_field, interval)
        return {"look_id": look_id, "filters": {date_field: interval}}

    run = plan_run()
    LookerToSegmentOperator(
        task_id="sync_signups",
        look_id=run["look_id"],
        filters=run["filters"],
        call="{{ params.call }}",
        event="{{ params.event }}",
        dry_run="{{ params.dry_run }}",
        deferrable=True,
        poll_interval=10,
        query_timeout=timedelta(hours=2),
    )
