"""
A Look's ``json_detail`` result read as a stream: field metadata first, then the rows one at a time.

The body is parsed incrementally with ijson (its C backend when installed), so memory does not depend on
the number of rows. Every JSON number is read exactly (``int``, or ``Decimal`` with a fraction or an
exponent); lone UTF-16 surrogate escapes become U+FFFD. A body that breaks off, is not JSON or carries
Looker's ``looker_error`` (a run) or ``errors`` with no rows (the ``json_detail`` result of a failed query
task) raises :class:`~airflow_provider_looker_segment.exceptions.LookStreamError` /
:class:`~airflow_provider_looker_segment.exceptions.LookQueryError` naming the rows already read.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import ijson
import urllib3

from airflow_provider_looker_segment.exceptions import (
    LookerApiError,
    LookQueryError,
    LookStreamError,
    LookTruncatedError,
)
from airflow_provider_looker_segment.models import (
    DIMENSION,
    MEASURE,
    TABLE_CALCULATION,
    LookField,
    LookInfo,
    LookResultMeta,
    LookRunQuery,
    PivotValue,
    Row,
)
from airflow_provider_looker_segment.net import exception_chain

#: Bytes read from the result body at a time by the JSON parser.
READ_SIZE = 128 * 1024
#: Most bytes kept to read the result's metadata (everything before ``"data"`` plus the first rows).
MAX_HEAD_BYTES = 16 * 1024 * 1024
#: Characters of the body quoted when it is not JSON.
EXCERPT_CHARS = 200

_CATEGORIES = (("dimensions", DIMENSION), ("measures", MEASURE), ("table_calculations", TABLE_CALCULATION))


def _fastest_ijson_backend() -> Any:
    """Return the fastest ijson backend available (the C extension ``yajl2_c`` when installed)."""
    for name in ("yajl2_c", "yajl2_cffi", "yajl2", "python"):
        try:
            return ijson.get_backend(name)
        except (ImportError, OSError):
            continue
    return ijson  # pragma: no cover - ijson always has its pure-python backend


IJSON = _fastest_ijson_backend()

#: What reading a streamed body can raise when the connection or body breaks (requests' errors are OSErrors).
_STREAM_ERRORS = (ijson.JSONError, UnicodeDecodeError, urllib3.exceptions.HTTPError, OSError)

#: An escaped backslash, a surrogate pair's escape, or a lone surrogate's (so ``\\ud800`` stays text).
_SURROGATE_ESCAPE = re.compile(
    rb"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|\\u[dD][89a-fA-F][0-9a-fA-F]{2}"
)
#: The end of a read that may be the start of such an escape (kept back for the next read).
_ESCAPE_TAIL = re.compile(rb"(?:\\u[dD][89abAB][0-9a-fA-F]{2})?(?:\\(?:u(?:[dD][0-9a-fA-F]{0,2})?)?)?\Z")


def _escape_cut(data: bytes) -> int:
    """Where to cut a read so that it does not end inside a ``\\u`` escape or a surrogate pair."""
    found = _ESCAPE_TAIL.search(data, max(0, len(data) - 12)) if data.rfind(b"\\", -12) >= 0 else None
    if found is None:
        return len(data)
    start = found.start()
    while start and data[start - 1] == 0x5C:  # keep the whole run of backslashes: its parity matters
        start -= 1
    return start


class _HeadCapture:
    """
    The body as the JSON parser reads it: keeps the bytes read until :meth:`release` (the result's head),
    knows whether the body ended and what was read last, and makes lone-surrogate escapes U+FFFD escapes.
    """

    def __init__(self, raw: Any, look_id: str) -> None:
        # read1 hands over whatever has arrived, so rows received before a connection breaks are not lost
        self._read = getattr(raw, "read1", raw.read)
        self._look_id = look_id
        self._head: bytearray | None = bytearray()
        self._held = b""  # the start of an escape, for the next read
        self.ended = False  # the end of the body was read
        self.last = b""  # the bytes handed over last

    def read(self, size: int = -1) -> bytes:
        """Read from the body, keeping a copy while capturing."""
        if size == 0:
            return b""
        data, self._held = self._held, b""
        while True:
            chunk = self._read(size)
            if not chunk:
                self.ended = True
                break
            data = data + chunk if data else chunk
            cut = _escape_cut(data)
            if cut:
                data, self._held = data[:cut], data[cut:]
                break
        if b"\\ud" in data or b"\\uD" in data:  # lone surrogates: U+FFFD (yajl gives ? or fails)
            data = _SURROGATE_ESCAPE.sub(lambda m: b"\\ufffd" if len(m[0]) == 6 else m[0], data)
        self.last = data
        head = self._head
        if head is not None:
            head += data
            if len(head) > MAX_HEAD_BYTES:
                raise LookStreamError(
                    f"Look {self._look_id}: no rows or field metadata in the first {MAX_HEAD_BYTES:,} bytes "
                    "of the result",
                    look_id=self._look_id,
                )
        return data

    def release(self) -> bytes:
        """Stop capturing and return the captured bytes."""
        head, self._head = self._head, None
        return bytes(head or b"")

    def excerpt(self, redact: Callable[[str], str]) -> str:
        """The body's start while capturing, else the last bytes read: redacted, one line, 200 characters."""
        head, most = self._head, EXCERPT_CHARS * 4  # redacted before it is cut: no secret is cut in two
        data = bytes(head[:most]) if head is not None else self.last[-most:]
        text = redact(" ".join(data.decode("utf-8", "replace").split()))
        return text[:EXCERPT_CHARS] if head is not None else text[-EXCERPT_CHARS:]


def _parse_ran_at(value: Any) -> datetime | None:
    """Parse Looker's ``ran_at`` into a timezone-aware datetime (UTC when Looker gives no offset)."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().replace(" ", "T", 1)
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _is_pivoted_cell(cell: Any) -> bool:
    """Whether a ``json_detail`` cell is pivoted: ``{pivot key: {"value": ...}}``, not ``{"value": ...}``."""
    return isinstance(cell, dict) and "value" not in cell


def _unwrap_pivoted(cell: Any) -> dict[str, Any]:
    """``{pivot key: {"value": x}}`` -> ``{pivot key: x}``."""
    if not isinstance(cell, dict):
        return {}
    return {key: (inner.get("value") if isinstance(inner, dict) else inner) for key, inner in cell.items()}


class LookStream:
    """
    A Look's result being streamed: metadata first, then the rows, one at a time.

    :ivar meta: field metadata, pivots, ``ran_at`` and the row limit in effect (available before rows).
    :ivar rows: the rows (``{field name: raw value}``), a lazy single-use iterator. Numbers are ``int`` (of
        any size) or, with a fraction or an exponent, ``Decimal`` (any of JSON's numbers is read exactly).
    :ivar row_count: rows handed out so far; the total once ``rows`` is exhausted.
    :ivar possibly_truncated: set once exhausted: the row count reached the limit in effect.
    :ivar exhausted: every row has been read.
    :ivar query: the filtered query that ran (its filters), or ``None`` when the Look ran as saved.
    """

    def __init__(
        self,
        look_id: str,
        body: Any,
        info: LookInfo,
        limit: int | None,
        *,
        strict_limit: bool = False,
        read_timeout: float | None = None,
        logger: logging.Logger | None = None,
        redact: Callable[[str], str] = str,
        query: LookRunQuery | None = None,
    ) -> None:
        self.look_id = look_id
        self.query = query
        self.row_count = 0
        self.possibly_truncated = False
        self.exhausted = False
        self._limit = limit
        self._strict = strict_limit
        self._read_timeout = read_timeout
        self._log = logger or logging.getLogger(__name__)
        self._redact = redact
        self._content_type = getattr(body, "headers", {}).get("Content-Type")
        self._body = capture = _HeadCapture(body, look_id)
        self._items = IJSON.items(capture, "data.item", use_float=False, buf_size=READ_SIZE)
        first = self._first_row()
        self.meta = self._meta(capture.release(), info, first)
        self._pivoted = frozenset(f.name for f in self.meta.fields if f.pivoted)
        self.rows: Iterator[Row] = self._iter_rows(first)

    def __iter__(self) -> Iterator[Row]:
        return self.rows

    # --- set-up -------------------------------------------------------------------------------------------

    def _first_row(self) -> dict[str, Any] | None:
        """Read up to the first row (so that everything before ``data`` has been read)."""
        try:
            return next(self._items)
        except StopIteration:
            return None
        except _STREAM_ERRORS as exc:
            raise self._broken(exc, 0) from exc

    def _meta(self, head: bytes, info: LookInfo, first: dict[str, Any] | None) -> LookResultMeta:
        """Build the result's metadata from the body's head (everything before ``data``)."""
        doc = self._parse_head(head, rows=first is not None)
        pivots = tuple(_pivot_value(p) for p in doc.get("pivots") or () if isinstance(p, dict))
        fields = tuple(self._fields(doc.get("fields") or {}, info, first, bool(pivots)))
        return LookResultMeta(
            look_id=self.look_id,
            fields=fields,
            pivots=pivots,
            ran_at=_parse_ran_at(doc.get("ran_at")),
            limit=self._limit,
        )

    def _parse_head(self, head: bytes, *, rows: bool) -> dict[str, Any]:
        """
        Return the top-level keys before ``data`` (every key when there are no rows: the head is then the
        whole body); raise on a ``looker_error`` answer, or on ``errors`` and no rows.
        """
        if head.lstrip().startswith(b"["):
            raise self._array_error(head)
        doc: dict[str, Any] = {}
        try:
            for key, value in IJSON.kvitems(io.BytesIO(head), "", use_float=False):
                if key == "data":
                    if rows:
                        break
                    continue
                doc[key] = value
        except ijson.JSONError:
            pass  # the head stops inside the rows (the row stream reports a body that breaks off there)
        self._check_errors(doc.get("errors"), rows=rows)
        if not isinstance(doc.get("fields"), dict):
            raise LookStreamError(
                f"Look {self.look_id}: the result has no field metadata before its rows (not json_detail?)",
                look_id=self.look_id,
            )
        return doc

    def _check_errors(self, errors: Any, *, rows: bool) -> None:
        """
        Raise :class:`LookQueryError` for the database errors of a ``json_detail`` result (``errors``; its
        ``data`` is then empty). Looker's notes (``Note: ...``), and errors beside rows, are logged only.
        """
        if not isinstance(errors, list) or not errors:
            return
        texts = []
        for entry in errors:
            parts = (
                (entry.get("message"), entry.get("message_details")) if isinstance(entry, dict) else (entry,)
            )
            texts.append(": ".join(str(part).strip() for part in parts if part))
        failures = [text for text in texts if text and not text.startswith("Note:")]
        for text in texts:
            if text and (rows or text not in failures):
                self._log.warning("%s", self._redact(f"Look {self.look_id}: Looker notes: {text}"))
        if failures and not rows:
            raise self._query_error(self._redact(" | ".join(failures)))

    def _array_error(self, head: bytes) -> LookerApiError:
        """Explain a JSON array answer: Looker's ``[{"looker_error": ...}]``, or an unexpected format."""
        try:
            first = next(iter(IJSON.items(io.BytesIO(head), "item")), None)
        except ijson.JSONError:
            first = None
        if isinstance(first, dict) and "looker_error" in first:
            return self._query_error(first["looker_error"])
        return LookStreamError(f"Look {self.look_id}: Looker answered a JSON array, not a json_detail result")

    def _query_error(self, message: Any) -> LookQueryError:
        return LookQueryError(
            f"Look {self.look_id}: Looker could not run the query: {message}", look_id=self.look_id
        )

    def _fields(
        self, block: dict[str, Any], info: LookInfo, first: dict[str, Any] | None, has_pivots: bool
    ) -> Iterator[LookField]:
        """Yield the result's columns (dimensions, measures, table calculations) as :class:`LookField`."""
        hidden_in_vis = set(info.hidden_fields)
        for key, category in _CATEGORIES:
            for entry in block.get(key) or ():
                name = str(entry.get("name"))
                if first is not None and name in first:
                    pivoted = _is_pivoted_cell(first[name])
                else:
                    pivoted = has_pivots and category != DIMENSION
                yield LookField(
                    name=name,
                    label=entry.get("label"),
                    label_short=entry.get("label_short"),
                    type=entry.get("type"),
                    tags=tuple(str(t) for t in entry.get("tags") or ()),
                    hidden=bool(entry.get("hidden")) or name in hidden_in_vis,
                    category=category,
                    pivoted=pivoted,
                )

    # --- rows ---------------------------------------------------------------------------------------------

    def _iter_rows(self, first: dict[str, Any] | None) -> Iterator[Row]:
        """Yield the unwrapped rows; raise :class:`LookStreamError` if the body breaks off."""
        count = 0  # rows handed out
        raw: Any = first
        pivoted = self._pivoted
        try:
            if first is not None:
                row = self._unwrap(first)
                count = 1
                yield row
            if pivoted:
                for raw in self._items:
                    count += 1
                    yield {k: (_unwrap_pivoted(c) if k in pivoted else c["value"]) for k, c in raw.items()}
            else:
                for raw in self._items:  # the hot path: one dict comprehension per row
                    count += 1
                    yield {k: c["value"] for k, c in raw.items()}
        except _STREAM_ERRORS as exc:
            raise self._broken(exc, count) from exc
        except (KeyError, TypeError, AttributeError) as exc:
            count -= 1  # the row that failed to unwrap was not handed out
            raise self._bad_row(raw, count + 1) from exc
        finally:
            self.row_count = count
        self._finish(count)

    def _unwrap(self, raw: dict[str, Any]) -> Row:
        """Unwrap one ``json_detail`` row (the slow, careful path used for the first row)."""
        try:
            return {k: (_unwrap_pivoted(c) if k in self._pivoted else c["value"]) for k, c in raw.items()}
        except (KeyError, TypeError, AttributeError):
            raise self._bad_row(raw, 1) from None

    def _bad_row(self, raw: Any, number: int) -> LookerApiError:
        if isinstance(raw, dict) and "looker_error" in raw:
            return self._query_error(raw["looker_error"])
        return LookStreamError(
            f'Look {self.look_id}: row {number:,} is not a json_detail row (cells must be {{"value": ...}})',
            look_id=self.look_id,
        )

    def _broken(self, exc: BaseException, count: int) -> LookStreamError:
        """The error for a body that broke off after ``count`` rows."""
        if any(
            isinstance(e, urllib3.exceptions.ReadTimeoutError | TimeoutError) for e in exception_chain(exc)
        ):
            waited = f"{self._read_timeout:g} seconds" if self._read_timeout else "too long"
            reason = f"no data for {waited} (read timeout)"
        elif isinstance(exc, ijson.JSONError | UnicodeDecodeError) and not self._body.ended:
            # yajl reports bad JSON as an IncompleteJSONError too: what tells them apart is the body's end
            complaint = str(exc).strip().split("\n", 1)[0][:120]
            content_type = self._content_type or "not given"
            where = "the body starts with" if count == 0 else "the last bytes received"
            reason = (
                f"the body is not valid JSON ({complaint}; content type {content_type}); "
                f"{where}: {self._body.excerpt(self._redact)!r}"
            )
        else:
            reason = "connection closed"
        return LookStreamError(
            self._redact(f"Look {self.look_id}: result ended after {count:,} rows: {reason}"),
            look_id=self.look_id,
        )

    def _finish(self, count: int) -> None:
        """Record the total and check it against the limit in effect."""
        self.row_count = count
        self.exhausted = True
        limit = self._limit
        if limit is None or limit <= 0 or count < limit:
            return
        self.possibly_truncated = True
        message = (
            f"Look {self.look_id}: the result has {count:,} rows, as many as the row limit of {limit:,}, "
            "so it may be truncated; use limit=-1 for all rows, or a larger limit"
        )
        if self._strict:
            raise LookTruncatedError(message, look_id=self.look_id)
        self._log.warning("%s", message)


def _pivot_value(entry: dict[str, Any]) -> PivotValue:
    """Build a :class:`PivotValue` from a ``json_detail`` pivot entry."""
    data = entry.get("data") if isinstance(entry.get("data"), dict) else {}
    label = " | ".join("" if v is None else str(v) for v in data.values())
    return PivotValue(key=str(entry.get("key")), data=dict(data), label=label)
