"""
The query and query-task routes of the Looker API stand-in, as Looker API 4.0 documents them:

==========================================================  ============================================
``POST /api/4.0/queries``                                   ``create_query``: 200 ``Query``; 422 when a
                                                            filter names a field not in the explore
``GET /api/4.0/queries/{query_id}``                         ``query``: 404 when unknown
``GET /api/4.0/queries/slug/{slug}``                        ``query_for_slug`` (a created query's slug, or
                                                            a fixture Look's query's): 404 when unknown
``GET /api/4.0/queries/{query_id}/run/{result_format}``     ``run_query`` (a Look's query id, or a created
                                                            query), streamed like a Look's run; ``sql``:
                                                            the SQL, not run; 404 when unknown
``POST /api/4.0/queries/run/{result_format}``               ``run_inline_query``; 400 ``Invalid filter``
``POST /api/4.0/query_tasks``                               ``create_query_task``: 200 ``QueryTask``
``GET /api/4.0/query_tasks/{query_task_id}``                ``query_task``: ``added``, ``running``, then
                                                            ``complete``, ``error``, ``killed``, ``expired``
``GET /api/4.0/query_tasks/{query_task_id}/results``        ``query_task_results``: 202 (or 204) without a
                                                            body until the task ends, then the result
``DELETE /api/4.0/running_queries/{query_task_id}``         ``kill_query``: 204
==========================================================  ============================================
"""

from __future__ import annotations

import socket
from typing import Any

from standins.looker_fixtures import JSON_DETAIL, FixtureLook, look_id_of_query, look_query_id
from standins.looker_http import HandlerBase, RecordedRequest, detail_error_body
from standins.looker_queries import (
    TASK_RESULT_FORMATS,
    FilterRefused,
    StandInCannot,
    only_fields,
    query_json,
    refused_filters,
    resolve_query,
)
from standins.looker_sql import query_slug

_CANNOT = "The Looker stand-in cannot interpret {what}; see standins/looker_queries.py for what it supports"


