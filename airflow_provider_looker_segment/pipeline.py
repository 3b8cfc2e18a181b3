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
    CohortCounts,
    CohortEvents,
    CohortMessages,
    plan_exits,
)
from airflow_provider_looker_segment.dedupe import DuplicateCounts, drop_duplicates
from airflow_provider_looker_segment.destinations import Destination, check_destinations
from airflow_provider_looker_segment.exceptions import (
    DestinationError,
    ExitGuardError,
    LookerSegmentError,
    SegmentDeliveryError,
    SyncStateError,
    SyncStateLockLostError,
    SyncStateSaveError,
)
from airflow_provider_looker_segment.models import LookResultMeta, Row
from airflow_provider_looker_segment.progress import SyncProgress
from airflow_provider_looker_segment.settings import MAX_LIMIT, SyncSettings
from airflow_provider_looker_segment.sync_commit import commit_run
from airflow_provider_looker_segment.sync_run import SyncRun
from airflow_provider_looker_segment.transform import (
    TransformPlan,
    format_timestamp,
    is_group_without_user,
    make_row_transformer,
    plan_transform,
)

#: How many example payloads a dry run writes to the log.
DRY_RUN_EXAMPLES = 3
#: How many rejected / failed messageIds the summary (XCom) lists; the log has the counts per reason.
SUMMARY_MESSAGE_IDS = 100
LIBRARY = {"name": PACKAGE_NAME, "version": __version__}

__all__ = ["MAX_LIMIT", "CohortSummary", "SyncSettings", "SyncSummary", "failure", "log_summary", "sync_look"]


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
    progress: SyncProgress | None = None,
    stop: Callable[[], Any] | None = None,
) -> SyncSummary:
    """
    Sync one Look: plan its fields, check the destinations, then stream its rows to Segment.

    With ``state`` (``sync_mode="changed"``) the whole Look is read into the run's local spool first, and
    compared with the previous state before anything is sent: a tripped exit guard sends nothing.

    :param settings: what to do.
    :param stream: the Look's result (e.g. from ``LookerHook.stream_look``).
    :param send: the Segment hook's ``send``; ``None`` in a dry run.
    :param destinations: resolved destinations to check before anything is sent.
    :param message_id_namespace: what makes this task run unique (``build_message_id_namespace``).
    :param state: the changed-only sync's run (``CohortStateStore.begin``), with ``sync_mode="changed"``.
    :param log: where the plan, warnings, examples and progress go.
    :param progress_interval: seconds between progress lines (while reading and while delivering).
    :param progress: the progress lines, when the caller started them before opening the stream (the
        operator does, to report the wait for Looker's answer); by default they start here.
    :param stop: stops a running ``send`` (the Segment hook's ``stop``): called when the run loses its lock.
    :raises DestinationError: a listed destination cannot be fed; nothing was sent.
    """
    log = log or logging.getLogger(__name__)
    if progress is None:
        with SyncProgress(
            settings.source.key, log, progress_interval, dry_run=settings.dry_run, label=settings.label
        ) as progress:
            return sync_look(
                settings,
                stream,
                send=send,
                destinations=destinations,
                message_id_namespace=message_id_namespace,
                state=state,
                log=log,
                progress_interval=progress_interval,
                progress=progress,
                stop=stop,
            )
    started = time.monotonic()
    plan = plan_transform(stream.meta, settings.transform_options())
    _log_plan(log, settings.label, plan)
    _check_destinations(log, destinations, plan)
    ran_at = stream.meta.ran_at
    transform = make_row_transformer(
        plan,
        ran_at=ran_at,
        message_id_namespace=message_id_namespace,
        library=LIBRARY,
        derive_alias=state is not None and plan.call != "group" and state.knows_anonymous_members,
        defer_message_id=state is not None,
    )
    counts = _RowCounts()
    progress.reading(lambda: counts.rows, sending=state is None)
    duplicates = DuplicateCounts()
    by_type: Counter[str] = Counter()
    cohort: CohortCounts | None = None
    if state is None:
        by_group = plan.call == "group"
        messages: Iterable[dict] = drop_duplicates(
            _messages(stream.rows, transform, counts), duplicates, by_group=by_group
        )
    else:
        cohort, events = _decide(settings, stream, state, transform, counts, duplicates, log)
        progress.sending()
        if cohort.guard_tripped:
            messages = ()  # nothing is sent, nothing is saved: the task fails with the counts
        else:
            cohort_messages = CohortMessages(state, events, cohort)
            messages = _counted(cohort_messages, by_type, plan.call)
    without_user = [0]
    if plan.call == "group":  # group calls carrying the anonymousId derived from the group id (MTUs)
        messages = _groups_without_user(messages, without_user)
    undelivered = None
    if settings.dry_run or send is None:
        delivery = _dry_run(messages, log)
    else:
        options: dict[str, Any] = {"progress": progress.delivered, "progress_interval": progress_interval}
        if state is not None:
            options["on_undelivered"] = undelivered = state.record_undelivered
            if stop is not None:
                state.on_lock_lost(lambda _reason: stop())
        report = send(messages, **options)
        delivery = report.to_dict()
    if state is None:  # only the run's own calls, one per row read that was neither invalid nor a duplicate
        by_type[plan.call] += counts.rows - sum(counts.invalid.values()) - duplicates.duplicates
    warning = duplicates.warning(settings.label)
    if warning:
        log.warning("%s", warning)
    summary = SyncSummary(
        look_id=settings.look_id,
        source=settings.source.kind,
        query_id=settings.query_id,
        query_slug=settings.query_slug,
        dry_run=settings.dry_run,
        call=settings.call,
        event=settings.event,
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
        filters=dict(settings.filters),
        events_by_type=dict(by_type),
        groups_without_user=without_user[0],
    )
    if state is not None and cohort is not None:
        handed = cohort_messages.handed if not cohort.guard_tripped else None
        summary.cohort = _finish_cohort(settings, state, cohort, handed, undelivered is not None, log)
    summary.seconds = round(time.monotonic() - started, 3)
    return summary


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


