"""
The datagroups of the Looker API stand-in (``GET /api/4.0/datagroups``: ``all_datagroups``, a list of
``Datagroup`` as the API 4.0 reference documents it), whose ``triggered_at`` advances on a script:
:meth:`Datagroups.trigger` (a test, or ``POST /standin/datagroups/{model}/{name}/trigger`` from a shell), or
a schedule (:meth:`Datagroups.every`: it advances every so many seconds, computed when asked).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

#: The fixture datagroups: (model_name, name, triggered_at). 1764547200 is 2025-12-01T00:00:00Z.
FIXTURE_DATAGROUPS = (
    ("toastmates", "nightly_etl", 1_764_547_200),
    ("toastmates", "hourly_sessions", 1_764_543_600),
    ("b2b", "accounts_refresh", None),
)


@dataclass
class Datagroup:
    """One datagroup; ``every``: it is triggered every so many seconds from ``since`` (a schedule)."""

    id: str
    model_name: str
    name: str
    created_at: int
    triggered_at: int | None = None
    trigger_check_at: int | None = None
    trigger_value: str | None = None
    trigger_error: str | None = None
    every: float | None = None
    since: float = 0.0

    def json(self, now: float) -> dict[str, Any]:
        """The ``Datagroup`` as Looker answers it (its schedule applied as of ``now``)."""
        triggered_at = self.triggered_at
        if self.every:
            ticks = int((now - self.since) // self.every)
            if ticks > 0:
                triggered_at = max(triggered_at or 0, int(self.since + ticks * self.every))
        return {
            "can": {"update": True},
            "created_at": self.created_at,
            "id": self.id,
            "model_name": self.model_name,
            "name": self.name,
            "stale_before": None,
            "trigger_check_at": int(now) if self.every else self.trigger_check_at,
            "trigger_error": self.trigger_error,
            "trigger_value": self.trigger_value if not self.every else str(triggered_at),
            "triggered_at": triggered_at,
        }


class Datagroups:
    """The stand-in's datagroups (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: dict[tuple[str, str], Datagroup] = {}
        for model, name, triggered_at in FIXTURE_DATAGROUPS:
            self.add(model, name, triggered_at=triggered_at)

    def add(self, model: str, name: str, *, triggered_at: int | None = None) -> None:
        """Add (or replace) a datagroup."""
        with self._lock:
            key = (model, name)
            known = self._groups.get(key)
            group_id = known.id if known else str(len(self._groups) + 1)
            self._groups[key] = Datagroup(
                group_id, model, name, 1_733_011_200, triggered_at, triggered_at, str(triggered_at)
            )

    def remove(self, model: str, name: str) -> None:
        """Remove a datagroup (as a LookML deploy that drops it)."""
        with self._lock:
            self._groups.pop((model, name), None)

    def trigger(self, model: str, name: str, at: int | None = None) -> int:
        """
        Trigger a datagroup (Looker's check found a new trigger value): ``triggered_at`` becomes ``at``, by
        default now (one second after the previous value at least); return it.

        :raises KeyError: no such datagroup.
        """
        with self._lock:
            group = self._groups[(model, name)]
            value = int(at) if at is not None else max(int(time.time()), (group.triggered_at or 0) + 1)
            group.triggered_at = group.trigger_check_at = value
            group.trigger_value = f"{model}:{name}:{value}"
            return value

    def every(self, model: str, name: str, seconds: float) -> None:
        """Trigger a datagroup every ``seconds`` from now on (a schedule, applied when it is read)."""
        with self._lock:
            group = self._groups[(model, name)]
            group.every, group.since = float(seconds), time.time()

    def fail_checks(self, model: str, name: str, error: str | None) -> None:
        """Make Looker report ``error`` (``trigger_error``) for the datagroup's trigger check."""
        with self._lock:
            self._groups[(model, name)].trigger_error = error

    def triggered_at(self, model: str, name: str) -> int | None:
        """The datagroup's ``triggered_at`` now."""
        now = time.time()
        with self._lock:
            return self._groups[(model, name)].json(now)["triggered_at"]

    def json(self) -> list[dict[str, Any]]:
        """``GET /datagroups``'s answer."""
        now = time.time()
        with self._lock:
            return [group.json(now) for group in self._groups.values()]
