"""
LookerToSegmentOperator: stream a Look's (or any Looker query's) rows into Segment as identify, group or
track calls. It only wires the hooks, the options (:mod:`..settings`), the state (:mod:`..state_location`),
the pipeline (:mod:`..pipeline`), deferral, and the summary's XCom and asset events. Its parameters:
docs/parameters.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.configuration import conf
from airflow.sdk import BaseOperator, ObjectStoragePath

from airflow_provider_looker_segment.api_calls import ApiCallCounts
from airflow_provider_looker_segment.destinations import Destination, resolve_destinations
from airflow_provider_looker_segment.exceptions import LookerApiError, QueryTaskError
from airflow_provider_looker_segment.hooks.looker import LookerHook, LookerQuery
from airflow_provider_looker_segment.hooks.segment import SegmentHook
from airflow_provider_looker_segment.links import LookerExploreLink, LookerLookLink
from airflow_provider_looker_segment.look_stream import LookStream
from airflow_provider_looker_segment.models import LookInfo
from airflow_provider_looker_segment.params import to_number
from airflow_provider_looker_segment.pipeline import open_source, read_query, run_sync
from airflow_provider_looker_segment.settings import SYNC_ALL, SyncOptions
from airflow_provider_looker_segment.summary import log_summary, outcome_error, publish_asset_events
from airflow_provider_looker_segment.transform import build_message_id_namespace
from airflow_provider_looker_segment.triggers.looker import LookerQueryTaskTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

#: The Segment hook's tuning arguments (``None``: the connection's).
_TUNING = ("max_in_flight", "gzip", "requests_per_second", "events_per_second")
#: The arguments kept as they are (neither templated nor checked here).
_PLAIN_ARGUMENTS = ("looker_conn_id", "segment_conn_id", "deferrable", "progress_interval", *_TUNING)
#: What a run streams: (Looker hook, options) → (the options, the source resolved; what opens the stream).
_OpenSource = Callable[
    [LookerHook, SyncOptions], tuple[SyncOptions, Callable[[], AbstractContextManager[Any]]]
]


class LookerToSegmentOperator(BaseOperator):
    """
    Send every row of a Looker Look, or of any Looker query, to Segment as an ``identify`` (default),
    ``group`` or ``track`` call; return the summary (XCom). Every parameter, its default and whether it is
    templated: docs/parameters.md; what fails at once or is retried: :mod:`..exceptions`.

    :param look_id: the Look to sync; exactly one of ``look_id``, ``query_id``, ``query_slug``.
    :param query_id: a Looker query to sync instead of a Look, by id.
    :param query_slug: a Looker query to sync, by the slug of an Explore or share URL.
    :param call: what each row becomes: ``"identify"``, ``"group"`` or ``"track"``.
    :param group_id_field: with ``call="group"``, the field giving ``groupId`` (detected when not given).
    :param group_without_user: with ``call="group"``, rows without a user: ``"anonymous_id"`` or ``"skip"``.
    :param event: with ``call="track"`` (required there), the event name.
    :param entered_event: with ``sync_mode="changed"``, a track event for each identity that entered.
    :param exited_event: with ``sync_mode="changed"``, a track event for each identity that left.
    :param looker_conn_id: connection of type ``looker``.
    :param segment_conn_id: connection of type ``segment_tracking`` (or the official provider's ``segment``).
    :param user_id_field: the field giving ``userId`` (detected when not given).
    :param email_field: the field giving ``traits.email`` (detected when not given).
    :param anonymous_id_field: the field giving ``anonymousId`` (detected when not given).
    :param trait_names: mapping of Looker field name → trait key, overriding the key style.
    :param trait_key_style: how trait keys are made: ``"label"``, ``"snake"`` or ``"field"``.
    :param exclude_fields: Looker fields not to send as traits.
    :param destinations: the Segment destinations this source feeds, checked before anything is sent.
    :param dry_run: read the Look, build and validate every message, send nothing.
    :param limit: row limit passed to Looker; ``-1`` reads all rows.
    :param max_invalid_rows: fail the task when more rows than this produce no event.
    :param sync_mode: ``"all"`` sends every row; ``"changed"`` only what changed since the last delivery.
    :param state_path: folder of the ``sync_mode="changed"`` state (local path or ObjectStoragePath URL).
    :param state_key: with ``sync_mode="changed"``, the state's own name.
    :param full_refresh: with ``sync_mode="changed"``, send everything whatever the state says.
    :param membership_trait: a trait set to ``true`` on every call (``false`` on exits when changed-only).
    :param max_exit_ratio: with ``sync_mode="changed"``, the largest share of the cohort leaving at once.
    :param filters: mapping of Looker field → filter expression for this run.
    :param deferrable: wait for the query as a Looker query task in the triggerer.
    :param poll_interval: with ``deferrable``, seconds between two status checks.
    :param query_timeout: with ``deferrable``, seconds after which the query task fails.
    :param max_in_flight: cap on the batch requests in flight.
    :param gzip: gzip request bodies.
    :param requests_per_second: client-side cap on requests per second.
    :param events_per_second: a ceiling on the events this task sends per second.
    :param progress_interval: seconds between progress lines in the task log.
    """

    #: The templated parameters: the fields of the parameter model.
    template_fields: Sequence[str] = tuple(SyncOptions.__dataclass_fields__)
    template_fields_renderers = dict.fromkeys(
        ("trait_names", "destinations", "exclude_fields", "filters"), "json"
    )
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
        arguments = locals()
        super().__init__(**kwargs)
        for name in (*self.template_fields, *_PLAIN_ARGUMENTS):
            setattr(self, name, arguments[name])
        self.poll_interval = to_number(poll_interval, name="poll_interval", above=0)
        if isinstance(query_timeout, timedelta):
            query_timeout = query_timeout.total_seconds()
        self.query_timeout = to_number(query_timeout, name="query_timeout", above=0)
        self._segment: SegmentHook | None = None
        self._destinations: list[Destination] = []
        #: What the last run read, for the links (the Explore of a query: model, view, slug) and lineage.
        self.looker_explore: dict[str, Any] | None = None
        self.looker_source: LookInfo | None = None
        self.looker_sql: str | None = None
        self.looker_run_query_id: str | None = None
        self.sync_summary: dict[str, Any] | None = None

    def _segment_hook(self) -> SegmentHook:
        tuning = {name: getattr(self, name) for name in _TUNING if getattr(self, name) is not None}
        return SegmentHook(segment_conn_id=self.segment_conn_id, **tuning)

    def execute(self, context: Context) -> dict[str, Any]:
        options = self._prepare()
        if not self.deferrable:
            return self._sync(context, options, lambda looker, o: open_source(looker, o, self._record_query))
        calls: dict[str, Any] = {}
        with LookerHook(looker_conn_id=self.looker_conn_id) as looker:  # logs out when leaving
            if options.source.is_look:
                task_id = looker.start_query_task(
                    options.look_id, limit=options.limit, filters=options.filters or None
                )
            else:
                query = read_query(looker, options)[1]
                self._record_query(query)
                task_id = looker.start_query_task(query=query, limit=options.limit)
                calls["source"] = query.info.to_dict()
                calls["run_query"] = {"query_id": query.run_id, "slug": query.run_slug}
        calls["looker_api_calls"] = looker.api_calls  # the logout included
        self.log.info(
            "%s: waiting for Looker query task %s in the triggerer (a status check every %g s%s).",
            options.label,
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
        Resume once the trigger fired: sync the query task's result (``resume_with``: what :meth:`execute`
        read), or fail with the trigger's message, asking Looker to kill a query that may still run.
        """
        resumed = event.get("resume_with") or {}
        source, run_query = resumed.get("source"), resumed.get("run_query") or {}
        task_id = str(event.get("query_task_id") or "")
        if event.get("status") != "success":
            if task_id and event.get("looker_status") in (None, "added", "running"):
                try:
                    with LookerHook(looker_conn_id=self.looker_conn_id) as looker:
                        if looker.kill_query_task(task_id):
                            self.log.warning("Asked Looker to kill query task %s.", task_id)
                except LookerApiError as error:
                    self.log.warning("Could not ask Looker to kill query task %s: %s", task_id, error)
            raise QueryTaskError(
                str(event.get("message") or f"Looker query task {task_id} did not complete"),
                task_id=task_id or None,
                task_status=event.get("looker_status"),
            )
        options = self._prepare()
        info = LookInfo.from_dict(source) if source else None
        if info is not None:
            options = replace(options, query_id=info.id, query_slug=info.slug or options.query_slug)
            self._record(info, str(run_query.get("query_id") or info.id), run_query.get("slug") or info.slug)
        self.log.info("%s: Looker query task %s is complete.", options.label, task_id)
        earlier = ApiCallCounts()
        earlier.merge(resumed.get("looker_api_calls"))
        earlier.merge(event.get("looker_api_calls"))

        def task_result(looker: LookerHook, o: SyncOptions) -> tuple[SyncOptions, Callable[[], Any]]:
            return o, lambda: looker.stream_query_task(task_id, o.look_id, limit=o.limit, info=info)

        return self._sync(context, options, task_result, earlier)

    def _prepare(self) -> SyncOptions:
        """Read the arguments and check what can be checked before Looker is asked anything."""
        options = SyncOptions.from_arguments(**{name: getattr(self, name) for name in self.template_fields})
        self._destinations = resolve_destinations(list(options.destinations))
        self._segment = self._segment_hook()
        if not options.dry_run or options.changed_only:
            self._segment.validate_config()  # a missing write key fails here, before Looker is even read
        return options

    def _record_query(self, query: LookerQuery) -> None:
        self._record(query.info, query.run_id, query.run_slug)

    def _record(self, info: LookInfo, run_query_id: str | None, slug: str | None) -> None:
        self.looker_source, self.looker_run_query_id = info, run_query_id
        self.looker_explore = {"model": info.model, "view": info.view, "slug": slug}

    def _record_stream(self, stream: LookStream) -> None:
        if self.looker_source is None:  # a Look: what it runs is its query, or the filtered copy
            self.looker_source = stream.info
            run = stream.query.query_id if stream.query is not None else None
            self.looker_run_query_id = run or stream.info.query_id
        self.looker_sql = stream.meta.sql

    def _sync(
        self,
        context: Context,
        options: SyncOptions,
        source: _OpenSource,
        calls: ApiCallCounts | None = None,
    ) -> dict[str, Any]:
        """Open the Looker session, the state and the stream, sync, report; fail after the summary."""
        looker, segment = LookerHook(looker_conn_id=self.looker_conn_id), self._segment
        ti = context["ti"]
        options, summary = run_sync(
            options,
            looker=looker,
            segment=segment,
            open_source=lambda options: source(looker, options),
            message_id_namespace=lambda key: build_message_id_namespace(
                dag_id=ti.dag_id, task_id=ti.task_id, run_id=ti.run_id, map_index=ti.map_index, look_id=key
            ),
            destinations=self._destinations,
            log=self.log,
            progress_interval=self.progress_interval,
            on_stream=self._record_stream,
        )
        calls = calls or ApiCallCounts()
        calls.merge(looker.api_calls)
        summary.looker_api_calls = calls.to_dict()
        log_summary(self.log, summary)
        result = self.sync_summary = summary.to_dict()
        outlets = publish_asset_events(self.outlets, context.get("outlet_events"), result, self.log)
        if outlets is not self.outlets:
            self.outlets = outlets  # what Airflow reads when it records the task's success
        error = outcome_error(options, summary, segment.last_report)
        if error is not None:
            raise error
        return result

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """The lineage of the completed sync, for the OpenLineage provider: see :mod:`..lineage`."""
        from airflow_provider_looker_segment.lineage import sync_lineage  # OpenLineage only when it asks

        return sync_lineage(self)

    def on_kill(self) -> None:
        """Stop sending at once when the task is killed (the events not sent are reported failed)."""
        if self._segment is not None:
            self._segment.stop()
