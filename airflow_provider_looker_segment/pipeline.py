"""
The sync of one Look, free of Airflow: settings in, a typed summary out.

``rows → messages (transform) → one call per identity (dedupe) → [changed-only and exits] → send or plan
→ [commit the state]``, streaming from end to end. The operator reads its arguments into
:class:`SyncSettings`, opens the Looker stream, the Segment hook and (with ``sync_mode="changed"``) the
sync state, and calls :func:`sync_look`; tests can call it with the same parts and no DAG.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import orjson

from airflow_provider_looker_segment import PACKAGE_NAME, __version__
from airflow_provider_looker_segment.batching import encode_event, plan_batches
from airflow_provider_looker_segment.cohort_sync import (
    SYNC_ALL,
    SYNC_CHANGED,
    SYNC_MODES,
    CohortCounts,
    changed_only,
    exit_messages,
    undelivered_identities,
)
from airflow_provider_looker_segment.dedupe import DuplicateCounts, drop_duplicates
from airflow_provider_looker_segment.destinations import Destination, check_destinations
from airflow_provider_looker_segment.exceptions import (
    DestinationError,
    ExitGuardError,
    InvalidParameterError,
    LookerSegmentError,
    SegmentDeliveryError,
)
from airflow_provider_looker_segment.models import LookResultMeta, Row
from airflow_provider_looker_segment.params import (
    to_bool,
    to_number,
    to_optional_str,
    to_str_dict,
    to_str_list,
)
from airflow_provider_looker_segment.sync_state import SyncRun
from airflow_provider_looker_segment.transform import (
    TRAIT_KEY_STYLES,
    TransformOptions,
    TransformPlan,
    format_timestamp,
    make_row_transformer,
    plan_transform,
)

#: How many example payloads a dry run writes to the log.
DRY_RUN_EXAMPLES = 3
#: How many rejected / failed messageIds the summary (XCom) lists; the log has the counts per reason.
SUMMARY_MESSAGE_IDS = 100
#: The largest row limit Looker's API takes (a 64-bit integer).
MAX_LIMIT = 2**63 - 1
LIBRARY = {"name": PACKAGE_NAME, "version": __version__}


@dataclass(frozen=True)
class SyncSettings:
    """
    What one sync does, read from the operator's (rendered) arguments by :meth:`from_arguments`.

    The fields mean what the operator's parameters of the same names mean.
    """

    look_id: str
    user_id_field: str | None = None
    email_field: str | None = None
    anonymous_id_field: str | None = None
    trait_names: dict[str, str] = field(default_factory=dict)
    trait_key_style: str = "label"
    exclude_fields: tuple[str, ...] = ()
    destinations: tuple[str, ...] = ()
    dry_run: bool = False
    limit: int = -1
    max_invalid_rows: int | None = None
    sync_mode: str = SYNC_ALL
    full_refresh: bool = False
    membership_trait: str | None = None
    max_exit_ratio: float = 0.5

    @classmethod
    def from_arguments(cls, **arguments: Any) -> SyncSettings:
        """
        Coerce rendered arguments (strings or native values) and check them.

        :raises InvalidParameterError: a value cannot be used; the message names the parameter.
        """
        look_id = to_optional_str(arguments.get("look_id"))
        if look_id is None:
            raise InvalidParameterError(
                "look_id is empty: pass the id of the Look to sync (as in /looks/42)."
            )
        style = to_optional_str(arguments.get("trait_key_style")) or "label"
        if style not in TRAIT_KEY_STYLES:
            raise InvalidParameterError(
                f"trait_key_style must be one of {', '.join(TRAIT_KEY_STYLES)}, "
                f"got {arguments.get('trait_key_style')!r}"
            )
        limit = to_number(arguments.get("limit"), name="limit", whole=True)
        if limit is not None and limit < -1:
            raise InvalidParameterError(f"limit must be -1 (all rows) or a positive number, got {limit}")
        if limit is not None and limit > MAX_LIMIT:
            raise InvalidParameterError(
                f"limit must be at most {MAX_LIMIT:,} (Looker's largest row limit), got {limit:,}: "
                "use -1 for all rows"
            )
        sync_mode = to_optional_str(arguments.get("sync_mode")) or SYNC_ALL
        if sync_mode not in SYNC_MODES:
            raise InvalidParameterError(
                f"sync_mode must be one of {', '.join(SYNC_MODES)}, got {arguments.get('sync_mode')!r}"
            )
        ratio = arguments.get("max_exit_ratio")
        try:
            max_exit_ratio = to_number(ratio, name="max_exit_ratio", default=0.5, minimum=0, maximum=1)
        except InvalidParameterError:
            raise InvalidParameterError(
                f"max_exit_ratio must be a number from 0 to 1, got {ratio!r}"
            ) from None
        return cls(
            look_id=look_id,
            user_id_field=to_optional_str(arguments.get("user_id_field")),
            email_field=to_optional_str(arguments.get("email_field")),
            anonymous_id_field=to_optional_str(arguments.get("anonymous_id_field")),
            trait_names=to_str_dict(arguments.get("trait_names"), name="trait_names"),
            trait_key_style=style,
            exclude_fields=tuple(to_str_list(arguments.get("exclude_fields"), name="exclude_fields")),
            destinations=tuple(to_str_list(arguments.get("destinations"), name="destinations")),
            dry_run=to_bool(arguments.get("dry_run"), name="dry_run"),
            limit=-1 if not limit else limit,
            max_invalid_rows=to_number(
                arguments.get("max_invalid_rows"), name="max_invalid_rows", whole=True, minimum=0
            ),
            sync_mode=sync_mode,
            full_refresh=to_bool(arguments.get("full_refresh"), name="full_refresh"),
            membership_trait=to_optional_str(arguments.get("membership_trait")),
            max_exit_ratio=float(max_exit_ratio),
        )

    @property
    def changed_only(self) -> bool:
        """Whether this sync keeps state and sends only what changed."""
        return self.sync_mode == SYNC_CHANGED

    def transform_options(self) -> TransformOptions:
        """The transform's options."""
        return TransformOptions(
            user_id_field=self.user_id_field,
            email_field=self.email_field,
            anonymous_id_field=self.anonymous_id_field,
            trait_names=self.trait_names,
            trait_key_style=self.trait_key_style,
            exclude_fields=self.exclude_fields,
            membership_trait=self.membership_trait,
        )


