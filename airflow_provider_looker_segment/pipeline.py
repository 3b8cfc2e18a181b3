"""
The sync of one Look: options in, a typed summary out.

``rows → messages (transform) → one call per identity (dedupe) → [changed-only and exits] → send or plan
→ [commit the state]``, streaming from end to end. The operator reads its arguments into
:class:`~.settings.SyncOptions` and hands its hooks to :func:`run_sync`, which opens the Looker stream and
(with ``sync_mode="changed"``) the sync state, and calls :func:`sync_look`; tests call :func:`sync_look`
with the same parts and no DAG. The summary it returns: :mod:`.summary`.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack
from dataclasses import replace
from typing import Any, Protocol

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
from airflow_provider_looker_segment.exceptions import DestinationError, SyncStateSaveError
from airflow_provider_looker_segment.models import LookResultMeta, Row
from airflow_provider_looker_segment.progress import SyncProgress
from airflow_provider_looker_segment.settings import SyncOptions
from airflow_provider_looker_segment.state_location import open_state_store
from airflow_provider_looker_segment.summary import LOCK_LOST, CohortSummary, SyncSummary
from airflow_provider_looker_segment.sync_commit import commit_run
from airflow_provider_looker_segment.sync_run import SyncRun
from airflow_provider_looker_segment.transform import (
    TransformPlan,
    is_group_without_user,
    make_row_transformer,
    plan_transform,
)
from airflow_provider_looker_segment.values import format_timestamp

#: How many example payloads a dry run writes to the log.
DRY_RUN_EXAMPLES = 3
#: How many rejected / failed messageIds the summary (XCom) lists; the log has the counts per reason.
SUMMARY_MESSAGE_IDS = 100
LIBRARY = {"name": PACKAGE_NAME, "version": __version__}


class LookStreamLike(Protocol):
    """What :func:`sync_look` reads from a Look: the field metadata, the rows and a truncation flag."""

    meta: LookResultMeta
    rows: Iterable[Row]
    possibly_truncated: bool


#: Sends messages to Segment and returns its delivery report: ``send(messages, progress=...)``.
Sender = Callable[..., Any]


def read_query(looker: Any, options: SyncOptions) -> tuple[SyncOptions, Any]:
    """
    Read a query source from Looker by id or slug (a slug resolved to its id, which keys the state): the
    options with its id, and the query's copy with the run's filters.
    """
    if options.query_id is not None:
        query = looker.get_query(options.query_id)
    else:
        query = looker.get_query(slug=options.query_slug)
    options = replace(options, query_id=query.info.id, query_slug=query.info.slug or options.query_slug)
    return options, looker.with_filters(query, options.filters or None)


def open_source(
    looker: Any, options: SyncOptions, on_query: Callable[[Any], Any]
) -> tuple[SyncOptions, Callable[[], AbstractContextManager[Any]]]:
    """
    What a run streams: a Look as saved or with its filters, or a query (:func:`read_query`, handed to
    ``on_query`` before it runs).
    """
    if options.source.is_look:
        filters = options.filters or None
        return options, lambda: looker.stream_look(options.look_id, limit=options.limit, filters=filters)
    options, query = read_query(looker, options)
    on_query(query)
    return options, lambda: looker.stream_query(query, limit=options.limit)


def run_sync(
    options: SyncOptions,
    *,
    looker: AbstractContextManager[Any],
    segment: Any,
    open_source: Callable[[SyncOptions], tuple[SyncOptions, Callable[[], AbstractContextManager[Any]]]],
    message_id_namespace: Callable[[str], str],
    destinations: list[Destination],
    log: logging.Logger | Any,
    progress_interval: float,
    on_stream: Callable[[Any], Any] = lambda stream: None,
) -> tuple[SyncOptions, SyncSummary]:
    """
    Open what a sync needs, in order, and sync: the progress lines (from before Looker is asked to run the
    Look: its wait is reported too), the Looker session (leaving it logs out, also after a failure), the
    source, the state of a changed-only sync (:mod:`.state_location`), the stream; then :func:`sync_look`.

    :param options: the sync's options.
    :param looker: the Looker hook (a context manager: its session).
    :param segment: the Segment hook (``send``, ``stop``, ``settings``).
    :param open_source: options → (the options with the source resolved, what opens its stream).
    :param message_id_namespace: the source's key → the namespace of the run's messageIds.
    :param destinations: the destinations to check before anything is sent.
    :param log: the task's log.
    :param progress_interval: seconds between progress lines.
    :param on_stream: called with the opened stream, before its rows are read.
    :return: the options as resolved, and the summary.
    """
    with ExitStack() as resources:
        progress = resources.enter_context(
            SyncProgress(
                options.source.key, log, progress_interval, dry_run=options.dry_run, label=options.label
            )
        )
        resources.enter_context(looker)
        options, opener = open_source(options)
        namespace = message_id_namespace(options.source.key)
        state = None
        if options.changed_only:
            config = segment.config
            store = open_state_store(options, config.base_url, config.write_key, log)
            state = resources.enter_context(store.begin(namespace, full_refresh=options.full_refresh))
        stream = resources.enter_context(opener())
        on_stream(stream)
        summary = sync_look(
            options,
            stream,
            send=None if options.dry_run else segment.send,
            destinations=destinations,
            message_id_namespace=namespace,
            state=state,
            log=log,
            progress_interval=progress_interval,
            progress=progress,
            stop=segment.stop,
        )
    return options, summary


def sync_look(
    options: SyncOptions,
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

    :param options: what to do.
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
    with ExitStack() as resources:
        if progress is None:
            label, dry_run = options.label, options.dry_run
            progress = SyncProgress(options.source.key, log, progress_interval, dry_run=dry_run, label=label)
            resources.enter_context(progress)
        # Airflow's imports leave ~190k objects tracked by the garbage collector, and every full collection
        # triggered by the row loop would walk them all: park them in the permanent generation meanwhile.
        gc.freeze()
        resources.callback(gc.unfreeze)
        return _sync(
            options,
            stream,
            send,
            destinations,
            message_id_namespace,
            state,
            log,
            progress_interval,
            progress,
            stop,
        )


def _sync(
    options: SyncOptions,
    stream: LookStreamLike,
    send: Sender | None,
    destinations: list[Destination],
    message_id_namespace: str,
    state: SyncRun | None,
    log: Any,
    progress_interval: float,
    progress: SyncProgress,
    stop: Callable[[], Any] | None,
) -> SyncSummary:
    """:func:`sync_look`'s work, its progress lines started."""
    started = time.monotonic()
    plan = plan_transform(stream.meta, options)
    _log_plan(log, options.label, plan)
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
        cohort, events = _decide(options, stream, state, transform, counts, duplicates, log)
        progress.sending()
        if cohort.exit_guard:
            messages = ()  # nothing is sent, nothing is saved: the task fails with the counts
        else:
            cohort_messages = CohortMessages(state, events, cohort)
            messages = _counted(cohort_messages, by_type, plan.call)
    without_user = [0]
    if plan.call == "group":  # group calls carrying the anonymousId derived from the group id (MTUs)
        messages = _groups_without_user(messages, without_user)
    undelivered = None
    if options.dry_run or send is None:
        delivery = _dry_run(messages, log)
    else:
        delivery_options: dict[str, Any] = {
            "progress": progress.delivered,
            "progress_interval": progress_interval,
        }
        if state is not None:
            delivery_options["on_undelivered"] = undelivered = state.record_undelivered
            if stop is not None:
                state.on_lock_lost(lambda _reason: stop())
        report = send(messages, **delivery_options)
        delivery = report.to_dict()
    if state is None:  # only the run's own calls, one per row read that was neither invalid nor a duplicate
        by_type[plan.call] += counts.rows - sum(counts.invalid.values()) - duplicates.duplicates
    warning = duplicates.warning(options.label)
    if warning:
        log.warning("%s", warning)
    summary = SyncSummary(
        look_id=options.look_id,
        source=options.source.kind,
        query_id=options.query_id,
        query_slug=options.query_slug,
        dry_run=options.dry_run,
        call=options.call,
        event=options.event,
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
        limit=options.limit,
        sync_mode=options.sync_mode,
        possibly_truncated=stream.possibly_truncated,
        ran_at=ran_at.isoformat() if ran_at is not None else None,
        filters=dict(options.filters),
        events_by_type=dict(by_type),
        groups_without_user=without_user[0],
    )
    if state is not None and cohort is not None:
        handed = cohort_messages.handed if not cohort.exit_guard else None
        summary.cohort = _finish_cohort(options, state, cohort, handed, undelivered is not None, log)
    summary.seconds = round(time.monotonic() - started, 3)
    return summary


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


