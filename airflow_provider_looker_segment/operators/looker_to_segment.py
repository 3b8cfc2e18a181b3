"""LookerToSegmentOperator: stream a Look's rows into Segment as ``identify`` calls."""

from __future__ import annotations

import gc
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from airflow.sdk import BaseOperator, ObjectStoragePath

from airflow_provider_looker_segment import PACKAGE_NAME, __version__
from airflow_provider_looker_segment.batching import encode_event, plan_batches
from airflow_provider_looker_segment.cohort_sync import (
    SYNC_ALL,
    SYNC_CHANGED,
    SYNC_MODES,
    CohortCounts,
    ExitGuardError,
    changed_only,
    exit_messages,
    undelivered_identities,
)
from airflow_provider_looker_segment.dedupe import DuplicateCounts, drop_duplicates
from airflow_provider_looker_segment.destinations import (
    Destination,
    check_destinations,
    resolve_destinations,
)
from airflow_provider_looker_segment.exceptions import (
    DestinationError,
    InvalidParameterError,
    SegmentDeliveryError,
    TransformConfigError,
)
from airflow_provider_looker_segment.hooks.looker import LookerHook
from airflow_provider_looker_segment.hooks.segment import DeliveryReport, SegmentHook
from airflow_provider_looker_segment.models import Row
from airflow_provider_looker_segment.params import (
    to_bool,
    to_optional_int,
    to_optional_str,
    to_str_dict,
    to_str_list,
)
from airflow_provider_looker_segment.sync_state import CohortStateStore, SyncRun, sync_key
from airflow_provider_looker_segment.transform import (
    TRAIT_KEY_STYLES,
    TransformOptions,
    TransformPlan,
    build_message_id_namespace,
    format_timestamp,
    make_row_transformer,
    plan_transform,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

#: How many example payloads a dry run writes to the log.
DRY_RUN_EXAMPLES = 3
#: How many rejected / failed messageIds the summary (XCom) lists; the log has the counts per reason.
SUMMARY_MESSAGE_IDS = 100
#: The largest row limit Looker's API takes (a 64-bit integer).
MAX_LIMIT = 2**63 - 1
#: Executors that run every task on the scheduler's machine: local state is shared by all of them.
LOCAL_EXECUTORS = frozenset({"LocalExecutor", "SequentialExecutor", "DebugExecutor"})
#: Folder of the state files under AIRFLOW_HOME when ``state_path`` is not given.
DEFAULT_STATE_FOLDER = "looker_segment_state"


@dataclass
class _Settings:
    """The operator's arguments after template rendering and coercion."""

    look_id: str
    user_id_field: str | None
    email_field: str | None
    anonymous_id_field: str | None
    trait_names: dict[str, str]
    trait_key_style: str
    exclude_fields: list[str]
    destinations: list[str]
    dry_run: bool
    limit: int
    max_invalid_rows: int | None
    sync_mode: str
    full_refresh: bool
    membership_trait: str | None
    max_exit_ratio: float
    state_path: ObjectStoragePath | None


class _RowCounter:
    """Counts rows read and rows that produced no event, by reason."""

    def __init__(self) -> None:
        self.rows = 0
        self.invalid: Counter[str] = Counter()


class LookerToSegmentOperator(BaseOperator):
    """
    Send every row of a Looker Look to Segment as an ``identify`` call.

    The Look is streamed from the Looker API (memory stays flat whatever its size); each row becomes one
    ``identify`` call by the rules of Segment's Looker source: the user id column gives ``userId``, every
    other visible column becomes a trait (email included), and calls are delivered in batches through
    Segment's HTTP Tracking API. The task fails, after everything deliverable was sent, if Segment rejected
    any event or some could not be delivered. The summary is returned (XCom ``return_value``).

    .. seealso::
        The README's "Use it in your Airflow" section and parameter reference.

    :param look_id: the Look to sync (its id, as in ``/looks/42``). (templated)
    :param looker_conn_id: connection of type ``looker``.
    :param segment_conn_id: connection of type ``segment_tracking`` (or the official provider's ``segment``).
    :param user_id_field: Looker field that gives ``userId``, e.g. ``users.id``; detected from the LookML
        tag ``user_id`` or the field's name or label when not given. (templated)
    :param email_field: Looker field that gives ``traits.email``; detected from the tag ``email`` or the
        field's name or label when not given. (templated)
    :param anonymous_id_field: Looker field that gives ``anonymousId``; detected from the tag
        ``segment_anonymous_id`` or the field's name or label when not given. (templated)
    :param trait_names: mapping of Looker field name → trait key, overriding the key style. (templated)
    :param trait_key_style: how trait keys are made from fields: ``"label"`` (the field's short label,
        lower-cased: ``sessions count``, the seed's style), ``"snake"`` (``sessions_count``) or ``"field"``
        (``users.sessions_count``, Looker's own action). (templated)
    :param exclude_fields: Looker fields not to send as traits. (templated)
    :param destinations: names of the Segment destinations this source feeds, from Segment's Looker source
        table (e.g. ``["hubspot", "intercom"]``); the task fails before sending if the Look lacks an
        identifier one of them needs. (templated)
    :param dry_run: read the Look, build and validate every message, log examples, send nothing. (templated)
    :param limit: row limit passed to Looker; ``-1`` (the default) reads all rows, whatever limit the Look
        was saved with. (templated)
    :param max_invalid_rows: fail the task when more rows than this produce no event (no identifier, ...);
        ``None`` (the default) only reports them. (templated)
    :param sync_mode: ``"all"`` (the default) sends every row on every run; ``"changed"`` sends only the
        identities that are new or whose traits changed since the last delivery of this Look to this Segment
        source, keeping per-sync state (hashes, not traits) under ``state_path``. (templated)
    :param state_path: folder of the ``sync_mode="changed"`` state files: a local path or any URL Airflow's
        ObjectStoragePath reads (``s3://bucket/looker-segment/``, ``gs://...``); use shared storage when tasks
        run on several workers. Default: ``$AIRFLOW_HOME/looker_segment_state``. (templated)
    :param full_refresh: with ``sync_mode="changed"``, send everything whatever the state says; exits are
        still computed against the previous state. (templated)
    :param membership_trait: a trait set to ``true`` on every call (e.g. ``in_active_users``); with
        ``sync_mode="changed"``, identities that left the Look since the last run get one call with it
        set to ``false`` and leave the state. (templated)
    :param max_exit_ratio: with ``sync_mode="changed"``, when more than this share of the previous cohort
        would leave at once (a broken, empty or truncated query looks like everyone leaving), send no exit,
        keep them all in the state and fail the task after the summary; default 0.5. (templated)
    :param max_in_flight: batch requests sent at once (default: the Segment connection's, else 4).
    :param gzip: gzip request bodies (default: the Segment connection's setting).
    :param requests_per_second: client-side rate limit for workspaces with low limits.
    :param progress_interval: seconds between progress lines in the task log.
    """

    template_fields: Sequence[str] = (
        "look_id",
        "user_id_field",
        "email_field",
        "anonymous_id_field",
        "trait_names",
        "trait_key_style",
        "exclude_fields",
        "destinations",
        "dry_run",
        "limit",
        "max_invalid_rows",
        "sync_mode",
        "state_path",
        "full_refresh",
        "membership_trait",
        "max_exit_ratio",
    )
    template_fields_renderers = {"trait_names": "json", "destinations": "json", "exclude_fields": "json"}
    ui_color = "#52BD94"

    def __init__(
        self,
        *,
        look_id: str | int,
        looker_conn_id: str = LookerHook.default_conn_name,
        segment_conn_id: str = SegmentHook.default_conn_name,
        user_id_field: str | None = None,
        email_field: str | None = None,
        anonymous_id_field: str | None = None,
        trait_names: dict[str, str] | str | None = None,
        trait_key_style: str = "label",
        exclude_fields: list[str] | str | None = None,
        destinations: list[str] | str | None = None,
        dry_run: bool | str = False,
        limit: int | str = -1,
        max_invalid_rows: int | str | None = None,
        sync_mode: str = SYNC_ALL,
        state_path: str | ObjectStoragePath | None = None,
        full_refresh: bool | str = False,
        membership_trait: str | None = None,
        max_exit_ratio: float | str = 0.5,
        max_in_flight: int | None = None,
        gzip: bool | None = None,
        requests_per_second: float | None = None,
        progress_interval: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.look_id = look_id
        self.looker_conn_id = looker_conn_id
        self.segment_conn_id = segment_conn_id
        self.user_id_field = user_id_field
        self.email_field = email_field
        self.anonymous_id_field = anonymous_id_field
        self.trait_names = trait_names
        self.trait_key_style = trait_key_style
        self.exclude_fields = exclude_fields
        self.destinations = destinations
        self.dry_run = dry_run
        self.limit = limit
        self.max_invalid_rows = max_invalid_rows
        self.sync_mode = sync_mode
        self.state_path = state_path
        self.full_refresh = full_refresh
        self.membership_trait = membership_trait
        self.max_exit_ratio = max_exit_ratio
        self.max_in_flight = max_in_flight
        self.gzip = gzip
        self.requests_per_second = requests_per_second
        self.progress_interval = progress_interval

    # -- settings -------------------------------------------------------------------------------------

    def _settings(self) -> _Settings:
        """Coerce the rendered template fields and check them, with errors naming the parameter."""
        look_id = to_optional_str(self.look_id)
        if look_id is None:
            raise TransformConfigError("look_id is empty: pass the id of the Look to sync (as in /looks/42).")
        style = to_optional_str(self.trait_key_style) or "label"
        if style not in TRAIT_KEY_STYLES:
            raise TransformConfigError(
                f"trait_key_style must be one of {', '.join(TRAIT_KEY_STYLES)}, got {self.trait_key_style!r}"
            )
        limit = to_optional_int(self.limit, name="limit")
        if limit is not None and limit < -1:
            raise InvalidParameterError(f"limit must be -1 (all rows) or a positive number, got {limit}")
        if limit is not None and limit > MAX_LIMIT:
            raise InvalidParameterError(
                f"limit must be at most {MAX_LIMIT:,} (Looker's largest row limit), got {limit:,}: "
                "use -1 for all rows"
            )
        max_invalid = to_optional_int(self.max_invalid_rows, name="max_invalid_rows")
        if max_invalid is not None and max_invalid < 0:
            raise TransformConfigError(f"max_invalid_rows must be 0 or more, got {max_invalid}")
        sync_mode = to_optional_str(self.sync_mode) or SYNC_ALL
        if sync_mode not in SYNC_MODES:
            raise TransformConfigError(
                f"sync_mode must be one of {', '.join(SYNC_MODES)}, got {self.sync_mode!r}"
            )
        try:
            max_exit_ratio = float(self.max_exit_ratio)
        except (TypeError, ValueError):
            max_exit_ratio = -1.0
        if not 0.0 <= max_exit_ratio <= 1.0:
            raise TransformConfigError(
                f"max_exit_ratio must be a number from 0 to 1, got {self.max_exit_ratio!r}"
            )
        return _Settings(
            look_id=look_id,
            user_id_field=to_optional_str(self.user_id_field),
            email_field=to_optional_str(self.email_field),
            anonymous_id_field=to_optional_str(self.anonymous_id_field),
            trait_names=to_str_dict(self.trait_names, name="trait_names"),
            trait_key_style=style,
            exclude_fields=to_str_list(self.exclude_fields, name="exclude_fields"),
            destinations=to_str_list(self.destinations, name="destinations"),
            dry_run=to_bool(self.dry_run, name="dry_run"),
            limit=-1 if limit is None or limit == 0 else limit,
            max_invalid_rows=max_invalid,
            sync_mode=sync_mode,
            full_refresh=to_bool(self.full_refresh, name="full_refresh"),
            membership_trait=to_optional_str(self.membership_trait),
            max_exit_ratio=max_exit_ratio,
            state_path=_state_folder(self.state_path) if sync_mode == SYNC_CHANGED else None,
        )

    def _warn_if_state_is_local(self, state_path: ObjectStoragePath) -> None:
        """Warn when the changed-only state is on local disk but tasks may run on several machines."""
        if state_path.protocol not in ("", "file", "local"):
            return
        remote = sorted(set(_configured_executors()) - LOCAL_EXECUTORS)
        if remote:
            self.log.warning(
                "sync_mode='changed' keeps its state on this worker's local disk (%s) but the executor (%s) "
                "may run the next run on another machine, which would not see it and would send everyone "
                "again. Set state_path to shared storage, e.g. s3://aws_default@bucket/looker-segment/.",
                state_path,
                ", ".join(remote),
            )

    def _segment_hook(self) -> SegmentHook:
        tuning: dict[str, Any] = {}
        if self.max_in_flight is not None:
            tuning["max_in_flight"] = self.max_in_flight
        if self.gzip is not None:
            tuning["gzip"] = self.gzip
        if self.requests_per_second is not None:
            tuning["requests_per_second"] = self.requests_per_second
        return SegmentHook(segment_conn_id=self.segment_conn_id, **tuning)

    # -- execution --------------------------------------------------------------------------------------

    def execute(self, context: Context) -> dict[str, Any]:
        # Airflow's imports leave ~190k objects tracked by the garbage collector, and every full collection
        # triggered by the row loop would walk them all: park them in the permanent generation meanwhile.
        gc.freeze()
        try:
            return self._execute(context)
        finally:
            gc.unfreeze()

    def _execute(self, context: Context) -> dict[str, Any]:
        settings = self._settings()
        if settings.state_path is not None:
            self._warn_if_state_is_local(settings.state_path)
        destinations = resolve_destinations(settings.destinations)
        segment = self._segment_hook()
        if not settings.dry_run or settings.sync_mode == SYNC_CHANGED:
            segment.validate_config()  # a missing write key fails here, before Looker is even read
        namespace = self._message_id_namespace(context, settings.look_id)
        started = time.monotonic()
        if settings.sync_mode == SYNC_CHANGED:
            store = self._state_store(settings, segment)
            with store.begin(namespace, full_refresh=settings.full_refresh) as sync_run:
                summary = self._sync(settings, destinations, segment, namespace, started, sync_run)
        else:
            summary = self._sync(settings, destinations, segment, namespace, started, None)
        self._log_summary(summary)
        self._publish_asset_events(context, summary)
        self._fail_if_needed(settings, summary)
        return summary

    def _sync(
        self,
        settings: _Settings,
        destinations: list[Destination],
        segment: SegmentHook,
        namespace: str,
        started: float,
        sync_run: SyncRun | None,
    ) -> dict[str, Any]:
        """Stream the Look, turn rows into messages, deliver them (or plan them in a dry run)."""
        counter = _RowCounter()
        duplicates = DuplicateCounts()
        cohort = CohortCounts()
        library = {"name": PACKAGE_NAME, "version": __version__}
        with LookerHook(looker_conn_id=self.looker_conn_id).stream_look(
            settings.look_id, limit=settings.limit
        ) as stream:
            plan = plan_transform(stream.meta, self._options(settings))
            self._log_plan(settings.look_id, plan)
            self._check_destinations(destinations, plan)
            ran_at = stream.meta.ran_at
            transform = make_row_transformer(
                plan, ran_at=ran_at, message_id_namespace=namespace, library=library
            )
            row_messages = drop_duplicates(_messages(stream.rows, transform, counter), duplicates)
            messages: Iterable[dict] = row_messages
            if sync_run is not None:

                def with_exits() -> Iterator[dict]:
                    yield from changed_only(row_messages, sync_run, cohort)
                    yield from exit_messages(
                        sync_run,
                        cohort,
                        membership_trait=settings.membership_trait,
                        max_exit_ratio=settings.max_exit_ratio,
                        possibly_truncated=stream.possibly_truncated,
                        message_id_namespace=namespace,
                        timestamp=format_timestamp(ran_at) if ran_at is not None else None,
                        library=library,
                    )

                messages = with_exits()
            if settings.dry_run:
                delivery, undelivered = _dry_run(messages, self.log.info), None
            else:
                progress = _ProgressLogger(settings.look_id, counter, started, self.log.info)
                report = segment.send(messages, progress=progress, progress_interval=self.progress_interval)
                delivery = report.to_dict()
                complete = not report.rejected_events_omitted and not report.failed_events_omitted
                undelivered = undelivered_identities(report.rejected_ids + report.failed_ids, complete)
            possibly_truncated = stream.possibly_truncated
        summary = _summary(settings, plan, destinations, counter, delivery, possibly_truncated, ran_at)
        summary["duplicates"] = duplicates.duplicates
        warning = duplicates.warning(settings.look_id)
        if warning:
            self.log.warning("%s", warning)
        if sync_run is not None:
            summary.update(self._finish_sync(settings, sync_run, cohort, undelivered))
        summary["seconds"] = round(time.monotonic() - started, 3)
        return summary

    def _state_store(self, settings: _Settings, segment: SegmentHook) -> CohortStateStore:
        config = segment.settings
        key = sync_key(settings.look_id, config.base_url, config.write_key)
        if settings.state_path is None:  # _settings() sets it with sync_mode="changed"
            raise TransformConfigError("state_path is needed with sync_mode='changed'")
        self.log.info("Sync state: %s/%s.state", settings.state_path, key)
        return CohortStateStore(settings.state_path, key)

    def _finish_sync(
        self, settings: _Settings, sync_run: SyncRun, cohort: CohortCounts, undelivered: set[int] | None
    ) -> dict[str, Any]:
        """Save the state (it advances only for accepted events) and report the cohort's movements."""
        counts = {
            "new": cohort.new,
            "changed": cohort.changed,
            "unchanged": cohort.unchanged,
            "exited": cohort.exits_sent,
            "departed": cohort.exits,
            "exits_skipped": cohort.exits_skipped,
            "previous_cohort": sync_run.previous_count,
            "state_generation": sync_run.previous_generation,
            "full_refresh": sync_run.full_refresh,
        }
        if cohort.exits_skipped and cohort.exits:
            self.log.warning(
                "Look %s: %d identities left the cohort; no exit call sent: %s.",
                settings.look_id,
                cohort.exits,
                cohort.exits_skipped,
            )
        if cohort.guard_tripped:
            counts["exit_guard"] = cohort.guard_tripped  # the task fails after the summary is logged
        if settings.dry_run:
            self.log.info("Dry run: the sync state was read, not changed.")
            return counts
        result = sync_run.commit(undelivered, exits_sent=not cohort.keep_departed)
        counts["state_generation"] = result.generation
        counts["state_identities"] = result.entries
        return counts

    def _options(self, settings: _Settings) -> TransformOptions:
        return TransformOptions(
            user_id_field=settings.user_id_field,
            email_field=settings.email_field,
            anonymous_id_field=settings.anonymous_id_field,
            trait_names=settings.trait_names,
            trait_key_style=settings.trait_key_style,
            exclude_fields=tuple(settings.exclude_fields),
            membership_trait=settings.membership_trait,
        )

    @staticmethod
    def _message_id_namespace(context: Context, look_id: str) -> str:
        """
        Identify this task run: a retry of the same run re-sends the same messageIds (Segment drops the
        duplicates), the next scheduled run sends new ones.
        """
        ti = context["ti"]
        return build_message_id_namespace(
            dag_id=ti.dag_id, task_id=ti.task_id, run_id=ti.run_id, map_index=ti.map_index, look_id=look_id
        )

    def _log_plan(self, look_id: str, plan: TransformPlan) -> None:
        for identifier, found in plan.identifiers.items():
            if found:
                self.log.info(
                    "Look %s: %s from field %s (%s)", look_id, identifier, found["field"], found["how"]
                )
            else:
                self.log.info("Look %s: no %s field", look_id, identifier)
        self.log.info("Look %s: traits (field → key): %s", look_id, plan.traits)
        for warning in plan.warnings:
            self.log.warning("Look %s: %s", look_id, warning)

    def _check_destinations(self, destinations: list[Destination], plan: TransformPlan) -> None:
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
            self.log.warning("Destinations: %s", warning)
        if check.errors:
            raise DestinationError(
                "The Look cannot feed the listed destinations; nothing was sent:\n- "
                + "\n- ".join(check.errors)
            )
        self.log.info("Destinations checked: %s", ", ".join(d.name for d in destinations))

    def _log_summary(self, summary: dict[str, Any]) -> None:
        self.log.info(
            "Look %s: %d rows read, %d sent, %d invalid, %d rejected, %d failed, %d batches in %.1f s%s",
            summary["look_id"],
            summary["rows"],
            summary["sent"],
            summary["invalid"],
            summary["rejected"],
            summary["failed"],
            summary["batches"],
            summary["seconds"],
            " (dry run: nothing sent)" if summary["dry_run"] else "",
        )
        if summary["possibly_truncated"]:
            self.log.warning(
                "Look %s returned exactly as many rows as the limit (%s): the cohort may be truncated; "
                "raise `limit` or use -1 for all rows.",
                summary["look_id"],
                summary["limit"],
            )

    def _publish_asset_events(self, context: Context, summary: dict[str, Any]) -> None:
        """Attach the sync's figures to the events of the task's outlet assets."""
        if not self.outlets or summary["dry_run"]:
            return
        extra = {key: summary[key] for key in ("look_id", "rows", "sent", "invalid", "ran_at")}
        outlet_events = context.get("outlet_events")
        if outlet_events is None:
            return
        for outlet in self.outlets:
            try:
                outlet_events[outlet].extra = extra
            except (KeyError, TypeError):  # not an asset outlet
                continue

    def _fail_if_needed(self, settings: _Settings, summary: dict[str, Any]) -> None:
        problems = []
        if summary.get("exit_guard"):
            problems.append(summary["exit_guard"])
        if summary["rejected"] and settings.dry_run:
            problems.append(
                f"{summary['rejected']} events would be rejected by Segment ({summary['rejected_reasons']})"
            )
        elif summary["rejected"]:
            problems.append(
                f"{summary['rejected']} events rejected by Segment ({summary['rejected_reasons']})"
            )
        if summary["failed"]:
            problems.append(f"{summary['failed']} events not delivered ({summary['failed_reasons']})")
        if settings.max_invalid_rows is not None and summary["invalid"] > settings.max_invalid_rows:
            problems.append(
                f"{summary['invalid']} rows produced no event, more than max_invalid_rows="
                f"{settings.max_invalid_rows} ({summary['invalid_reasons']})"
            )
        if problems:
            error = ExitGuardError if summary.get("exit_guard") else SegmentDeliveryError
            raise error(
                f"Look {settings.look_id}: "
                + "; ".join(problems)
                + f". Summary: {orjson.dumps(summary).decode()}"
            )


def _messages(
    rows: Iterable[Row], transform: Callable[[Row], tuple[Any, Any]], counter: _RowCounter
) -> Iterator[dict]:
    """Turn rows into messages lazily, counting rows and the reasons rows produced nothing."""
    invalid = counter.invalid
    for row in rows:
        counter.rows += 1
        message, reason = transform(row)
        if message is None:
            invalid[reason] += 1
        else:
            yield message


class _ProgressLogger:
    """Writes a progress line (rows read, events delivered, rate) when the Segment hook reports."""

    def __init__(self, look_id: str, counter: _RowCounter, started: float, log: Callable[..., None]) -> None:
        self._look_id = look_id
        self._counter = counter
        self._started = started
        self._log = log

    def __call__(self, report: DeliveryReport) -> None:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        self._log(
            "Look %s: %d rows read, %d events delivered, %d rejected, %d failed (%.0f rows/s)",
            self._look_id,
            self._counter.rows,
            report.delivered,
            report.rejected,
            report.failed,
            self._counter.rows / elapsed,
        )


def _dry_run(messages: Iterable[dict], log: Callable[..., None]) -> dict[str, Any]:
    """Encode and batch every message as a real run would, log a few examples, send nothing."""
    examples: list[bytes] = []

    def with_examples() -> Iterator[dict]:
        for message in messages:
            if len(examples) < DRY_RUN_EXAMPLES:
                examples.append(encode_event(message))
            yield message

    plan = plan_batches(with_examples())
    for number, data in enumerate(examples, start=1):
        log("Dry run: example payload %d: %s", number, data.decode())
    log("Dry run: %d events would be sent in %d batches; nothing was sent", plan.events, plan.batches)
    return {
        "delivered": 0,
        "would_send": plan.events,
        "rejected": plan.rejected,
        "failed": 0,
        "batches": plan.batches,
        "requests": 0,
        "bytes": plan.bytes,
        "retries": 0,
        "rejected_reasons": plan.reasons,
        "failed_reasons": {},
        "rejected_message_ids": plan.rejected_message_ids,
        "failed_message_ids": [],
    }


def _summary(
    settings: _Settings,
    plan: TransformPlan,
    destinations: list[Destination],
    counter: _RowCounter,
    delivery: dict[str, Any],
    possibly_truncated: bool,
    ran_at: Any,
) -> dict[str, Any]:
    """The task's JSON-serialisable result."""
    return {
        "look_id": settings.look_id,
        "dry_run": settings.dry_run,
        "rows": counter.rows,
        "sent": delivery["delivered"],
        "would_send": delivery.get("would_send"),
        "invalid": sum(counter.invalid.values()),
        "invalid_reasons": dict(counter.invalid),
        "rejected": delivery["rejected"],
        "rejected_reasons": delivery.get("rejected_reasons", {}),
        "rejected_message_ids": delivery.get("rejected_message_ids", [])[:SUMMARY_MESSAGE_IDS],
        "failed": delivery["failed"],
        "failed_reasons": delivery.get("failed_reasons", {}),
        "failed_message_ids": delivery.get("failed_message_ids", [])[:SUMMARY_MESSAGE_IDS],
        "batches": delivery["batches"],
        "requests": delivery.get("requests", 0),
        "retries": delivery.get("retries", 0),
        "bytes": delivery.get("bytes", 0),
        "identifiers": plan.identifiers,
        "traits": plan.traits,
        "destinations": [d.name for d in destinations],
        "limit": settings.limit,
        "sync_mode": settings.sync_mode,
        "possibly_truncated": possibly_truncated,
        "ran_at": ran_at.isoformat() if ran_at is not None else None,
    }


def _configured_executors() -> list[str]:
    """The executor class names of ``[core] executor`` (a comma-separated list, entries may be aliased)."""
    from airflow.configuration import conf

    names = conf.get("core", "executor", fallback="") or ""
    return [entry.split(":")[-1].strip().rsplit(".", 1)[-1] for entry in names.split(",") if entry.strip()]


def _state_folder(state_path: str | ObjectStoragePath | None) -> ObjectStoragePath:
    """The folder of the sync state files: ``state_path``, else ``$AIRFLOW_HOME/looker_segment_state``."""
    if isinstance(state_path, ObjectStoragePath):
        return state_path
    text = to_optional_str(state_path)
    if text is None:
        home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
        text = os.path.join(home, DEFAULT_STATE_FOLDER)
    if "://" not in text:
        text = "file://" + os.path.abspath(os.path.expanduser(text))
    return ObjectStoragePath(text)