@dataclass
class CohortSummary:
    """What a ``sync_mode="changed"`` run did with the cohort (see the README's summary keys)."""

    new: int
    changed: int
    unchanged: int
    exited: int
    departed: int
    exits_skipped: str | None
    previous_cohort: int
    state_generation: int
    full_refresh: bool
    state_identities: int | None = None
    exit_guard: str | None = None


@dataclass
class SyncSummary:
    """The result of a sync, returned by the task (XCom) as :meth:`to_dict`; keys as in the README."""

    look_id: str
    dry_run: bool
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
    cohort: CohortSummary | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable summary: the cohort's keys are flattened in, unset optional ones left out."""
        summary = asdict(self)
        cohort = summary.pop("cohort")
        seconds = summary.pop("seconds")
        if cohort is not None:
            for optional in ("state_identities", "exit_guard"):
                if cohort[optional] is None:
                    del cohort[optional]
            summary.update(cohort)
        summary["seconds"] = seconds
        return summary


class LookStreamLike(Protocol):
    """What :func:`sync_look` reads from a Look: the field metadata, the rows and a truncation flag."""

    meta: LookResultMeta
    rows: Iterable[Row]
    possibly_truncated: bool


#: Sends messages to Segment and returns its delivery report: ``send(messages, progress=...)``.
Sender = Callable[..., Any]


