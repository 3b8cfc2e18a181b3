"""Test set-up shared by the whole suite.

Airflow reads its configuration when first imported, so AIRFLOW_HOME (a throw-away folder) and the other
settings are fixed here, before any test module imports airflow.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

_AIRFLOW_HOME = tempfile.mkdtemp(prefix="lsg-airflow-home-")
os.environ.setdefault("AIRFLOW_HOME", _AIRFLOW_HOME)
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")
# dag.test() runs only DAGs of the configured bundle: the dags folder of the tests holds the project's example
# DAGs and the tests' own DAGs (tests/dag_files), linked into a throw-away folder.
_DAGS_FOLDER = Path(tempfile.mkdtemp(prefix="lsg-dags-"))
for _source in [
    *(Path(__file__).resolve().parents[1] / "dags").glob("*.py"),
    *(Path(__file__).resolve().parent / "dag_files").glob("*.py"),
]:
    (_DAGS_FOLDER / _source.name).symlink_to(_source)
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(_DAGS_FOLDER))
# Ambient Looker SDK settings must never leak into a test: the hook ignores them, and so do we.
for _name in [n for n in os.environ if n.startswith("LOOKERSDK_")]:
    del os.environ[_name]

# Helper modules in tests/ (looker_helpers, segment_helpers, ...) and the stand-ins (the package
# tests/standins) are imported by name, here and in the child processes the tests start.
_TESTS_DIR = str(Path(__file__).resolve().parent)
sys.path.insert(0, _TESTS_DIR)
os.environ["PYTHONPATH"] = os.pathsep.join(
    dict.fromkeys([_TESTS_DIR, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
)


@pytest.fixture(scope="session")
def airflow_db() -> str:
    """Create the metadata database (SQLite in AIRFLOW_HOME) once; ``dag.test()`` needs it."""
    from airflow.utils import db

    db.initdb()
    return os.environ["AIRFLOW_HOME"]