def failure(settings: SyncSettings, summary: SyncSummary) -> LookerSegmentError | None:
    """
    The error that fails the task after a sync, or ``None``: a tripped exit guard, rejected or failed
    events, or more invalid rows than ``max_invalid_rows``; its message carries the whole summary.

    Its class says whether Airflow retries the task
    (:func:`~airflow_provider_looker_segment.exceptions.is_retryable`): an :class:`ExitGuardError` fails at
    once; a lost lock (:class:`SyncStateLockLostError`) and a state that could not be saved
    (:class:`SyncStateError`) are retried; a :class:`SegmentDeliveryError` is retried or not as the operator
    decides from the delivery report (events Segment rejected fail at once).
    """
    problems = []
    guard = summary.cohort.exit_guard if summary.cohort else None
    state_error = summary.cohort.state_error if summary.cohort else None
    if guard:
        problems.append(guard)
    if state_error:
        problems.append(state_error)
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
    error: type[LookerSegmentError] = SegmentDeliveryError
    if guard:
        error = ExitGuardError
    elif state_error and state_error.startswith(_LOCK_LOST):
        error = SyncStateLockLostError
    elif state_error:
        error = SyncStateError
    details = orjson.dumps(summary.to_dict()).decode()
    text = "; ".join(problem.rstrip(".") for problem in problems)
    return error(f"{settings.label}: {text}. Summary: {details}")


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


def _counted(messages: Iterable[dict], by_type: Counter[str], call: str) -> Iterator[dict]:
    """Count the messages per call type (the run's own calls counted at the end, entry/exit ones here)."""
    made = 0
    for message in messages:
        kind = message["type"]
        if kind == call:
            made += 1
        else:
            by_type[kind] += 1
        yield message
    by_type[call] += made


def _groups_without_user(messages: Iterable[dict], count: list[int]) -> Iterator[dict]:
    """Count the group calls whose only identity is the anonymousId derived from the group id."""
    for message in messages:
        if "userId" not in message and is_group_without_user(message):
            count[0] += 1
        yield message


_LOCK_LOST = "This run lost the lock of its sync"


def _decide(
    settings: SyncSettings,
    stream: LookStreamLike,
    state: SyncRun,
    transform: Any,
    counts: _RowCounts,
    duplicates: DuplicateCounts,
    log: Any,
) -> tuple[CohortCounts, CohortEvents]:
    """Read the whole Look into the run's spool, compare it with the state, decide the exits."""
    ran_at = stream.meta.ran_at
    events = CohortEvents(
        call=settings.call,
        event=settings.event,
        membership_trait=settings.membership_trait,
        entered_event=settings.entered_event,
        exited_event=settings.exited_event,
        sync_key=state.store.key,
        timestamp=format_timestamp(ran_at) if ran_at is not None else None,
        library=LIBRARY,
    )
    if state.unsaved is not None:
        log.warning(
            "Sync %s: run %s delivered its calls but could not save the state; this run compares the Look "
            "with the state it left (generation %s) and sends those changes again. Entry and exit events "
            "carry the messageIds of that run (derived from the transition), so Segment drops the repeats "
            "within its deduplication window (about 24 hours).",
            state.store.key,
            state.unsaved.get("run_id", "?"),
            state.previous_generation,
        )
    state.spool(
        _messages(stream.rows, transform, counts),
        tail=getattr(transform, "tail", None),
        by_group=settings.call == "group",
        hasher=getattr(transform, "hasher", None),
    )
    decision = state.decide()
    duplicates.duplicates, duplicates.example = decision.duplicates, decision.duplicate_example
    cohort = CohortCounts(
        new=decision.new,
        changed=decision.changed,
        unchanged=decision.unchanged,
        switched=decision.switched,
        rejoined=decision.rejoined,
    )
    plan_exits(
        decision,
        cohort,
        events,
        max_exit_ratio=settings.max_exit_ratio,
        possibly_truncated=stream.possibly_truncated,
    )
    log.info(
        "%s: %s rows read and compared with the state (generation %s, %s identities): %s new, "
        "%s changed, %s unchanged, %s switched to a userId, %s left the cohort (spool: %s bytes on local "
        "disk).",
        settings.label,
        f"{decision.rows:,}",
        state.previous_generation,
        f"{decision.previous:,}",
        f"{decision.new:,}",
        f"{decision.changed + decision.rejoined:,}",
        f"{decision.unchanged:,}",
        f"{decision.switched:,}",
        f"{decision.departed:,}",
        f"{state.spool_bytes:,}",
    )
    return cohort, events