def sync_look(
    settings: SyncSettings,
    stream: LookStreamLike,
    *,
    send: Sender | None,
    destinations: list[Destination],
    message_id_namespace: str,
    state: SyncRun | None = None,
    log: logging.Logger | Any = None,
    progress_interval: float = 10.0,
) -> SyncSummary:
    """
    Sync one Look: plan its fields, check the destinations, then stream its rows to Segment.

    :param settings: what to do.
    :param stream: the Look's result (e.g. from ``LookerHook.stream_look``).
    :param send: the Segment hook's ``send``; ``None`` in a dry run.
    :param destinations: resolved destinations to check before anything is sent.
    :param message_id_namespace: what makes this task run unique (``build_message_id_namespace``).
    :param state: the changed-only sync's run (``CohortStateStore.begin``), with ``sync_mode="changed"``.
    :param log: where the plan, warnings, examples and progress go.
    :param progress_interval: seconds between progress lines.
    :raises DestinationError: a listed destination cannot be fed; nothing was sent.
    """
    log = log or logging.getLogger(__name__)
    started = time.monotonic()
    plan = plan_transform(stream.meta, settings.transform_options())
    _log_plan(log, settings.look_id, plan)
    _check_destinations(log, destinations, plan)
    ran_at = stream.meta.ran_at
    transform = make_row_transformer(
        plan, ran_at=ran_at, message_id_namespace=message_id_namespace, library=LIBRARY
    )
    counts = _RowCounts()
    duplicates = DuplicateCounts()
    cohort = CohortCounts()
    unique = drop_duplicates(_messages(stream.rows, transform, counts), duplicates)
    messages: Iterable[dict] = unique
    if state is not None:
        messages = _with_exits(unique, state, cohort, settings, stream, message_id_namespace, ran_at)
    undelivered: set[int] | None = None
    if settings.dry_run or send is None:
        delivery = _dry_run(messages, log)
    else:
        progress = _ProgressLogger(settings.look_id, counts, started, log)
        report = send(messages, progress=progress, progress_interval=progress_interval)
        delivery = report.to_dict()
        complete = not report.rejected_events_omitted and not report.failed_events_omitted
        undelivered = undelivered_identities(report.rejected_ids + report.failed_ids, complete)
    warning = duplicates.warning(settings.look_id)
    if warning:
        log.warning("%s", warning)
    summary = SyncSummary(
        look_id=settings.look_id,
        dry_run=settings.dry_run,
        rows=counts.rows,
        sent=delivery["delivered"],
        would_send=delivery.get("would_send"),
        invalid=sum(counts.invalid.values()),
        invalid_reasons=dict(counts.invalid),
        duplicates=duplicates.duplicates,
        rejected=delivery["rejected"],
        rejected_reasons=delivery.get("rejected_reasons", {}),
        rejected_message_ids=delivery.get("rejected_message_ids", [])[:SUMMARY_MESSAGE_IDS],
        failed=delivery["failed"],
        failed_reasons=delivery.get("failed_reasons", {}),
        failed_message_ids=delivery.get("failed_message_ids", [])[:SUMMARY_MESSAGE_IDS],
        batches=delivery["batches"],
        requests=delivery.get("requests", 0),
        retries=delivery.get("retries", 0),
        bytes=delivery.get("bytes", 0),
        identifiers=plan.identifiers,
        traits=plan.traits,
        destinations=[d.name for d in destinations],
        limit=settings.limit,
        sync_mode=settings.sync_mode,
        possibly_truncated=stream.possibly_truncated,
        ran_at=ran_at.isoformat() if ran_at is not None else None,
    )
    if state is not None:
        summary.cohort = _finish_cohort(settings, state, cohort, undelivered, log)
    summary.seconds = round(time.monotonic() - started, 3)
    return summary


def log_summary(log: logging.Logger | Any, summary: SyncSummary) -> None:
    """The summary's one line (and the truncation warning)."""
    log.info(
        "Look %s: %d rows read, %d sent, %d invalid, %d rejected, %d failed, %d batches in %.1f s%s%s",
        summary.look_id,
        summary.rows,
        summary.sent,
        summary.invalid,
        summary.rejected,
        summary.failed,
        summary.batches,
        summary.seconds,
        f" ({summary.duplicates} duplicate rows not sent)" if summary.duplicates else "",
        " (dry run: nothing sent)" if summary.dry_run else "",
    )
    if summary.possibly_truncated:
        log.warning(
            "Look %s returned exactly as many rows as the limit (%s): the cohort may be truncated; "
            "raise `limit` or use -1 for all rows.",
            summary.look_id,
            summary.limit,
        )


def failure(settings: SyncSettings, summary: SyncSummary) -> LookerSegmentError | None:
    """
    The error that fails the task after a sync, or ``None``: a tripped exit guard, rejected or failed
    events, or more invalid rows than ``max_invalid_rows``; its message carries the whole summary.
    """
    problems = []
    guard = summary.cohort.exit_guard if summary.cohort else None
    if guard:
        problems.append(guard)
    if summary.rejected:
        verb = "would be rejected" if settings.dry_run else "rejected"
        problems.append(f"{summary.rejected} events {verb} by Segment ({summary.rejected_reasons})")
    if summary.failed:
        problems.append(f"{summary.failed} events not delivered ({summary.failed_reasons})")
    if settings.max_invalid_rows is not None and summary.invalid > settings.max_invalid_rows:
        problems.append(
            f"{summary.invalid} rows produced no event, more than max_invalid_rows="
            f"{settings.max_invalid_rows} ({summary.invalid_reasons})"
        )
    if not problems:
        return None
    error = ExitGuardError if guard else SegmentDeliveryError
    details = orjson.dumps(summary.to_dict()).decode()
    return error(f"Look {settings.look_id}: " + "; ".join(problems) + f". Summary: {details}")


# ------------------------------------------------------------------------------------------- internals


class _RowCounts:
    """Rows read, and rows that produced no event by reason."""

    def __init__(self) -> None:
        self.rows = 0
        self.invalid: Counter[str] = Counter()


def _messages(
    rows: Iterable[Row], transform: Callable[[Row], tuple[Any, Any]], counts: _RowCounts
) -> Iterator[dict]:
    """Turn rows into messages lazily, counting rows and the reasons rows produced nothing."""
    invalid = counts.invalid
    for row in rows:
        counts.rows += 1
        message, reason = transform(row)
        if message is None:
            invalid[reason] += 1
        else:
            yield message


