"""
Benchmark child: this provider's pipeline end to end, as the operator runs it.

``LookerToSegmentOperator(task_id=..., look_id=...).execute(context)`` with a minimal context (a ``ti`` with
``dag_id``, ``task_id``, ``run_id`` and ``map_index``; no ``outlet_events``), default arguments otherwise:
LookerHook stream → transform → SegmentHook batches (adaptive window, at most 32 requests in flight). The
connections come from ``AIRFLOW_CONN_LOOKER_DEFAULT`` / ``AIRFLOW_CONN_SEGMENT_DEFAULT`` set by the launcher
(the Segment one with the extra ``events_per_second`` for the pacing check), ``AIRFLOW_HOME`` is a throw-away
folder. The ``imported`` mark follows the import of the operator (Airflow's task SDK included); everything
after it - operator construction, connection look-ups, Looker login, the Look's definition, the streamed
run, delivery - is the pipeline.

Config (JSON argument): ``look_id``, ``run_id``; optionally ``options``, more operator arguments (e.g.
``sync_mode``, ``state_path`` for the scale section).
"""

from __future__ import annotations

from probe import Probe, read_config

PROBE = Probe()

from types import SimpleNamespace  # noqa: E402

from airflow_provider_looker_segment.operators.looker_to_segment import LookerToSegmentOperator  # noqa: E402

DAG_ID = "bench_looker_to_segment"
TASK_ID = "sync"


def main() -> None:
    """Run the operator once and print the measurements with the task's summary."""
    config = read_config()
    PROBE.mark("imported")
    operator = LookerToSegmentOperator(
        task_id=TASK_ID, look_id=config["look_id"], **config.get("options", {})
    )
    ti = SimpleNamespace(dag_id=DAG_ID, task_id=TASK_ID, run_id=config["run_id"], map_index=-1)
    summary = operator.execute({"ti": ti})  # type: ignore[arg-type]
    PROBE.mark("done")
    PROBE.emit(
        rows=summary["rows"],
        sent=summary["sent"],
        rejected=summary["rejected"],
        failed=summary["failed"],
        invalid=summary["invalid"],
        batches=summary["batches"],
        requests=summary["requests"],
        bytes=summary["bytes"],
        cohort={
            key: summary[key]
            for key in (
                "new",
                "changed",
                "unchanged",
                "departed",
                "exited",
                "spool_bytes",
                "state_identities",
                "state_bytes",
                "state_load_seconds",
                "state_save_seconds",
            )
            if key in summary
        },
    )


if __name__ == "__main__":
    main()
