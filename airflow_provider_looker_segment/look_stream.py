"""
A Look's ``json_detail`` result read as a stream: field metadata first, then the rows one at a time, memory
flat whatever the rows. Why ``json_detail`` and how rows are decoded: docs/rows-to-calls.md, "Reading the
result". A body that breaks off, is not JSON or carries Looker's errors raises
:class:`~airflow_provider_looker_segment.exceptions.LookStreamError` /
:class:`~airflow_provider_looker_segment.exceptions.LookQueryError` naming the rows already read.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Iterator
from decimal import Decimal
from itertools import islice
from operator import length_hint
from typing import Any

import ijson
import msgspec
import urllib3

from airflow_provider_looker_segment.exceptions import (
    LookerApiError,
    LookQueryError,
    LookStreamError,
)
from airflow_provider_looker_segment.models import LookInfo, LookResultMeta, LookRunQuery, Row
from airflow_provider_looker_segment.net import exception_chain

#: Bytes read from the result body at a time.
READ_SIZE = 128 * 1024
#: Most bytes kept to read the result's metadata (everything before ``"data"`` plus the first rows).
MAX_HEAD_BYTES = 16 * 1024 * 1024
#: Characters of the body quoted when it is not JSON.
EXCERPT_CHARS = 200
#: Bytes of rows parsed at a time by msgspec (and read before looking for complete rows again).
CHUNK_BYTES = 32 * 1024
#: Most bytes kept waiting for the end of a row (a longer row is left to ijson, with the rest of the body).
MAX_PENDING_BYTES = 1024 * 1024
#: Row ends tried, last first, when the last ones turn out to be inside a string or a value.
MAX_CUT_TRIES = 8


def _fastest_ijson_backend() -> Any:
    """Return the fastest ijson backend available (the C extension ``yajl2_c`` when installed)."""
    for name in ("yajl2_c", "yajl2_cffi", "yajl2", "python"):
        try:
            return ijson.get_backend(name)
        except (ImportError, OSError):
            continue
    return ijson  # pragma: no cover - ijson always has its pure-python backend


IJSON = _fastest_ijson_backend()
#: How ijson reads rows: numbers exactly, the body in READ_SIZE reads.
_IJSON_OPTIONS: dict[str, Any] = {"use_float": False, "buf_size": READ_SIZE}

#: What reading a streamed body can raise when the connection or body breaks (requests' errors are OSErrors).
_STREAM_ERRORS = (ijson.JSONError, UnicodeDecodeError, urllib3.exceptions.HTTPError, OSError)
#: What an unwrapped row can raise when it is not a json_detail row.
_NOT_A_ROW = (KeyError, TypeError, AttributeError)

#: An escaped backslash, a surrogate pair's escape, or a lone surrogate's (so ``\\ud800`` stays text).
_SURROGATE_ESCAPE = re.compile(
    rb"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|\\u[dD][89a-fA-F][0-9a-fA-F]{2}"
)
#: The start of a surrogate's escape (looked for only in reads with a backslash: memchr is much faster).
_SURROGATE_HINT = re.compile(rb"\\u[dD]")
#: The end of a read that may be the start of such an escape (kept back for the next read).
_ESCAPE_TAIL = re.compile(rb"(?:\\u[dD][89abAB][0-9a-fA-F]{2})?(?:\\(?:u(?:[dD][0-9a-fA-F]{0,2})?)?)?\Z")
#: The key of the rows (a candidate only: it can also be in a string, or deeper in the head).
_DATA_KEY = re.compile(rb'"data"[ \t\r\n]*:[ \t\r\n]*\[')
_BLANKS = b" \t\r\n"


class _Cell(msgspec.Struct, gc=False):
    """A ``json_detail`` cell, ``{"value": ...}`` (its other keys, such as ``rendered``, are skipped)."""

    value: Any


#: Rows of cells, and any JSON, read with every number exact, as ijson reads them: integers of any size,
#: ``Decimal`` for a fraction or an exponent.
_CELL_ROWS = msgspec.json.Decoder(list[dict[str, _Cell]], float_hook=Decimal)
_ANY = msgspec.json.Decoder(float_hook=Decimal)
#: What msgspec raises on bytes that are not (complete) JSON.
_NOT_JSON = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


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
    The body as it is read: keeps the bytes read until :meth:`release` (the result's head), knows whether the
    body ended and what was read last, and makes lone-surrogate escapes U+FFFD escapes. :meth:`take` (the
    row reader's) sets :attr:`finished` at the end of the body; :meth:`read` (ijson's) also sets
    :attr:`ended`, and first hands over what :meth:`replay` was given.
    """

    def __init__(self, raw: Any, look_id: str, label: str | None = None) -> None:
        # read1 hands over whatever has arrived, so rows received before a connection breaks are not lost
        self._read = getattr(raw, "read1", raw.read)
        self._look_id = look_id
        self._label = label or f"Look {look_id}"
        self.head: bytearray | None = bytearray()
        self._held = b""  # the start of an escape, for the next read
        self.finished = self.ended = False
        self.last = b""  # the bytes handed over last
        self._replay: list[tuple[bytes, bytes]] = []
        self._error: BaseException | None = None

    def replay(self, pieces: list[tuple[bytes, bytes]], error: BaseException | None) -> None:
        """
        Have :meth:`read` hand over ``pieces`` first: bytes the row reader read, each with the read it came
        in (it becomes :attr:`last`); then raise ``error``, a read error the row reader met.
        """
        self._replay, self._error = [piece for piece in reversed(pieces) if piece[0]], error

    def read(self, size: int = -1) -> bytes:
        """Read from the body for ijson, keeping a copy while capturing."""
        if size == 0:  # ijson's probe for bytes or text
            return b""
        if self._replay:
            data, self.last = self._replay.pop()
            if self.head is not None:
                self.head += data
            return data
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        data = self.take(size) if not self.finished else b""
        self.ended = self.finished
        return data

    def take(self, size: int = READ_SIZE) -> bytes:
        """Read from the body (at most ``size`` bytes, and what an escape cut short), keeping a copy."""
        if size == 0:
            return b""
        data, self._held = self._held, b""
        while True:
            chunk = self._read(size)
            if not chunk:
                self.finished = True
                break
            data = data + chunk if data else chunk
            cut = _escape_cut(data)
            if cut:
                data, self._held = data[:cut], data[cut:]
                break
        if b"\\" in data and _SURROGATE_HINT.search(data):  # lone surrogates: U+FFFD (yajl gives ? or fails)
            data = _SURROGATE_ESCAPE.sub(lambda m: b"\\ufffd" if len(m[0]) == 6 else m[0], data)
        self.last = data or self.last
        if self.head is not None:
            self.head += data
            if len(self.head) > MAX_HEAD_BYTES:
                raise LookStreamError(
                    f"{self._label}: no rows or field metadata in the first {MAX_HEAD_BYTES:,} bytes "
                    "of the result",
                    look_id=self._look_id,
                )
        return data

    def release(self) -> bytes:
        """Stop capturing and return the captured bytes."""
        head, self.head = self.head, None
        return bytes(head or b"")

    def excerpt(self, redact: Callable[[str], str]) -> str:
        """The body's start while capturing, else the last bytes read: redacted, one line, 200 characters."""
        head, most = self.head, EXCERPT_CHARS * 4  # redacted before it is cut: no secret is cut in two
        data = bytes(head[:most]) if head is not None else self.last[-most:]
        text = redact(" ".join(data.decode("utf-8", "replace").split()))
        return text[:EXCERPT_CHARS] if head is not None else text[-EXCERPT_CHARS:]