def _with_exits(
    messages: Iterable[dict],
    state: SyncRun,
    cohort: CohortCounts,
    settings: SyncSettings,
    stream: LookStreamLike,
    namespace: str,
    ran_at: Any,
) -> Iterator[dict]:
    """The new and changed identities' calls, then the exit calls (once every row was classified)."""
    yield from changed_only(messages, state, cohort)
    yield from exit_messages(
        state,
        cohort,
        membership_trait=settings.membership_trait,
        max_exit_ratio=settings.max_exit_ratio,
        possibly_truncated=stream.possibly_truncated,
        message_id_namespace=namespace,
        timestamp=format_timestamp(ran_at) if ran_at is not None else None,
        library=LIBRARY,
    )


def _finish_cohort(
    settings: SyncSettings,
    state: SyncRun,
    cohort: CohortCounts,
    undelivered: set[int] | None,
    log: Any,
) -> CohortSummary:
    """Save the state (it advances only for accepted events) and report the cohort's movements."""
    summary = CohortSummary(
        new=cohort.new,
        changed=cohort.changed,
        unchanged=cohort.unchanged,
        exited=cohort.exits_sent,
        departed=cohort.exits,
        exits_skipped=cohort.exits_skipped,
        previous_cohort=state.previous_count,
        state_generation=state.previous_generation,
        full_refresh=state.full_refresh,
        exit_guard=cohort.guard_tripped,  # the task fails after the summary is logged
    )
    if cohort.exits_skipped and cohort.exits:
        log.warning(
            "Look %s: %d identities left the cohort; no exit call sent: %s.",
            settings.look_id,
            cohort.exits,
            cohort.exits_skipped,
        )
    if settings.dry_run:
        log.info("Dry run: the sync state was read, not changed.")
        return summary
    result = state.commit(undelivered, exits_sent=not cohort.keep_departed)
    summary.state_generation = result.generation
    summary.state_identities = result.entries
    return summary


def _log_plan(log: Any, look_id: str, plan: TransformPlan) -> None:
    for identifier, found in plan.identifiers.items():
        if found:
            log.info("Look %s: %s from field %s (%s)", look_id, identifier, found["field"], found["how"])
        else:
            log.info("Look %s: no %s field", look_id, identifier)
    log.info("Look %s: traits (field → key): %s", look_id, plan.traits)
    for warning in plan.warnings:
        log.warning("Look %s: %s", look_id, warning)


def _check_destinations(log: Any, destinations: list[Destination], plan: TransformPlan) -> None:
    if not destinations:
        return
    check = check_destinations(
        destinations,
        has_user_id=plan.has_user_id,
        has_email=plan.has_email,
        has_anonymous_id=plan.has_anonymous_id,
        trait_keys=set(plan.trait_keys),
    )
    for warning in check.warnings:
        log.warning("Destinations: %s", warning)
    if check.errors:
        raise DestinationError(
            "The Look cannot feed the listed destinations; nothing was sent:\n- " + "\n- ".join(check.errors)
        )
    log.info("Destinations checked: %s", ", ".join(d.name for d in destinations))


class _ProgressLogger:
    """Writes a progress line (rows read, events delivered, rate) when the Segment hook reports."""

    def __init__(self, look_id: str, counts: _RowCounts, started: float, log: Any) -> None:
        self._look_id = look_id
        self._counts = counts
        self._started = started
        self._log = log

    def __call__(self, report: Any) -> None:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        self._log.info(
            "Look %s: %d rows read, %d events delivered, %d rejected, %d failed (%.0f rows/s)",
            self._look_id,
            self._counts.rows,
            report.delivered,
            report.rejected,
            report.failed,
            self._counts.rows / elapsed,
        )


def _dry_run(messages: Iterable[dict], log: Any) -> Mapping[str, Any]:
    """Encode and batch every message as a real run would, log a few examples, send nothing."""
    examples: list[bytes] = []

    def with_examples() -> Iterator[dict]:
        for message in messages:
            if len(examples) < DRY_RUN_EXAMPLES:
                examples.append(encode_event(message))
            yield message

    plan = plan_batches(with_examples())
    for number, data in enumerate(examples, start=1):
        log.info("Dry run: example payload %d: %s", number, data.decode())
    log.info("Dry run: %d events would be sent in %d batches; nothing was sent", plan.events, plan.batches)
    return {
        "delivered": 0,
        "would_send": plan.events,
        "rejected": plan.rejected,
        "failed": 0,
        "batches": plan.batches,
        "bytes": plan.bytes,
        "rejected_reasons": plan.reasons,
        "rejected_message_ids": plan.rejected_message_ids,
    }
