"""
Benchmark child: segment-analytics-python, the library behind apache-airflow-providers-segment.

Runs in the benchmark's own venv (``bench/.venv``: looker-sdk, requests, segment-analytics-python only; never
this provider's runtime). The Look is fetched with looker_sdk's ``run_look(look_id, result_format="json",
limit=-1)`` (``limit=-1``: all rows, not the saved limit of 5,000), parsed with ``json.loads``; each row
becomes one ``analytics.identify(user_id, traits)`` with the same trait keys as ours (the fields' short
labels: ``email``, ``name``, ``plan``, ``sessions count``), then ``analytics.flush()`` waits until the
library's consumer thread has posted everything.

Modes: ``A`` sets ``max_queue_size`` above the row count, so nothing is dropped; ``B`` keeps the library's
defaults (a queue of 10,000: ``identify`` drops events, with a warning, while the queue is full).

Config (JSON argument): ``look_id``, ``mode``, ``looker_url``, ``client_id``, ``client_secret``,
``segment_url``, ``write_key``.
"""

from __future__ import annotations

from probe import Probe, read_config

PROBE = Probe()

import json  # noqa: E402
from typing import Any  # noqa: E402

import looker_sdk  # noqa: E402
from looker_sdk.rtl import api_settings  # noqa: E402
from looker_sdk.sdk import constants  # noqa: E402
from segment import analytics  # noqa: E402

#: Looker field → trait key, as the provider names them by default (short label, lower case).
TRAITS = {
    "users.email": "email",
    "users.name": "name",
    "users.plan": "plan",
    "users.sessions_count": "sessions count",
}
USER_ID_FIELD = "users.id"


class StringApiSettings(api_settings.ApiSettings):
    """looker_sdk settings from a dict only (no looker.ini, no LOOKERSDK_*); values must be strings."""

    def __init__(self, values: dict[str, str]) -> None:
        self._values = dict(values)
        super().__init__(filename="", sdk_version=constants.sdk_version, env_prefix=None)

    def read_config(self) -> api_settings.SettingsConfig:
        """Return the settings (strings only: looker_sdk silently drops other types)."""
        return dict(self._values)  # type: ignore[return-value]


def main() -> None:
    """Fetch the Look, identify every row, flush; print the measurements and the client's drop count."""
    config = read_config()
    PROBE.mark("imported")
    sdk = looker_sdk.init40(
        config_settings=StringApiSettings(
            {
                "base_url": config["looker_url"].rstrip("/"),
                "client_id": config["client_id"],
                "client_secret": config["client_secret"],
                "verify_ssl": "true",
                "timeout": "600",
            }
        )
    )
    body: Any = sdk.run_look(str(config["look_id"]), result_format="json", limit=-1)
    rows = json.loads(body)
    del body
    PROBE.mark("fetched")
    analytics.write_key = config["write_key"]
    analytics.host = config["segment_url"]
    if config["mode"] == "A":
        analytics.max_queue_size = len(rows) + 1000
    traits_of = tuple(TRAITS.items())
    dropped = 0
    for row in rows:
        queued, _message = analytics.identify(row[USER_ID_FIELD], {key: row[name] for name, key in traits_of})
        if not queued:
            dropped += 1
    PROBE.mark("queued")
    analytics.flush()
    PROBE.mark("done")
    PROBE.emit(
        rows=len(rows),
        sent=len(rows) - dropped,
        dropped_by_client=dropped,
        rejected=0,
        failed=0,
        max_queue_size=analytics.max_queue_size,
        fetch=PROBE.span("imported", "fetched"),
        enqueue=PROBE.span("fetched", "queued"),
        flush=PROBE.span("queued", "done"),
    )
    analytics.shutdown()


if __name__ == "__main__":
    main()