def _rows_start(data: bytes | bytearray, start: int) -> int:
    """
    Where the rows start in ``data`` (the body so far): just after the ``[`` of the top-level ``"data"``,
    the first candidate from ``start`` on after which ijson reads the head (plus ``]}``) with ``data`` as its
    last key; ``0`` when there is none yet.
    """
    for match in _DATA_KEY.finditer(data, start):
        try:
            items = IJSON.kvitems(io.BytesIO(data[: match.end()] + b"]}"), "", use_float=False)
            keys = [key for key, _value in items]
        except (ijson.JSONError, UnicodeDecodeError):
            continue  # in a string, or deeper in the head
        if keys and keys[-1] == "data":
            return match.end()
    return 0


def _row_end(data: bytes, end: int) -> int:
    """
    Where the last row of ``data[:end]`` that is followed by another ends (after its ``}``, before blanks,
    ``,``, blanks and ``{``); ``-1`` if none. A candidate only: a ``},{`` can also be in a string or a value.
    """
    found = data.rfind(b"},{", 0, end)
    if found >= 0:
        return found + 1
    brace = data.rfind(b"{", 0, end)
    while brace > 0:
        i = brace - 1
        while i >= 0 and data[i] in _BLANKS:
            i -= 1
        if i > 0 and data[i] == 0x2C:  # ","
            i -= 1
            while i >= 0 and data[i] in _BLANKS:
                i -= 1
            if i >= 0 and data[i] == 0x7D:  # "}"
                return i + 1
        brace = data.rfind(b"{", 0, brace)
    return -1


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
    :ivar label: how messages name the source: ``Look 42`` (the default), ``Query 123``.
    :ivar info: the definition of what runs (the Look's, or the query's).
    """

    def __init__(
        self,
        look_id: str,
        body: Any,
        info: LookInfo,
        limit: int | None,
        *,
        read_timeout: float | None = None,
        logger: logging.Logger | None = None,
        redact: Callable[[str], str] = str,
        query: LookRunQuery | None = None,
        label: str | None = None,
    ) -> None:
        self.look_id = look_id
        self.label = label or f"Look {look_id}"
        self.info = info
        self.query = query
        self.row_count = 0
        self.possibly_truncated = False
        self.exhausted = False
        self._limit = limit
        self._read_timeout = read_timeout
        self._log = logger or logging.getLogger(__name__)
        self._redact = redact
        self._content_type = getattr(body, "headers", {}).get("Content-Type")
        self._body = capture = _HeadCapture(body, look_id, self.label)
        self._pending = b""  # the rows' bytes not parsed yet, from the start of a row
        self._reads: list[bytes] = []  # the reads _pending came in (from the body's start before a row)
        self._after_row = False  # _pending follows a row (and its comma)
        self._ijson: Iterator[Any] | None = None  # ijson's rows, once the row reader handed the body over
        self._done = False  # the body ended or broke off (with _error) while the row reader read it
        self._error: BaseException | None = None
        first, others = self._start()
        self.meta = self._meta(capture.release(), info, first)
        self._pivoted = frozenset(f.name for f in self.meta.fields if f.pivoted)
        self.rows: Iterator[Row] = self._iter_rows(first, others)

    def __iter__(self) -> Iterator[Row]:
        return self.rows

    # --- set-up -------------------------------------------------------------------------------------------

    def _start(self) -> tuple[dict[str, Any] | None, list[Any]]:
        """
        Read the head and the first rows: the first raw row (``None`` if there are none) and those parsed
        with it. A body that does not start as a ``json_detail`` result is left to ijson from its first byte.
        """
        data, start, lead = bytearray(), 0, b""
        try:
            while not start:
                read = self._body.take(READ_SIZE)
                if not read:
                    break
                self._reads.append(read)
                data += read
                lead = lead or read.lstrip(_BLANKS)[:1]
                if lead and lead != b"{":
                    break  # not a JSON object
                start = _rows_start(data, max(0, len(data) - len(read) - 64))
        except _STREAM_ERRORS as exc:
            self._done, self._error = True, exc
        if start:
            self._pending = bytes(data[start:])
            chunk = self._chunk(cells=False)
            if chunk is not None:
                self._advance(chunk[1])
                return chunk[0][0], chunk[0][1:]
        else:
            self._hand_over()
        try:
            return next(self._ijson), []  # type: ignore[arg-type]
        except StopIteration:
            return None, []
        except _STREAM_ERRORS as exc:
            raise self._broken(exc, 0) from exc

    def _meta(self, head: bytes, info: LookInfo, first: dict[str, Any] | None) -> LookResultMeta:
        """Build the result's metadata from the body's head (everything before ``data``)."""
        doc = self._parse_head(head, rows=first is not None)
        return LookResultMeta.from_detail(
            self.look_id,
            doc,
            hidden_fields=info.hidden_fields,
            first_row=first,
            limit=self._limit,
            query_timezone=info.query_timezone,
            label=self.label,
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
                f"{self.label}: the result has no field metadata before its rows (not json_detail?)",
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
                self._log.warning("%s", self._redact(f"{self.label}: Looker notes: {text}"))
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
        return LookStreamError(f"{self.label}: Looker answered a JSON array, not a json_detail result")

    def _query_error(self, message: Any) -> LookQueryError:
        return LookQueryError(
            f"{self.label}: Looker could not run the query: {message}", look_id=self.look_id
        )

    # --- rows ---------------------------------------------------------------------------------------------

    def _iter_rows(self, first: dict[str, Any] | None, others: list[Any]) -> Iterator[Row]:
        """Yield the unwrapped rows; raise :class:`LookStreamError` if the body breaks off."""
        count = 0  # rows handed out, and those of `batch` still to hand out
        raw: Any = first
        pivoted = self._pivoted
        batch: Iterator[Row] = iter(())
        try:
            if first is not None:
                row = self._unwrap(first)
                count = 1
                yield row
            for rows in self._batches(others):
                if rows.__class__ is list:  # the hot path: rows unwrapped a chunk at a time
                    count += len(rows)
                    batch = iter(rows)
                    yield from batch
                    continue
                for raw in rows:  # raw rows, unwrapped (and checked) one at a time
                    count += 1
                    yield {k: (_unwrap_pivoted(c) if k in pivoted else c["value"]) for k, c in raw.items()}
        except _STREAM_ERRORS as exc:
            raise self._broken(exc, count) from exc
        except _NOT_A_ROW as exc:
            count -= 1  # the row that failed to unwrap was not handed out
            raise self._bad_row(raw, count + 1) from exc
        finally:
            self.row_count = count - length_hint(batch)
        self._finish(count)

    def _batches(self, others: list[Any]) -> Iterator[list[Row] | tuple[Any, ...]]:
        """
        The rows after the first: lists of unwrapped rows, or tuples of raw rows to unwrap one by one (rows
        read by ijson, and chunks with a row that is not a ``json_detail`` row).
        """
        if others:
            yield tuple(others)
        pivoted = self._pivoted
        while self._ijson is None:
            chunk = self._chunk(cells=not pivoted)
            if chunk is None:
                break
            self._advance(chunk[1])
            batch: list[Row] | tuple[Any, ...]
            try:
                if chunk[2]:  # rows of {"value": ...} cells
                    batch = [{k: c.value for k, c in raw.items()} for raw in chunk[0]]
                else:
                    batch = [
                        {k: (_unwrap_pivoted(c) if k in pivoted else c["value"]) for k, c in raw.items()}
                        for raw in chunk[0]
                    ]
            except _NOT_A_ROW:
                batch = tuple(chunk[0])  # a row that is not a json_detail row: reported in its turn
            chunk = None  # only the batch stays (less for the garbage collector)
            yield batch
        for raw in self._ijson:  # type: ignore[union-attr]
            yield (raw,)

    def _unwrap(self, raw: dict[str, Any]) -> Row:
        """Unwrap one ``json_detail`` row (the slow, careful path used for the first row)."""
        try:
            return {k: (_unwrap_pivoted(c) if k in self._pivoted else c["value"]) for k, c in raw.items()}
        except _NOT_A_ROW:
            raise self._bad_row(raw, 1) from None

    # --- the row reader -----------------------------------------------------------------------------------

    def _chunk(self, *, cells: bool) -> tuple[list[Any], int, bool] | None:
        """
        The next complete rows, reading as needed: ``(rows, where they end, rows of cells)``: rows of
        :class:`_Cell` when ``cells`` and every cell is ``{"value": ...}``, else raw rows; ``None`` once the
        rest is handed over to ijson.
        """
        while True:
            pending = self._pending
            end = min(len(pending), CHUNK_BYTES)
            for _try in range(MAX_CUT_TRIES):
                cut = _row_end(pending, end)
                if cut < 0 and end == CHUNK_BYTES:
                    cut = _row_end(pending, len(pending))  # a row longer than CHUNK_BYTES
                if cut < 0:
                    break
                data, end = b"[" + pending[:cut] + b"]", cut - 1  # then the row end before this one
                try:
                    if cells:
                        try:
                            return _CELL_ROWS.decode(data), cut, True
                        except msgspec.ValidationError:
                            pass  # JSON, but a row that is not cells: raw rows
                    return _ANY.decode(data), cut, False
                except _NOT_JSON:
                    continue  # the cut was in a string or a value, or the bytes are not JSON
            lead = pending.lstrip(_BLANKS)[:1] if pending[:1] != b"{" else b"{"
            if self._done or len(pending) > MAX_PENDING_BYTES or lead not in (b"{", b""):
                self._hand_over()  # the end of the rows, a broken body, bytes that are not rows, a long row
                return None
            self._fill()

    def _advance(self, cut: int) -> None:
        """Drop the rows parsed (up to ``cut``) and the comma after them, and the reads they came in."""
        rest = self._pending[cut:]
        self._pending = pending = rest[rest.index(b",") + 1 :]
        self._after_row = True
        reads, kept, size = self._reads, 0, 0
        while size < len(pending):
            kept += 1
            size += len(reads[-kept])
        del reads[: len(reads) - kept]

    def _fill(self) -> None:
        """Read until :data:`CHUNK_BYTES` more bytes arrived, or the body ended or broke off."""
        fresh: list[bytes] = []
        size = 0
        try:
            while size < CHUNK_BYTES:
                data = self._body.take(READ_SIZE)
                if not data:
                    self._done = True
                    break
                fresh.append(data)
                size += len(data)
        except _STREAM_ERRORS as exc:
            self._done, self._error = True, exc
        self._pending = b"".join([self._pending, *fresh])
        self._reads += fresh

    def _hand_over(self) -> None:
        """
        Let ijson read the rest of the body, in the reads it came in: from its first byte before the first
        row (ijson then reads all of it, as it always did), else from the unread rows on, after a dummy row
        that it skips (so that a trailing comma is still an error). A read error met is raised after them.
        """
        body = self._body
        if not self._after_row:
            body.head = bytearray()  # captured again as ijson reads it
            body.replay([(read, read) for read in self._reads], self._error)
            self._pending, self._ijson = b"", IJSON.items(body, "data.item", **_IJSON_OPTIONS)
            return
        pending, pieces = self._pending, []
        unplaced = len(pending)
        for read in reversed(self._reads):
            if unplaced <= 0:
                break
            size = min(unplaced, len(read))
            pieces.append((pending[unplaced - size : unplaced], read))
            unplaced -= size
        pieces.reverse()
        first = pieces[0] if pieces else (b"", body.last)
        pieces[:1] = [(b'{"data":[0,' + first[0], first[1])]
        body.replay(pieces, self._error)
        self._pending, self._ijson = b"", islice(IJSON.items(body, "data.item", **_IJSON_OPTIONS), 1, None)

    # --- outcomes -----------------------------------------------------------------------------------------

    def _bad_row(self, raw: Any, number: int) -> LookerApiError:
        if isinstance(raw, dict) and "looker_error" in raw:
            return self._query_error(raw["looker_error"])
        return LookStreamError(
            f'{self.label}: row {number:,} is not a json_detail row (cells must be {{"value": ...}})',
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
            self._redact(f"{self.label}: result ended after {count:,} rows: {reason}"),
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
            f"{self.label}: the result has {count:,} rows, as many as the row limit of {limit:,}, "
            "so it may be truncated; use limit=-1 for all rows, or a larger limit"
        )
        self._log.warning("%s", message)
