"""``make demo`` runs end to end: the seed's Look through Airflow into the Segment stand-in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from standins.demo import SEED_CALL

ROOT = Path(__file__).resolve().parents[1]


def test_demo_reproduces_the_seed_example(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LOOKERSDK_"))}
    done = subprocess.run(
        [sys.executable, "-m", "standins.demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    out = done.stdout
    assert "Segment received 10 identify calls" in out
    assert "matches Segment's reference example" in out
    first = json.loads(out.split("the first ones:\n", 1)[1].splitlines()[0])
    assert {key: first[key] for key in SEED_CALL} == SEED_CALL
    summary = json.loads(out.split("Task summary (XCom return_value):\n", 1)[1].splitlines()[0])
    assert (summary["rows"], summary["sent"], summary["invalid"]) == (10, 10, 0)
    assert "demo-write-key" not in done.stdout + done.stderr.replace("SEGMENT_STANDIN_WRITE_KEY", "")
