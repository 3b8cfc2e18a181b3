"""LookerToSegmentOperator: stream a Look's (or any Looker query's) rows into Segment as identify, group or
track calls."""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.configuration import conf
from airflow.sdk import AssetAlias, BaseOperator, ObjectStoragePath
from airflow.sdk.definitions.asset import BaseAsset

from airflow_provider_looker_segment.api_calls import ApiCallCounts
from airflow_provider_looker_segment.cohort_sync import SYNC_ALL
from airflow_provider_looker_segment.destinations import Destination, resolve_destinations
from airflow_provider_looker_segment.exceptions import (
    LookerApiError,
    LookerSegmentError,
    QueryTaskError,
    SegmentDeliveryError,
    UndeliverableEventsError,
)
from airflow_provider_looker_segment.hooks.looker import LookerHook, LookerQuery
from airflow_provider_looker_segment.hooks.segment import SegmentHook
from airflow_provider_looker_segment.links import LookerExploreLink, LookerLookLink
from airflow_provider_looker_segment.look_stream import LookStream
from airflow_provider_looker_segment.models import LookInfo
from airflow_provider_looker_segment.params import to_number, to_optional_str
from airflow_provider_looker_segment.pipeline import SyncSettings, failure, log_summary, sync_look
from airflow_provider_looker_segment.progress import SyncProgress
from airflow_provider_looker_segment.state_location import state_folder, warn_if_state_is_local
from airflow_provider_looker_segment.sync_run import CohortStateStore
from airflow_provider_looker_segment.sync_state import (
    check_state_key,
    legacy_sync_keys,
    sync_key,
)
from airflow_provider_looker_segment.transform import build_message_id_namespace
from airflow_provider_looker_segment.triggers.looker import LookerQueryTaskTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

#: The operator arguments that make up :class:`~airflow_provider_looker_segment.pipeline.SyncSettings`.
_SETTINGS = tuple(SyncSettings.__dataclass_fields__)


