"""Test set-up shared by the whole suite.

Airflow reads its configuration when first imported, so AIRFLOW_HOME (a throw-away folder) and the other
settings are fixed here, before any test module imports airflow.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

_AIRFLOW_HOME = tempfile.mkdtemp(prefix="lsg-airflow-home-")
os.environ.setdefault("AIRFLOW_HOME", _AIRFLOW_HOME)
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(Path(__file__).resolve().parents[1] / "dags"))
# Ambient Looker SDK settings must never leak into a test: the hook ignores them, and so do we.
for _name in [n for n in os.environ if n.startswith("LOOKERSDK_")]:
    del os.environ[_name]

# Helper modules in tests/ (looker_helpers, segment_helpers, ...) are imported by name.
sys.path.insert(0, str(Path(__file__).resolve().parent))