def _decide(
    options: SyncOptions,
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
        call=options.call,
        event=options.event,
        membership_trait=options.membership_trait,
        entered_event=options.entered_event,
        exited_event=options.exited_event,
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
        by_group=options.call == "group",
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
        max_exit_ratio=options.max_exit_ratio,
        possibly_truncated=stream.possibly_truncated,
    )
    log.info(
        "%s: %s rows read and compared with the state (generation %s, %s identities): %s new, "
        "%s changed, %s unchanged, %s switched to a userId, %s left the cohort (spool: %s bytes on local "
        "disk).",
        options.label,
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
    options: SyncOptions,
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
        exited=cohort.exited,
        departed=cohort.departed,
        exits_skipped=cohort.exits_skipped,
        entered_events=cohort.entered_events,
        exited_events=cohort.exited_events,
        previous_cohort=state.previous_count,
        state_generation=state.previous_generation,
        full_refresh=state.full_refresh,
        switched=cohort.switched,
        spool_bytes=state.spool_bytes,
        state_load_seconds=round(state.load_seconds, 3),
        exit_guard=cohort.exit_guard,  # the task fails after the summary is logged
    )
    if cohort.exits_skipped and cohort.departed and not cohort.exit_guard:
        log.warning(
            "%s: %s identities left the cohort; no exit call sent: %s.",
            options.label,
            f"{cohort.departed:,}",
            cohort.exits_skipped,
        )
    if cohort.exit_guard:
        log.info("Exit guard: nothing was sent and the sync state was not changed.")
        return summary
    if options.dry_run or not sent:
        log.info("Dry run: the sync state was read, not changed.")
        return summary
    if state.lock_lost:
        summary.state_error = (
            f"{LOCK_LOST} while it ran ({state.lock_lost}): it stopped sending and did not save the state; "
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
            membership_trait=bool(options.membership_trait),
            entered_event=bool(options.entered_event),
            exited_event=bool(options.exited_event),
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
