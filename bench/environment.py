"""The machine and the package versions a benchmark report names (main venv and baseline venv)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import textwrap
from importlib import metadata
from typing import Any

#: Packages whose versions the report gives, from the main venv.
MAIN_PACKAGES = (
    "airflow-provider-looker-segment",
    "apache-airflow",
    "apache-airflow-task-sdk",
    "looker-sdk",
    "requests",
    "urllib3",
    "orjson",
    "ijson",
)
#: Packages whose versions the report gives, from the baseline's venv.
BASELINE_PACKAGES = ("segment-analytics-python", "looker-sdk", "requests", "urllib3")


def machine_info() -> dict[str, Any]:
    """Cores, memory, CPU model, OS and Python of this machine."""
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "os": platform.platform(),
    }
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    info["memory_gib"] = round(int(line.split()[1]) / 1024**2, 1)
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    info["cpu"] = line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    return info


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of these distributions in this interpreter ("-" when absent)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "-"
    return versions


def baseline_versions(python: str) -> dict[str, str]:
    """Versions of the baseline's packages, asked of the baseline venv's python."""
    code = textwrap.dedent(
        """
        import json, sys
        from importlib import metadata
        out = {}
        for name in sys.argv[1:]:
            try:
                out[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                out[name] = "-"
        out["python"] = sys.version.split()[0]
        print(json.dumps(out))
        """
    )
    done = subprocess.run(
        [python, "-c", code, *BASELINE_PACKAGES], capture_output=True, text=True, check=False, timeout=120
    )
    return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr.strip()[-200:]}
