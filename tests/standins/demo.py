"""
``make demo``: sync the seed's Look into Segment through real Airflow, on this machine only.

It starts the Looker API stand-in and the Segment stand-in on 127.0.0.1, points the ``looker_default`` and
``segment_default`` connections at them, creates a throw-away Airflow home (SQLite), runs the example DAG
``looker_cohort_to_segment`` with ``dag.test()`` for Look 1 (Segment's "Active users, last 30 days" example)
and prints what Segment received and the task's summary. Nothing leaves the machine.

Run it with ``python -m standins.demo [--look-id 1] [--keep-home]``.
The exit status is 0 when Segment received the seed's reference ``identify`` call, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

#: Segment's reference example of the Looker source, which the first row of Look 1 must reproduce.
SEED_CALL = {
    "type": "identify",
    "userId": "00MWWFOLRcETcTCf",
    "traits": {"name": "Ty Arthur", "email": "ty.arthur@segment.com", "sessions count": 2},
}
DAG_ID = "looker_cohort_to_segment"
TASK_ID = "sync_cohort"


def find_dags_folder() -> Path:
    """Return the project's ``dags/`` folder (the demo runs from a source checkout)."""
    for candidate in (Path.cwd() / "dags", Path(__file__).resolve().parents[2] / "dags"):
        if (candidate / f"{DAG_ID}.py").is_file():
            return candidate
    raise SystemExit(f"Cannot find dags/{DAG_ID}.py: run the demo from the project's folder (make demo).")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument(
        "--look-id", default="1", help="Look of the stand-in to sync (default: 1, the seed's)"
    )
    parser.add_argument("--keep-home", action="store_true", help="keep the temporary AIRFLOW_HOME")
    return parser.parse_args(argv)


def _prepare_environment(home: str, dags_folder: Path) -> None:
    """Airflow reads its settings at import: set them before anything imports airflow."""
    os.environ["AIRFLOW_HOME"] = home
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags_folder)
    os.environ.pop("AIRFLOW_VAR_LOOKER_SEGMENT_DAILY_LOOK_ID", None)  # the demo's --look-id decides


def read_return_value(dag_run: Any, task_id: str) -> Any:
    """A task's XCom ``return_value`` in a finished DAG run (e.g. the sync summary), from the metadata DB."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        value = session.scalars(
            select(XComModel.value).where(
                XComModel.dag_id == dag_run.dag_id,
                XComModel.run_id == dag_run.run_id,
                XComModel.task_id == task_id,
                XComModel.key == "return_value",
            )
        ).first()
    return json.loads(value) if isinstance(value, str) else value


def run_demo(look_id: str, dags_folder: Path) -> int:
    """Start the stand-ins, run the DAG, print the result; return the exit status."""
    import importlib.util

    from airflow.utils import db

    from standins.connections import standin_connections
    from standins.looker_standin import LookerStandIn
    from standins.segment_standin import SegmentStandIn

    with LookerStandIn() as looker, SegmentStandIn(record="full") as segment:
        os.environ.update(standin_connections(looker.base_url, segment.base_url))
        print(f"Looker API stand-in:  {looker.base_url}")
        print(f"Segment stand-in:     {segment.base_url}")
        db.initdb()
        spec = importlib.util.spec_from_file_location(DAG_ID, dags_folder / f"{DAG_ID}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        for task in module.dag.tasks:
            task.retries = 0  # a failing demo ends now, not after the DAG's retries 5 minutes apart
        dag_run = module.dag.test(run_conf={"look_id": look_id, "destinations": ["hubspot", "intercom"]})
        events = segment.events()
        summary = read_return_value(dag_run, TASK_ID)

    print("\n" + "=" * 100)
    print(f"DAG run {dag_run.run_id}: {dag_run.state}")
    print(f"Segment received {len(events)} identify calls; the first ones:")
    for event in events[:3]:
        print("  " + json.dumps(event))
    if dag_run.state != "success":
        print("The run failed: the task log above says why (the lines starting with [error]).")
    print("Task summary (XCom return_value):")
    print("  " + json.dumps(summary))
    first = (
        {key: events[0][key] for key in ("type", "userId", "traits") if key in events[0]} if events else {}
    )
    if look_id == "1":
        matches = first == SEED_CALL
        print(f"The first call {'matches' if matches else 'does NOT match'} Segment's reference example:")
        print("  " + json.dumps(SEED_CALL))
        return 0 if matches and dag_run.state == "success" else 1
    return 0 if dag_run.state == "success" else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``make demo``."""
    args = _parse_args(argv)
    dags_folder = find_dags_folder()
    home = tempfile.mkdtemp(prefix="looker-segment-demo-")
    _prepare_environment(home, dags_folder)
    try:
        return run_demo(str(args.look_id), dags_folder)
    finally:
        if args.keep_home:
            print(f"AIRFLOW_HOME kept at {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
