"""Airflow connections (``AIRFLOW_CONN_<ID>`` JSON values) that point at the local stand-ins."""

from __future__ import annotations

import json

# The stand-ins' demo credentials (not secrets: they only open the local stand-ins).
from standins.looker_standin import (
    DEFAULT_CLIENT_ID as DEMO_LOOKER_CLIENT_ID,
)
from standins.looker_standin import (
    DEFAULT_CLIENT_SECRET as DEMO_LOOKER_CLIENT_SECRET,
)
from standins.segment_standin import (
    DEFAULT_WRITE_KEY as DEMO_SEGMENT_WRITE_KEY,
)


def looker_connection(
    base_url: str, client_id: str = DEMO_LOOKER_CLIENT_ID, client_secret: str = DEMO_LOOKER_CLIENT_SECRET
) -> str:
    """A ``looker`` connection in JSON form."""
    return json.dumps(
        {"conn_type": "looker", "host": base_url, "login": client_id, "password": client_secret}
    )


def segment_connection(base_url: str, write_key: str | None = DEMO_SEGMENT_WRITE_KEY) -> str:
    """A ``segment_tracking`` connection in JSON form (``write_key=None``: a connection without one)."""
    conn = {"conn_type": "segment_tracking", "host": base_url}
    if write_key is not None:
        conn["password"] = write_key
    return json.dumps(conn)


def standin_connections(looker_url: str, segment_url: str) -> dict[str, str]:
    """``AIRFLOW_CONN_LOOKER_DEFAULT`` and ``AIRFLOW_CONN_SEGMENT_DEFAULT`` for the two stand-ins."""
    return {
        "AIRFLOW_CONN_LOOKER_DEFAULT": looker_connection(looker_url),
        "AIRFLOW_CONN_SEGMENT_DEFAULT": segment_connection(segment_url),
    }
