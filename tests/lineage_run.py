"""
Run the operator test DAG under OpenLineage's file transport in a process of its own: OpenLineage reads its
configuration once per process, so tests/test_lineage.py starts this one with ``AIRFLOW__OPENLINEAGE__*``
set. Argument: a JSON list of runs, each ``{"conf": {...}, "env": {...}}`` (the environment a run adds, e.g.
another Segment connection); prints each run's state.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

DAG_FILE = Path(__file__).resolve().parent / "dag_files" / "lsg_operator_test.py"


def main(runs: list[dict]) -> int:
    from airflow.utils import db

    db.initdb()
    spec = importlib.util.spec_from_file_location("lsg_operator_test", DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for run in runs:
        os.environ.update(run.get("env") or {})
        dag_run = module.dag.test(run_conf=run["conf"])
        print(f"LINEAGE-RUN {dag_run.state}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(json.loads(sys.argv[1])))