def _finish_cohort(
    settings: SyncSettings,
    state: SyncRun,
    cohort: CohortCounts,
    handed: Any,
    sent: bool,
    log: Any,
) -> CohortSummary:
    """Save the state (an identity advances only when its calls were all accepted); report the cohort."""
    summary = CohortSummary(
        new=cohort.new,
        changed=cohort.changed + cohort.rejoined,
        unchanged=cohort.unchanged,
        exited=cohort.exits_sent,
        departed=cohort.exits,
        exits_skipped=cohort.exits_skipped,
        entered_events=cohort.entered_events,
        exited_events=cohort.exited_events,
        previous_cohort=state.previous_count,
        state_generation=state.previous_generation,
        full_refresh=state.full_refresh,
        switched=cohort.switched,
        spool_bytes=state.spool_bytes,
        state_load_seconds=round(state.load_seconds, 3),
        exit_guard=cohort.guard_tripped,  # the task fails after the summary is logged
    )
    if cohort.exits_skipped and cohort.exits and not cohort.guard_tripped:
        log.warning(
            "%s: %s identities left the cohort; no exit call sent: %s.",
            settings.label,
            f"{cohort.exits:,}",
            cohort.exits_skipped,
        )
    if cohort.guard_tripped:
        log.info("Exit guard: nothing was sent and the sync state was not changed.")
        return summary
    if settings.dry_run or not sent:
        log.info("Dry run: the sync state was read, not changed.")
        return summary
    if state.lock_lost:
        summary.state_error = (
            f"{_LOCK_LOST} while it ran ({state.lock_lost}): it stopped sending and did not save the state; "
            "the events it delivered are sent again by a later run. A run frozen for longer than the lock's "
            "lease (a long pause, a suspended machine) does this; make sure only one run of a sync is active "
            "at a time."
        )
        return summary
    try:
        result = commit_run(
            state,
            handed,
            keep_departed=cohort.keep_departed,
            membership_trait=bool(settings.membership_trait),
            entered_event=bool(settings.entered_event),
            exited_event=bool(settings.exited_event),
        )
    except SyncStateSaveError as error:
        summary.state_error = str(error)
        return summary
    summary.state_generation = result.generation
    summary.state_identities = result.identities
    summary.pending = result.pending
    summary.state_saved = result.saved
    summary.state_bytes = result.bytes if result.saved else None
    summary.state_save_seconds = result.save_seconds
    return summary


def _log_plan(log: Any, label: str, plan: TransformPlan) -> None:
    """The plan in one line (warnings, for the user to act on, in lines of their own)."""
    what = f"track calls, event {plan.event!r}" if plan.call == "track" else f"{plan.call} calls"
    found = [
        f"{identifier} from field {choice['field']} ({choice['how']})" if choice else f"no {identifier} field"
        for identifier, choice in plan.identifiers.items()
    ]
    note = f"; {plan.overwrite_note}" if plan.overwrite_note else ""
    log.info(
        "%s: each row becomes one of Segment's %s; %s; %s (field → key): %s%s",
        label,
        what,
        ", ".join(found),
        plan.values_key,
        plan.traits,
        note,
    )
    for warning in plan.warnings:
        log.warning("%s: %s", label, warning)


def _check_destinations(log: Any, destinations: list[Destination], plan: TransformPlan) -> None:
    if not destinations:
        return
    check = check_destinations(
        destinations,
        has_user_id=plan.has_user_id,
        has_email=plan.has_email,
        has_anonymous_id=plan.has_anonymous_id,
        trait_keys=set(plan.trait_keys),
        call=plan.call,
        has_group_id=plan.has_group_id,
    )
    for warning in check.warnings:
        log.warning("Destinations: %s", warning)
    if check.errors:
        raise DestinationError(
            "The Look cannot feed the listed destinations; nothing was sent:\n- " + "\n- ".join(check.errors)
        )
    log.info("Destinations checked: %s", ", ".join(d.name for d in destinations))


def _dry_run(messages: Iterable[dict], log: Any) -> Mapping[str, Any]:
    """Encode and batch every message as a real run would, log a few examples, send nothing."""
    examples: list[bytes] = []

    def with_examples() -> Iterator[dict]:
        for message in messages:
            if len(examples) < DRY_RUN_EXAMPLES:
                examples.append(getattr(message, "encoded", None) or encode_event(message))
            yield message

    plan = plan_batches(with_examples())
    for number, data in enumerate(examples, start=1):
        log.info("Dry run: example payload %d: %s", number, data.decode())
    log.info(
        "Dry run: %s events would be sent in %s batches; nothing was sent",
        f"{plan.events:,}",
        f"{plan.batches:,}",
    )
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