class LookerToSegmentOperator(BaseOperator):
    """
    Send every row of a Looker Look, or of any Looker query, to Segment as an ``identify`` (default),
    ``group`` or ``track`` call.

    The Look is streamed from the Looker API (memory stays flat whatever its size); each row becomes one
    call by the rules of Segment's Looker source: the user id column gives ``userId``, every other visible
    column becomes a trait (email included; ``properties`` of track calls), and calls are delivered in
    batches through Segment's HTTP Tracking API. The task fails, after everything deliverable was sent, if
    Segment rejected any event or some could not be delivered. The summary is returned (XCom
    ``return_value``).

    Errors that no retry can fix (a deleted Look, a bad parameter, a Look without identifiers, events
    Segment rejects...) fail the task at once, whatever its ``retries``; those that can heal (Looker or
    Segment unavailable, timeouts, a lock held by a live run) are retried by Airflow as usual: see
    :mod:`airflow_provider_looker_segment.exceptions`. A dry run emits no asset event for the task's outlets.

    .. seealso::
        The README's "Use it in your Airflow" section and parameter reference.

    :param look_id: the Look to sync (its id, as in ``/looks/42``). Give exactly one of ``look_id``,
        ``query_id`` and ``query_slug``. (templated)
    :param query_id: a Looker query to sync instead of a Look (its id: ``GET /queries/{query_id}``); it
        runs with ``GET /queries/{query_id}/run/json_detail``. (templated)
    :param query_slug: a Looker query to sync, by the slug of an Explore URL (the ``qid`` of
        ``/explore/<model>/<explore>?qid=<slug>``, or a share URL's last part), resolved with
        ``GET /queries/slug/{slug}``. (templated)
    :param call: the Segment call each row becomes: ``"identify"`` (default; user traits), ``"group"``
        (account traits, with ``groupId``) or ``"track"`` (an event named ``event``, the columns as its
        ``properties``). (templated)
    :param group_id_field: with ``call="group"``, the Looker field that gives ``groupId``; detected from the
        LookML tag ``segment_group_id`` or the field's name or label (``accounts.id``, ``Account ID``) when
        not given. (templated)
    :param group_without_user: with ``call="group"``, what a row without a user identifier (an
        account-level Look) becomes: ``"anonymous_id"`` (default) sends its group call with a stable
        anonymousId derived from the group id, which Segment counts as a monthly tracked user (the summary's
        ``groups_without_user``); ``"skip"`` counts the row invalid (``no_user_for_group``), as Looker's own
        Segment action refuses it. (templated)
    :param event: with ``call="track"`` (required there), the event name, e.g. ``"Joined VIP cohort"``.
        (templated)
    :param entered_event: with ``sync_mode="changed"``, also send a track call with this event name for
        each identity that entered the cohort since the last delivered run, its traits as properties.
        (templated)
    :param exited_event: with ``sync_mode="changed"``, also send a track call with this event name for
        each identity that left the cohort since the last delivered run. (templated)
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
    :param state_key: with ``sync_mode="changed"``, name the sync's state yourself (1 to 64 letters, digits,
        ``.``, ``_``, ``-``), e.g. ``"vip-{{ macros.ds_format(ds, '%Y-%m-%d', '%Y') }}"`` for a state per
        year.
        By default the state is keyed by the Look, the call type and the Segment source (write key hashed),
        never by other values rendered per run (a templated ``event`` or ``filters`` keep one state).
        (templated)
    :param full_refresh: with ``sync_mode="changed"``, send everything whatever the state says; exits are
        still computed against the previous state. (templated)
    :param membership_trait: a trait set to ``true`` on every call (e.g. ``in_active_users``); with
        ``sync_mode="changed"``, identities that left the Look since the last run get one call with it
        set to ``false`` and leave the state. (templated)
    :param max_exit_ratio: with ``sync_mode="changed"``, when more than this share of the previous cohort
        would leave at once (a broken, empty or truncated query looks like everyone leaving), send no exit,
        keep them all in the state and fail the task after the summary; default 0.5. (templated)
    :param filters: mapping of Looker field → Looker filter expression, replacing or adding to the Look's
        own filters for this run, e.g. ``{"users.created_date": "{{ ds }}"}``; the Look's query (model,
        explore, fields, sorts, pivots, its other filters) runs with them instead of the saved Look. Empty:
        the Look as saved. (templated)
    :param deferrable: start the Look's query as a Looker query task and wait for it in the triggerer,
        without holding a worker slot, then stream its result; default ``[operators] default_deferrable``.
    :param poll_interval: with ``deferrable``, seconds between two status checks of the query task.
    :param query_timeout: with ``deferrable``, fail the task (and ask Looker to kill the query) when the
        query task has not completed after this many seconds; ``None`` waits as long as Looker runs it.
    :param max_in_flight: cap on the batch requests in flight; below it the number adapts to Segment's
        measured round trip (default: the Segment connection's, else 32).
    :param gzip: gzip request bodies (default: the Segment connection's setting).
    :param requests_per_second: client-side cap on requests per second (default: the connection's, else
        Segment's guidance of 1,000 per second).
    :param events_per_second: a ceiling on the events this task sends per second (batches of a tenth of it,
        no second carrying more than it plus one batch); default: the connection's, else none. Segment takes
        1,000 events per second per workspace (Engage too) and queues the excess, delivered later: give each
        of N tasks sending to one workspace at once 1,000 / N.
    :param progress_interval: seconds between progress lines in the task log.
    """

    template_fields: Sequence[str] = (
        "look_id",
        "query_id",
        "query_slug",
        "filters",
        "call",
        "group_id_field",
        "group_without_user",
        "event",
        "entered_event",
        "exited_event",
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
        "state_key",
        "full_refresh",
        "membership_trait",
        "max_exit_ratio",
    )
    template_fields_renderers = {
        "trait_names": "json",
        "destinations": "json",
        "exclude_fields": "json",
        "filters": "json",
    }
    ui_color = "#52BD94"
    operator_extra_links = (LookerLookLink(), LookerExploreLink())

    def __init__(
        self,
        *,
        look_id: str | int | None = None,
        query_id: str | int | None = None,
        query_slug: str | None = None,
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
        state_key: str | None = None,
        full_refresh: bool | str = False,
        membership_trait: str | None = None,
        max_exit_ratio: float | str = 0.5,
        call: str = "identify",
        group_id_field: str | None = None,
        group_without_user: str = "anonymous_id",
        event: str | None = None,
        entered_event: str | None = None,
        exited_event: str | None = None,
        filters: dict[str, str] | str | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = 10.0,
        query_timeout: float | timedelta | None = None,
        max_in_flight: int | None = None,
        gzip: bool | None = None,
        requests_per_second: float | None = None,
        events_per_second: float | None = None,
        progress_interval: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.look_id = look_id
        self.query_id = query_id
        self.query_slug = query_slug
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
        self.state_key = state_key
        self.full_refresh = full_refresh
        self.membership_trait = membership_trait
        self.max_exit_ratio = max_exit_ratio
        self.call = call
        self.group_id_field = group_id_field
        self.group_without_user = group_without_user
        self.event = event
        self.entered_event = entered_event
        self.exited_event = exited_event
        self.filters = filters
        self.deferrable = deferrable
        self.poll_interval = to_number(poll_interval, name="poll_interval", above=0)
        if isinstance(query_timeout, timedelta):
            query_timeout = query_timeout.total_seconds()
        self.query_timeout = to_number(query_timeout, name="query_timeout", above=0)
        self.max_in_flight = max_in_flight
        self.gzip = gzip
        self.requests_per_second = requests_per_second
        self.events_per_second = events_per_second
        self.progress_interval = progress_interval
        self._segment: SegmentHook | None = None
        #: The Explore of the query a run read (model, view, slug), for the "Looker Explore" link; ``None``
        #: for a Look, or before Looker named the query.
        self.looker_explore: dict[str, Any] | None = None
        #: What the last run read (its definition, the SQL Looker ran, the summary), for lineage.
        self.looker_source: LookInfo | None = None
        self.looker_sql: str | None = None
        self.looker_run_query_id: str | None = None
        self.sync_summary: dict[str, Any] | None = None

    def _segment_hook(self) -> SegmentHook:
        tuning: dict[str, Any] = {}
        if self.max_in_flight is not None:
            tuning["max_in_flight"] = self.max_in_flight
        if self.gzip is not None:
            tuning["gzip"] = self.gzip
        if self.requests_per_second is not None:
            tuning["requests_per_second"] = self.requests_per_second
        if self.events_per_second is not None:
            tuning["events_per_second"] = self.events_per_second
        return SegmentHook(segment_conn_id=self.segment_conn_id, **tuning)

    # -- execution --------------------------------------------------------------------------------------

    def execute(self, context: Context) -> dict[str, Any]:
        settings, destinations, segment = self._prepare()
        if not self.deferrable:
            return self._sync(context, settings, destinations, segment)
        calls: dict[str, Any] = {}
        with LookerHook(looker_conn_id=self.looker_conn_id) as looker:  # logs out when leaving
            if settings.source.is_look:
                task_id = looker.start_query_task(
                    settings.look_id, limit=settings.limit, filters=settings.filters or None
                )
            else:
                query = self._resolve_query(looker, settings)
                query = looker.with_filters(query, settings.filters or None)
                self._record_query(query)
                task_id = looker.start_query_task(query=query, limit=settings.limit)
                calls["source"] = query.info.to_dict()
                calls["run_query"] = {"query_id": query.run_id, "slug": query.run_slug}
        calls["looker_api_calls"] = looker.api_calls  # the logout included
        self.log.info(
            "%s: waiting for Looker query task %s in the triggerer (a status check every %g s%s).",
            settings.label,
            task_id,
            self.poll_interval,
            f", at most {self.query_timeout:g} s" if self.query_timeout else "",
        )
        self.defer(
            trigger=LookerQueryTaskTrigger(
                looker_conn_id=self.looker_conn_id,
                query_task_id=task_id,
                poll_interval=self.poll_interval,
                timeout=self.query_timeout,
                resume_with=calls,
            ),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """
        Resume once the trigger fired: stream the query task's result and sync it, or fail with the
        trigger's message (asking Looker to kill a query that may still be running).

        The event hands back (``resume_with``) what :meth:`execute` read: a query source's definition (no
        request to read it again), the id and slug of the query that ran (with filters: Looker's copy), and
        the Looker API calls it made.
        """
        resumed = event.get("resume_with") or {}
        source, run_query = resumed.get("source"), resumed.get("run_query")
        task_id = str(event.get("query_task_id") or "")
        if event.get("status") != "success":
            if task_id and event.get("looker_status") in (None, "added", "running"):
                self._kill_query_task(task_id)
            raise QueryTaskError(
                str(event.get("message") or f"Looker query task {task_id} did not complete"),
                task_id=task_id or None,
                task_status=event.get("looker_status"),
            )
        settings, destinations, segment = self._prepare()
        info = LookInfo.from_dict(source) if source else None
        if info is not None:
            settings = replace(settings, query_id=info.id, query_slug=info.slug or settings.query_slug)
            self.looker_source = info
            self.looker_run_query_id = str((run_query or {}).get("query_id") or info.id)
            self.looker_explore = {
                "model": info.model,
                "view": info.view,
                "slug": (run_query or {}).get("slug") or info.slug,
            }
        self.log.info("%s: Looker query task %s is complete.", settings.label, task_id)
        earlier = ApiCallCounts()
        earlier.merge(resumed.get("looker_api_calls"))
        earlier.merge(event.get("looker_api_calls"))
        return self._sync(
            context,
            settings,
            destinations,
            segment,
            lambda looker, _settings: looker.stream_query_task(
                task_id, settings.look_id, limit=settings.limit, info=info
            ),
            earlier_calls=earlier,
        )

    def _prepare(self) -> tuple[SyncSettings, list[Destination], SegmentHook]:
        """Read the arguments and check what can be checked before Looker is asked anything."""
        settings = SyncSettings.from_arguments(**{name: getattr(self, name) for name in _SETTINGS})
        destinations = resolve_destinations(list(settings.destinations))
        segment = self._segment = self._segment_hook()
        if not settings.dry_run or settings.changed_only:
            segment.validate_config()  # a missing write key fails here, before Looker is even read
        return settings, destinations, segment

    def _resolve_query(self, looker: LookerHook, settings: SyncSettings) -> LookerQuery:
        """Read the query source from Looker (by id or slug)."""
        if settings.query_id is not None:
            return looker.get_query(settings.query_id)
        return looker.get_query(slug=settings.query_slug)

    def _record_query(self, query: LookerQuery) -> None:
        """Keep what the run reads, for the Explore link and lineage."""
        self.looker_source = query.info
        self.looker_run_query_id = query.run_id
        self.looker_explore = {"model": query.info.model, "view": query.info.view, "slug": query.run_slug}

    def _kill_query_task(self, task_id: str) -> None:
        try:
            with LookerHook(looker_conn_id=self.looker_conn_id) as looker:
                if looker.kill_query_task(task_id):
                    self.log.warning("Asked Looker to kill query task %s.", task_id)
        except LookerApiError as error:
            self.log.warning("Could not ask Looker to kill query task %s: %s", task_id, error)

    def _open_source(
        self, looker: LookerHook, settings: SyncSettings
    ) -> tuple[SyncSettings, Callable[[LookerHook, SyncSettings], AbstractContextManager[LookStream]]]:
        """
        What a run streams: a Look as saved or with its filters; a query, read by id or slug first (its
        slug resolved to its id, which keys its state), then run (its copy with the filters).
        """
        if settings.source.is_look:
            return settings, lambda hook, s: hook.stream_look(
                s.look_id, limit=s.limit, filters=s.filters or None
            )
        query = self._resolve_query(looker, settings)
        settings = replace(
            settings, query_id=query.info.id, query_slug=query.info.slug or settings.query_slug
        )
        query = looker.with_filters(query, settings.filters or None)
        self._record_query(query)
        return settings, lambda hook, s: hook.stream_query(query, limit=s.limit)

    def _sync(
        self,
        context: Context,
        settings: SyncSettings,
        destinations: list[Destination],
        segment: SegmentHook,
        open_stream: Callable[[LookerHook, SyncSettings], AbstractContextManager[LookStream]] | None = None,
        *,
        earlier_calls: ApiCallCounts | None = None,
    ) -> dict[str, Any]:
        """Open the Looker session, the state and the stream, sync, report; fail after the summary."""
        # Airflow's imports leave ~190k objects tracked by the garbage collector, and every full collection
        # triggered by the row loop would walk them all: park them in the permanent generation meanwhile.
        gc.freeze()
        looker = LookerHook(looker_conn_id=self.looker_conn_id)
        try:
            with ExitStack() as resources:
                # Progress lines from before Looker is asked to run the Look: its wait is reported too.
                progress = resources.enter_context(
                    SyncProgress(
                        settings.source.key,
                        self.log,
                        self.progress_interval,
                        dry_run=settings.dry_run,
                        label=settings.label,
                    )
                )
                resources.enter_context(looker)  # leaving it logs out of Looker, also after a failure
                if open_stream is None:
                    settings, open_stream = self._open_source(looker, settings)
                namespace = self._message_id_namespace(context, settings.source.key)
                state = None
                if settings.changed_only:
                    store = self._state_store(settings, segment)
                    state = resources.enter_context(
                        store.begin(namespace, full_refresh=settings.full_refresh)
                    )
                stream = resources.enter_context(open_stream(looker, settings))
                if self.looker_source is None:  # a Look: what it runs is its query, or the filtered copy
                    self.looker_source = stream.info
                    run = stream.query.query_id if stream.query is not None else None
                    self.looker_run_query_id = run or stream.info.query_id
                self.looker_sql = stream.meta.sql
                summary = sync_look(
                    settings,
                    stream,
                    send=None if settings.dry_run else segment.send,
                    destinations=destinations,
                    message_id_namespace=namespace,
                    state=state,
                    log=self.log,
                    progress_interval=self.progress_interval,
                    progress=progress,
                    stop=segment.stop,
                )
        finally:
            gc.unfreeze()
        calls = earlier_calls or ApiCallCounts()
        calls.merge(looker.api_calls)
        summary.looker_api_calls = calls.to_dict()
        log_summary(self.log, summary)
        result = self.sync_summary = summary.to_dict()
        self._publish_asset_events(context, result)
        error = failure(settings, summary)
        if error is not None:
            raise self._final(error)
        return result

    def _final(self, error: LookerSegmentError) -> LookerSegmentError:
        """
        The error to fail the task with after a sync: undelivered events are retried only when some failed
        for a reason that can pass (Segment unavailable, rate limits, timeouts); events Segment rejected or
        refused for good, and too many invalid rows, fail the task at once (same message). The cohort's
        errors keep their class (:func:`~airflow_provider_looker_segment.pipeline.failure`): a tripped exit
        guard fails at once (``ExitGuardError``); a lost lock (``SyncStateLockLostError``) and a state that
        could not be saved (``SyncStateError``) are retried.
        """
        if type(error) is not SegmentDeliveryError:
            return error
        report = self._segment.last_report if self._segment is not None else None
        if report is not None and report.failed and report.refused is None:
            return error
        return UndeliverableEventsError(str(error))

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """
        The lineage of the completed sync, for the OpenLineage provider (extra ``openlineage``): the Look or
        query read (and the warehouse tables its SQL reads) as inputs, the Segment source as output, no secret
        in any of it. See :mod:`airflow_provider_looker_segment.lineage`.

        :param task_instance: the task instance that completed (unused: the operator recorded its run).
        """
        from airflow_provider_looker_segment.lineage import sync_lineage  # OpenLineage only when it asks

        return sync_lineage(self)

    def on_kill(self) -> None:
        """Stop sending at once when the task is killed (the events not sent are reported failed)."""
        if self._segment is not None:
            self._segment.stop()

    def _state_store(self, settings: SyncSettings, segment: SegmentHook) -> CohortStateStore:
        state_path = state_folder(self.state_path)
        warn_if_state_is_local(state_path, self.log)
        base_url, write_key = segment.config.base_url, segment.config.write_key
        own_key = to_optional_str(self.state_key)
        source = settings.source
        key = sync_key(
            source.id if source.is_look else None,
            base_url,
            write_key,
            call=settings.call,
            state_key=None if own_key is None else check_state_key(own_key),
            query_id=None if source.is_look else source.id,
        )
        legacy = (
            ()
            if own_key or not source.is_look
            else legacy_sync_keys(
                settings.look_id, base_url, write_key, call=settings.call, event=settings.event
            )
        )
        self.log.info("Sync state: %s/%s.state", state_path, key)
        return CohortStateStore(state_path, key, legacy_keys=legacy)

    @staticmethod
    def _message_id_namespace(context: Context, look_id: str) -> str:
        """
        Identify this task run: a retry of the same run re-sends the same messageIds (Segment drops the
        duplicates), the next scheduled run sends new ones. ``look_id`` is the source's key (a Look's id;
        ``query-<id>`` for a query).
        """
        ti = context["ti"]
        return build_message_id_namespace(
            dag_id=ti.dag_id, task_id=ti.task_id, run_id=ti.run_id, map_index=ti.map_index, look_id=look_id
        )

    def _publish_asset_events(self, context: Context, summary: dict[str, Any]) -> None:
        """
        Attach the sync's figures to the events of the task's outlet assets; after a dry run, emit none
        (Airflow records an asset event for each asset outlet of a task that succeeds, and a dry run must
        not start the DAGs scheduled on them).
        """
        if not self.outlets:
            return
        if summary["dry_run"]:
            kept = [outlet for outlet in self.outlets if not isinstance(outlet, BaseAsset | AssetAlias)]
            if len(kept) < len(self.outlets):
                self.log.info(
                    "Dry run: no asset event for %s (nothing was synced).",
                    ", ".join(_asset_name(outlet) for outlet in self.outlets if outlet not in kept),
                )
                self.outlets = kept  # what Airflow reads when it records the task's success
            return
        keys = ("source", "look_id", "query_id", "rows", "sent", "invalid", "ran_at")
        extra = {key: summary[key] for key in keys}
        outlet_events = context.get("outlet_events")
        if outlet_events is None:
            return
        for outlet in self.outlets:
            try:
                outlet_events[outlet].extra = extra
            except (KeyError, TypeError):  # not an asset outlet
                continue


def _asset_name(outlet: Any) -> str:
    """An outlet's name for the log (its ``name``, else its ``uri``)."""
    return str(getattr(outlet, "name", None) or getattr(outlet, "uri", None) or outlet)
