"""What the built wheel ships: the provider, its data and metadata, and no test double."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_the_provider_and_no_stand_in_fixture_or_demo(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("airflow_provider_looker_segment-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    package = [name for name in names if name.startswith("airflow_provider_looker_segment/")]
    assert "airflow_provider_looker_segment/operators/looker_to_segment.py" in package
    assert "airflow_provider_looker_segment/data/segment-destinations.tsv" in package
    assert "airflow_provider_looker_segment/py.typed" in package
    assert not [
        name
        for name in names
        if not name.startswith(("airflow_provider_looker_segment/", "airflow_provider_looker_segment-"))
    ]
    doubles = [
        name for name in package if any(word in name for word in ("standin", "fixture", "demo", "testing"))
    ]
    assert doubles == []
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "get_provider_info" in zipfile.ZipFile(wheel).read(entry_points).decode()