class QueryRoutes(HandlerBase):
    """Queries and query tasks (mixed into the stand-in's request handler)."""

    # --- queries ------------------------------------------------------------------------------------------

    def _create_query(self, record: RecordedRequest, params: dict[str, str], body: bytes) -> None:
        template = "queries"
        if not self._authorized(record, template):
            return
        query = self._json_body(record, body, template)
        if query is None or not self._has_model_and_view(record, query, template):
            return
        standin = self.standin
        if standin.validate_queries_on_create:
            try:
                refused_filters(query, standin.all_looks())
            except FilterRefused as refused:
                message = f"{refused}: the field is not in the explore {refused.explore}"
                self._send_validation(record, template, [("filters", "invalid", message)])
                return
        query_id, stored = standin.queries.create(query)
        standin._count("queries_created")
        self._send_json(record, 200, only_fields(query_json(query_id, stored), params.get("fields")))

    def _get_query(self, record: RecordedRequest, params: dict[str, str], query_id: str) -> None:
        template = "queries/:query_id"
        if not self._authorized(record, template):
            return
        stored = self.standin.queries.get(query_id)
        if stored is None:
            look = self._look_of_query_id(query_id)
            stored = look.look_json()["query"] if look is not None else None
        if stored is None:
            self._send_error(record, 404, "Not found", template)
            return
        self._send_json(record, 200, only_fields(query_json(query_id, stored), params.get("fields")))

    def _get_query_for_slug(self, record: RecordedRequest, params: dict[str, str], slug: str) -> None:
        template = "queries/slug/:slug"
        if not self._authorized(record, template):
            return
        query_id = self.standin.queries.id_of_slug(slug)
        if query_id is None:
            query_id = next(
                (
                    look_query_id(look.id)
                    for look in self.standin.all_looks()
                    if not look.deleted and query_slug(look_query_id(look.id)) == slug
                ),
                None,
            )
        if query_id is None:
            self._send_error(record, 404, "Not found", template)
            return
        self._get_query(record, params, query_id)

    def _run_query(self, record: RecordedRequest, params: dict[str, str], query_id: str, fmt: str) -> None:
        template = "queries/:query_id/run/:result_format"
        if not self._authorized(record, template):
            return
        look = self._rows_of_query(record, query_id, template)
        if look is not None:
            self._serve_run(record, params, look, fmt, template)

    def _run_inline_query(
        self, record: RecordedRequest, params: dict[str, str], body: bytes, fmt: str
    ) -> None:
        template = "queries/run/:result_format"
        if not self._authorized(record, template):
            return
        query = self._json_body(record, body, template)
        if query is None or not self._has_model_and_view(record, query, template):
            return
        look = self._resolve(record, query, template)
        if look is not None:
            self._serve_run(record, params, look, fmt, template)

    # --- query tasks --------------------------------------------------------------------------------------

    def _create_query_task(self, record: RecordedRequest, params: dict[str, str], body: bytes) -> None:
        template = "query_tasks"
        if not self._authorized(record, template):
            return
        request = self._json_body(record, body, template)
        if request is None:
            return
        query_id, fmt = request.get("query_id"), request.get("result_format")
        missing = [(name, "missing", "This field is required.") for name in ("query_id", "result_format")]
        problems = [problem for problem in missing if not request.get(problem[0])]
        if fmt and fmt not in TASK_RESULT_FORMATS:
            problems.append(("result_format", "invalid", f"Invalid result format: {fmt}"))
        if problems:
            self._send_validation(record, template, problems)
            return
        if fmt not in ("json_detail", "json", "csv"):
            self._send_error(record, 400, _CANNOT.format(what=f"the result format {fmt}"), template)
            return
        look = self._rows_of_query(record, str(query_id), template)
        if look is None:
            return
        task = self.standin.query_tasks.add(
            str(query_id),
            str(fmt),
            params,
            look,
            look_id=request.get("look_id"),
            source=request.get("source"),
        )
        self.standin._count("query_tasks")
        self._send_json(record, 200, only_fields(task.json(), params.get("fields")))

    def _query_task(self, record: RecordedRequest, params: dict[str, str], task_id: str) -> None:
        template = "query_tasks/:query_task_id"
        if not self._authorized(record, template):
            return
        fault = self.standin._take_task_poll_fault()
        if fault is not None:
            status, retry_after = fault
            if status == 0:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
            message = "Too Many Requests" if status == 429 else "Service temporarily unavailable."
            self._send_error(record, status, message, template, headers)
            return
        task = self.standin.query_tasks.look_at(task_id, self.standin.polls_per_step)
        if task is None:
            self._send_error(record, 404, "Not found", template)
            return
        self._send_json(record, 200, only_fields(task.json(), params.get("fields")))

    def _query_task_results(self, record: RecordedRequest, task_id: str) -> None:
        template = "query_tasks/:query_task_id/results"
        if not self._authorized(record, template):
            return
        task = self.standin.query_tasks.look_at(task_id, self.standin.polls_per_step)
        if task is None or task.status in ("killed", "expired"):
            self._send_error(record, 404, "Not found", template)
            return
        if task.status in ("added", "running") or (
            task.status == "complete" and self.standin._take_late_result()
        ):
            self._send_empty(record, self.standin.pending_results_status)
            return
        if task.status == "error" and task.error is not None:
            message, details = task.error
            if task.result_format != JSON_DETAIL:
                self._send_error(record, 400, " ".join(filter(None, (message, details))), template)
                return
            self._send_body(record, 200, "application/json", detail_error_body(task.look, message, details))
            return
        self._serve_run(record, task.params, task.look, task.result_format, template)

    def _kill_query(self, record: RecordedRequest, task_id: str) -> None:
        template = "running_queries/:query_task_id"
        if not self._authorized(record, template):
            return
        if not self.standin.query_tasks.kill(task_id):
            self._send_error(record, 404, "Not found", template)
            return
        self.standin._count("queries_killed")
        self._send_empty(record, 204)

    # --- helpers ------------------------------------------------------------------------------------------

    def _has_model_and_view(self, record: RecordedRequest, query: dict[str, Any], template: str) -> bool:
        missing = [
            name for name in ("model", "view") if not isinstance(query.get(name), str) or not query[name]
        ]
        if missing:
            self._send_validation(
                record, template, [(name, "missing", "This field is required.") for name in missing]
            )
            return False
        return True

    def _look_of_query_id(self, query_id: str) -> FixtureLook | None:
        """The Look whose saved query has this id, if any (and not deleted)."""
        look_id = look_id_of_query(query_id)
        look = self.standin.look(look_id) if look_id is not None else None
        return look if look is not None and not look.deleted else None

    def _rows_of_query(self, record: RecordedRequest, query_id: str, template: str) -> FixtureLook | None:
        """The rows of a query by id (a Look's or a created one), or ``None`` after answering an error."""
        stored = self.standin.queries.get(query_id)
        if stored is not None:
            return self._resolve(record, stored, template)
        look = self._look_of_query_id(query_id)
        if look is None:
            self._send_error(record, 404, "Not found", template)
        return look

    def _resolve(self, record: RecordedRequest, query: dict[str, Any], template: str) -> FixtureLook | None:
        """Check a query's filters and find its rows; ``None`` after answering 400."""
        looks = self.standin.all_looks()
        try:
            refused_filters(query, looks)
            return resolve_query(query, looks)
        except FilterRefused as refused:
            self._send_error(record, 400, str(refused), template)
        except StandInCannot as cannot:
            self.standin._count("stand_in_cannot")
            self._send_error(record, 400, _CANNOT.format(what=cannot), template)
        return None
