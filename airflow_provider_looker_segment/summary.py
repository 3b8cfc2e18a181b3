"""
The summary of a sync (the task's XCom ``return_value``; its keys: docs/summary.md), its log line, the error
that fails the task after it, and the figures attached to the task's outlet asset events.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from airflow.sdk import AssetAlias
from airflow.sdk.definitions.asset import BaseAsset

from airflow_provider_looker_segment.exceptions import (
    ExitGuardError,
    LookerSegmentError,
    SegmentDeliveryError,
    SyncStateError,
    SyncStateLockLostError,
    UndeliverableEventsError,
)
from airflow_provider_looker_segment.settings import SyncOptions

#: How a lost lock's state error starts (:func:`outcome_error` retries it as a lost lock).
LOCK_LOST = "This run lost the lock of its sync"
#: The summary keys attached to the task's outlet asset events.
ASSET_EVENT_KEYS = ("source", "look_id", "query_id", "rows", "sent", "invalid", "ran_at")


@dataclass
class CohortSummary:
    """What a ``sync_mode="changed"`` run did with the cohort (see the README's summary keys)."""

    new: int
    changed: int
    unchanged: int
    exited: int
    departed: int
    exits_skipped: str | None
    entered_events: int
    exited_events: int
    previous_cohort: int
    state_generation: int
    full_refresh: bool
    switched: int = 0
    pending: int = 0
    spool_bytes: int = 0
    state_saved: bool = False
    state_bytes: int | None = None
    state_load_seconds: float = 0.0
    state_save_seconds: float = 0.0
    state_identities: int | None = None
    exit_guard: str | None = None
    state_error: str | None = None


@dataclass
class SyncSummary:
    """The result of a sync, returned by the task (XCom) as :meth:`to_dict`; keys as in the README."""

    look_id: str | None
    dry_run: bool
    call: str
    event: str | None
    rows: int
    sent: int
    would_send: int | None
    invalid: int
    invalid_reasons: dict[str, int]
    duplicates: int
    rejected: int
    rejected_reasons: dict[str, int]
    rejected_message_ids: list[Any]
    failed: int
    failed_reasons: dict[str, int]
    failed_message_ids: list[Any]
    batches: int
    requests: int
    retries: int
    bytes: int
    identifiers: dict[str, Any]
    traits: dict[str, Any]
    destinations: list[str]
    limit: int
    sync_mode: str
    possibly_truncated: bool
    ran_at: str | None
    filters: dict[str, str] = field(default_factory=dict)
    events_by_type: dict[str, int] = field(default_factory=dict)
    groups_without_user: int = 0
    cohort: CohortSummary | None = None
    seconds: float = 0.0
    source: str = "look"
    query_id: str | None = None
    query_slug: str | None = None
    looker_api_calls: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How logs name the source: ``Look 42``, ``Query 123``."""
        if self.source == "look":
            return f"Look {self.look_id}"
        return f"Query {self.query_id or self.query_slug}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable summary: the cohort's keys are flattened in, unset optional ones left out."""
        summary = asdict(self)
        head = {key: summary.pop(key) for key in ("source", "look_id", "query_id", "query_slug")}
        cohort = summary.pop("cohort")
        seconds = summary.pop("seconds")
        if cohort is not None:
            for optional in ("state_identities", "exit_guard", "state_error", "state_bytes"):
                if cohort[optional] is None:
                    del cohort[optional]
            summary.update(cohort)
        summary["seconds"] = seconds
        return {**head, **summary}


def log_summary(log: logging.Logger | Any, summary: SyncSummary) -> None:
    """The summary's one line (and the truncation warning); the filters that ran were logged at the start."""
    per_type = ", ".join(f"{kind} {count:,}" for kind, count in sorted(summary.events_by_type.items()))
    verb = "would be sent" if summary.dry_run else "handed to Segment"
    log.info(
        "%s: %s rows read, %s sent, %s invalid, %s rejected, %s failed, %s batches in %.1f s%s%s%s",
        summary.label,
        f"{summary.rows:,}",
        f"{summary.sent:,}",
        f"{summary.invalid:,}",
        f"{summary.rejected:,}",
        f"{summary.failed:,}",
        f"{summary.batches:,}",
        summary.seconds,
        f" ({summary.duplicates:,} duplicate rows not sent)" if summary.duplicates else "",
        " (dry run: nothing sent)" if summary.dry_run else "",
        f"; events {verb} per call type: {per_type}" if per_type else "",
    )
    if summary.groups_without_user:
        log.warning(
            "%s: %s group calls %s no user identifier but the anonymousId derived from the group id: "
            "Segment counts each anonymousId not tied to a userId as a monthly tracked user. Set "
            "group_without_user='skip' to send only rows with a user.",
            summary.label,
            f"{summary.groups_without_user:,}",
            "would carry" if summary.dry_run else "carried",
        )
    if summary.possibly_truncated:
        log.warning(
            "%s returned exactly as many rows as the limit (%s): the cohort may be truncated; "
            "raise `limit` or use -1 for all rows.",
            summary.label,
            f"{summary.limit:,}",
        )


def outcome_error(
    options: SyncOptions, summary: SyncSummary, report: Any = None
) -> LookerSegmentError | None:
    """
    The error that fails the task after a sync, or ``None``: a tripped exit guard, rejected or failed
    events, or more invalid rows than ``max_invalid_rows``; its message carries the whole summary.

    Its class says whether Airflow retries the task
    (:func:`~airflow_provider_looker_segment.exceptions.is_retryable`; docs/troubleshooting.md, "Retried or
    failed at once"): :class:`SegmentDeliveryError` only when some events failed for a reason that can pass.

    :param options: the sync's options.
    :param summary: its summary.
    :param report: the Segment hook's delivery report (``last_report``), ``None`` when nothing was sent.
    """
    problems = []
    guard = summary.cohort.exit_guard if summary.cohort else None
    state_error = summary.cohort.state_error if summary.cohort else None
    if guard:
        problems.append(guard)
    if state_error:
        problems.append(state_error)
    if summary.rejected:
        verb = "would be rejected" if options.dry_run else "rejected"
        problems.append(f"{summary.rejected} events {verb} by Segment ({summary.rejected_reasons})")
    if summary.failed:
        problems.append(f"{summary.failed} events not delivered ({summary.failed_reasons})")
    if options.max_invalid_rows is not None and summary.invalid > options.max_invalid_rows:
        problems.append(
            f"{summary.invalid} rows produced no event, more than max_invalid_rows="
            f"{options.max_invalid_rows} ({summary.invalid_reasons})"
        )
    if not problems:
        return None
    error: type[LookerSegmentError] = SegmentDeliveryError
    if guard:
        error = ExitGuardError
    elif state_error and state_error.startswith(LOCK_LOST):
        error = SyncStateLockLostError
    elif state_error:
        error = SyncStateError
    elif report is None or not report.failed or report.refused is not None:
        error = UndeliverableEventsError
    details = orjson.dumps(summary.to_dict()).decode()
    text = "; ".join(problem.rstrip(".") for problem in problems)
    return error(f"{options.label}: {text}. Summary: {details}")


def publish_asset_events(
    outlets: list[Any], outlet_events: Any, summary: dict[str, Any], log: logging.Logger | Any
) -> list[Any]:
    """
    Attach the sync's figures to the events of the task's outlet assets; after a dry run, emit none (so it
    starts no DAG scheduled on them; docs/summary.md, "Asset events").

    :param outlets: the task's outlets.
    :param outlet_events: the task context's ``outlet_events`` (``None`` outside a task).
    :param summary: the summary (:meth:`SyncSummary.to_dict`).
    :param log: where a dry run says which assets get no event.
    :return: the outlets Airflow should record: ``outlets`` itself, or after a dry run a list without the
        assets.
    """
    if summary["dry_run"]:
        kept = [outlet for outlet in outlets if not isinstance(outlet, BaseAsset | AssetAlias)]
        if len(kept) == len(outlets):
            return outlets
        log.info(
            "Dry run: no asset event for %s (nothing was synced).",
            ", ".join(_asset_name(outlet) for outlet in outlets if outlet not in kept),
        )
        return kept
    extra = {key: summary[key] for key in ASSET_EVENT_KEYS}
    for outlet in outlets if outlet_events is not None else ():
        try:
            outlet_events[outlet].extra = extra
        except (KeyError, TypeError):  # not an asset outlet
            continue
    return outlets


def _asset_name(outlet: Any) -> str:
    """An outlet's name for the log (its ``name``, else its ``uri``)."""
    return str(getattr(outlet, "name", None) or getattr(outlet, "uri", None) or outlet)
