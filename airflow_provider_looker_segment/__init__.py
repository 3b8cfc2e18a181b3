"""Apache Airflow provider that syncs Looker cohorts (Looks) into Segment as ``identify`` calls."""

from __future__ import annotations

__version__ = "0.1.0"
PACKAGE_NAME = "airflow-provider-looker-segment"

__all__ = ["PACKAGE_NAME", "__version__"]
