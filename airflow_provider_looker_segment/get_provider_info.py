"""Provider metadata read by Airflow through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations

from typing import Any

from airflow_provider_looker_segment import PACKAGE_NAME, __version__


def get_provider_info() -> dict[str, Any]:
    """
    Return the provider's metadata: hooks, operators and the two connection types.

    Airflow 3's UI builds the connection forms from ``conn-fields`` and ``ui-field-behaviour`` here. The
    numeric fields' schemas carry the bounds the hooks accept (``minimum``, ``maximum``: the form's number
    inputs keep to them), so the form cannot save a value the task would refuse.
    """
    return {
        "package-name": PACKAGE_NAME,
        "name": "Looker to Segment",
        "description": (
            "Sync Looker cohorts (Looks) into Segment as identify, group or track calls through the "
            "Tracking API."
        ),
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "Looker",
                "external-doc-url": "https://cloud.google.com/looker/docs/api-intro",
                "tags": ["service"],
            },
            {
                "integration-name": "Segment",
                "external-doc-url": "https://segment.com/docs/connections/sources/catalog/libraries/server/http-api/",
                "tags": ["service"],
            },
        ],
        "hooks": [
            {
                "integration-name": "Looker",
                "python-modules": ["airflow_provider_looker_segment.hooks.looker"],
            },
            {
                "integration-name": "Segment",
                "python-modules": ["airflow_provider_looker_segment.hooks.segment"],
            },
        ],
        "operators": [
            {
                "integration-name": "Segment",
                "python-modules": ["airflow_provider_looker_segment.operators.looker_to_segment"],
            }
        ],
        "triggers": [
            {
                "integration-name": "Looker",
                "python-modules": ["airflow_provider_looker_segment.triggers.looker"],
            }
        ],
        "extra-links": [
            "airflow_provider_looker_segment.links.LookerLookLink",
            "airflow_provider_looker_segment.links.LookerExploreLink",
        ],
        "connection-types": [
            {
                "hook-class-name": "airflow_provider_looker_segment.hooks.looker.LookerHook",
                "hook-name": "Looker",
                "connection-type": "looker",
                "conn-fields": {
                    "verify_ssl": {
                        "label": "Verify SSL",
                        "description": (
                            "Verify the Looker server's TLS certificate "
                            "(switch off only for self-signed test servers)."
                        ),
                        "schema": {"type": ["boolean", "null"], "default": True},
                    },
                    "timeout": {
                        "label": "Timeout (seconds)",
                        "description": (
                            "HTTP timeout for each Looker API call and each read of the result: at least 1 "
                            "second; empty: 120."
                        ),
                        "schema": {"type": ["integer", "null"], "default": 120, "minimum": 1},
                    },
                    "warehouse_namespace": {
                        "label": "Warehouse namespace (lineage)",
                        "description": (
                            "OpenLineage namespace of the database Looker's models query, for the tables "
                            "read by a synced query (e.g. postgres://warehouse.internal:5432, bigquery, "
                            "snowflake://org-account); empty: looker-sql://<Looker host>."
                        ),
                        "schema": {"type": ["string", "null"]},
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "extra"],
                    "relabeling": {
                        "host": "Looker API base URL",
                        "login": "Client ID (API key)",
                        "password": "Client secret (API key)",
                    },
                    "placeholders": {
                        "host": "https://company.cloud.looker.com",
                        "port": "443 (or 19999 for older self-hosted instances)",
                        "login": "Client ID of a Looker API key (Admin > Users > Edit Keys)",
                        "password": "Client secret of that API key",
                    },
                },
            },
            {
                "hook-class-name": "airflow_provider_looker_segment.hooks.segment.SegmentHook",
                "hook-name": "Segment Tracking API",
                "connection-type": "segment_tracking",
                "conn-fields": {
                    "timeout": {
                        "label": "Timeout (seconds)",
                        "description": "HTTP timeout for each batch request: at least 1 second; empty: 30.",
                        "schema": {"type": ["integer", "null"], "default": 30, "minimum": 1},
                    },
                    "gzip": {
                        "label": "Gzip request bodies",
                        "description": "Compress batch requests (Content-Encoding: gzip).",
                        "schema": {"type": ["boolean", "null"], "default": False},
                    },
                    "max_in_flight": {
                        "label": "Requests in flight (cap)",
                        "description": (
                            "Most batch requests in flight at once, from 1 to 64; below it, the number "
                            "adapts to Segment's measured round trip. Empty: 32."
                        ),
                        "schema": {"type": ["integer", "null"], "default": 32, "minimum": 1, "maximum": 64},
                    },
                    "requests_per_second": {
                        "label": "Rate limit (requests per second)",
                        "description": (
                            "Optional client-side cap, at least 0.1 (one request every 10 s); empty: "
                            "Segment's guidance, 1,000."
                        ),
                        "schema": {"type": ["number", "null"], "minimum": 0.1},
                    },
                    "events_per_second": {
                        "label": "Pace (events per second)",
                        "description": (
                            "Optional ceiling on each task's events per second, at least 1: Segment "
                            "takes 1,000 per workspace (Engage too), shared by the tasks sending at once; "
                            "empty: none."
                        ),
                        "schema": {"type": ["number", "null"], "minimum": 1},
                    },
                    "source_name": {
                        "label": "Source name (lineage)",
                        "description": (
                            "The Segment source's name in OpenLineage events (e.g. looker-cohorts); empty: "
                            "source- and a short one-way hash of the write key (never the key)."
                        ),
                        "schema": {"type": ["string", "null"]},
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login", "extra"],
                    "relabeling": {"host": "Tracking API base URL", "password": "Write key"},
                    "placeholders": {
                        "host": "https://api.segment.io (EU: https://events.eu1.segmentapis.com)",
                        "password": "Source write key",
                    },
                },
            },
        ],
    }
