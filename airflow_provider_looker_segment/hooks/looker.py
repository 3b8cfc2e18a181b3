"""
Hook for the Looker API 4.0: a Look's definition, and its result streamed row by row with field metadata.

This is the only module of the provider that talks to Looker. The ``looker_sdk`` client is built from the
Airflow connection alone (no ``looker.ini``, ``LOOKERSDK_*`` variables ignored). Look results are streamed:
the SDK's authentication headers are reused for a streaming ``requests`` call whose ``json_detail`` body is
parsed incrementally with ijson, so peak memory does not depend on the number of rows.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import Any, TypeVar, cast
from urllib.parse import quote, urlsplit

import ijson
import requests
import urllib3
from airflow.sdk import BaseHook
from cattrs.errors import CattrsError
from looker_sdk import error as sdk_error
from looker_sdk.rtl import api_settings, auth_session, auth_token, requests_transport, serialize
from looker_sdk.sdk import constants as sdk_constants
from looker_sdk.sdk.api40 import methods as methods40
from looker_sdk.sdk.api40 import models as models40
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from airflow_provider_looker_segment.exceptions import (
    LookDeletedError,
    LookerApiError,
    LookerSegmentError,
    LookNotFoundError,
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
    PivotValue,
    Row,
)

T = TypeVar("T")

DEFAULT_TIMEOUT = 120.0
API_VERSION = "4.0"
#: Statuses retried with backoff (before a body starts), as are connection errors.
RETRY_STATUSES = (429, 500, 502, 503, 504)
#: Bytes read from the result body at a time by the JSON parser.
READ_SIZE = 128 * 1024
#: Most bytes kept to read the result's metadata (everything before ``"data"`` plus the first rows).
MAX_HEAD_BYTES = 16 * 1024 * 1024

_TRUE_WORDS = frozenset({"true", "t", "yes", "y", "1", "on"})
_FALSE_WORDS = frozenset({"false", "f", "no", "n", "0", "off"})
_CATEGORIES = (("dimensions", DIMENSION), ("measures", MEASURE), ("table_calculations", TABLE_CALCULATION))
_ERRNO = re.compile(r"\[Errno -?\d+\] [^'\")]+")
_log = logging.getLogger(__name__)


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
#: What looker_sdk raises on a body it cannot deserialize.
_DESERIALIZE_ERRORS = (serialize.DeserializeError, CattrsError, KeyError, TypeError, ValueError)


# --- connection settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LookerConnectionSettings:
    """
    What the hook needs from the Airflow connection, validated and normalised.

    :param base_url: ``scheme://host[:port]`` of the Looker API (no path, no trailing slash).
    :param client_id: API client id (connection Login).
    :param client_secret: API client secret (connection Password); never shown in ``repr``.
    :param verify_ssl: verify the server's TLS certificate.
    :param timeout: seconds allowed for connecting and for each read.
    """

    base_url: str
    client_id: str
    client_secret: str = field(repr=False)
    verify_ssl: bool = True
    timeout: float = DEFAULT_TIMEOUT


def normalise_base_url(host: str | None, schema: str | None = None, port: int | None = None) -> str:
    """
    Return ``scheme://host[:port]`` from a connection's Host (a full URL or a bare host), Schema and Port.

    :param host: e.g. ``https://x.cloud.looker.com:19999/api/4.0/`` or ``x.cloud.looker.com``.
    :param schema: ``http`` or ``https`` for a bare host (default ``https``).
    :param port: used when the host does not carry a port.
    """
    raw = (host or "").strip()
    if not raw:
        raise LookerSegmentError(
            "The Looker connection has no Host: set it to e.g. https://company.cloud.looker.com"
        )
    if "://" not in raw:
        scheme = (schema or "").strip().lower()
        raw = f"{scheme if scheme in ('http', 'https') else 'https'}://{raw}"
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    try:
        hostname, url_port = parts.hostname, parts.port
    except ValueError as exc:
        raise LookerSegmentError(f"The Looker connection's Host is not a valid URL: {exc}") from None
    if scheme not in ("http", "https") or not hostname:
        raise LookerSegmentError(
            f"The Looker connection's Host must be an http(s) URL, got scheme '{scheme}'"
        )
    netloc = f"[{hostname}]" if ":" in hostname else hostname
    effective_port = url_port or port
    return f"{scheme}://{netloc}:{effective_port}" if effective_port else f"{scheme}://{netloc}"


def _as_bool(value: Any, name: str, default: bool) -> bool:
    """Read a boolean extra given as a boolean, a number or a string (URI connections give strings)."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return bool(value)
    word = str(value).strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise LookerSegmentError(f"The Looker connection's extra '{name}' must be true or false, got {value!r}")


def _as_timeout(value: Any) -> float:
    """Read the ``timeout`` extra (seconds, > 0)."""
    if value is None or value == "":
        return DEFAULT_TIMEOUT
    try:
        timeout = float(value)
    except (TypeError, ValueError):
        timeout = -1.0
    if not timeout > 0 or math.isinf(timeout):
        raise LookerSegmentError(
            f"The Looker connection's extra 'timeout' must be a positive number, got {value!r}"
        )
    return timeout


def settings_from_connection(conn: Any) -> LookerConnectionSettings:
    """
    Build :class:`LookerConnectionSettings` from an Airflow connection (JSON or URI form).

    :param conn: an ``airflow.sdk.Connection``.
    """
    extra = conn.extra_dejson or {}
    client_id = (conn.login or "").strip()
    client_secret = conn.password or ""
    if not client_id or not client_secret:
        missing = "Login (API client ID)" if not client_id else "Password (API client secret)"
        raise LookerSegmentError(f"The Looker connection '{conn.conn_id}' has no {missing}")
    return LookerConnectionSettings(
        base_url=normalise_base_url(conn.host, conn.schema, conn.port),
        client_id=client_id,
        client_secret=client_secret,
        verify_ssl=_as_bool(extra.get("verify_ssl"), "verify_ssl", True),
        timeout=_as_timeout(extra.get("timeout")),
    )


class ConnectionApiSettings(api_settings.ApiSettings):
    """
    looker_sdk settings taken from the Airflow connection only: no ``looker.ini``, no ``LOOKERSDK_*``.

    ``read_config`` returns strings only — looker_sdk silently drops settings that are not strings.

    :param settings: the connection's settings.
    """

    def __init__(self, settings: LookerConnectionSettings) -> None:
        self._config = {
            "base_url": settings.base_url,
            "client_id": settings.client_id,
            "client_secret": settings.client_secret,
            "verify_ssl": "true" if settings.verify_ssl else "false",
            "timeout": str(max(1, math.ceil(settings.timeout))),
        }
        super().__init__(filename="", sdk_version=sdk_constants.sdk_version, env_prefix=None)
        # The transport hands this to requests as is, so a fractional timeout is kept exactly.
        self.timeout = settings.timeout  # type: ignore[assignment]

    def read_config(self) -> api_settings.SettingsConfig:
        """Return the connection's settings (strings only)."""
        return cast(api_settings.SettingsConfig, dict(self._config))


# --- HTTP session -----------------------------------------------------------------------------------------


class _BoundedRetry(Retry):
    """urllib3 ``Retry`` whose ``Retry-After`` waits are capped by ``backoff_max`` and logged."""

    def get_retry_after(self, response: Any) -> float | None:
        """Return the server's ``Retry-After`` in seconds, at most ``backoff_max`` (unreadable: ``None``)."""
        try:
            value = super().get_retry_after(response)
        except urllib3.exceptions.InvalidHeader:
            return None
        return None if value is None else min(value, self.backoff_max)

    def sleep(self, response: Any = None) -> None:
        """Log the wait before the next attempt (what failed, which call, how long, which try), then wait."""
        last = self.history[-1] if self.history else None
        asked = self.get_retry_after(response) if response is not None else None
        wait, why = (asked, "Retry-After") if asked else (self.get_backoff_time(), "backoff")
        if last is not None:
            call = f"{last.method} {urlsplit(last.url or '').path}"  # the path only: no query, no secret
            what = f"answered HTTP {last.status} to {call}" if last.status else f"request {call} failed"
            what += "" if last.status else f" ({type(last.error).__name__})"
            done = len(self.history)
            of = done + int(self.total or 0)
            _log.warning("%s", f"Looker {what}; retry {done} of {of} in {wait:g} s ({why})")
        if wait > 0:
            time.sleep(wait)


class LookerSession(requests.Session):
    """
    The HTTP session shared by looker_sdk and the result streams.

    It always applies its own ``verify`` (plain ``requests`` lets ``REQUESTS_CA_BUNDLE`` override a
    session's ``verify=False``) and remembers, per thread, the last request's URL, status and error, so
    that errors looker_sdk reports without a status can be explained.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last = threading.local()

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        """Send a request (see :meth:`requests.Session.request`), recording its outcome."""
        if kwargs.get("verify") is None:
            kwargs["verify"] = self.verify
        last = self.last
        last.url, last.status, last.error = str(url), None, None
        try:
            response = super().request(method, url, *args, **kwargs)
        except requests.RequestException as exc:
            last.error = exc
            raise
        last.status = response.status_code
        return response


def _make_session(retries: int, backoff_factor: float, max_backoff: float) -> LookerSession:
    """Return a session that retries connection errors, 429 and 5xx (idempotent methods) with backoff."""
    retry = _BoundedRetry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        other=0,
        backoff_factor=backoff_factor,
        backoff_max=max_backoff,
        status_forcelist=RETRY_STATUSES,
        respect_retry_after_header=True,
        raise_on_status=False,
        raise_on_redirect=False,
    )
    session = LookerSession()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


# --- error descriptions -----------------------------------------------------------------------------------


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """Return ``exc`` and every exception it wraps (args, ``reason``, cause, context), outermost first."""
    seen: list[BaseException] = []
    pending = [exc]
    while pending:
        item = pending.pop(0)
        if any(item is s for s in seen):
            continue
        seen.append(item)
        pending += [a for a in item.args if isinstance(a, BaseException)]
        for attr in ("reason", "__cause__", "__context__"):
            inner = getattr(item, attr, None)
            if isinstance(inner, BaseException):
                pending.append(inner)
    return seen


def _transport_problem(exc: BaseException) -> tuple[str, str]:
    """Classify a transport error as ``tls``, ``timeout`` or ``unreachable``, with a short reason."""
    chain = _exception_chain(exc)
    for item in chain:
        if isinstance(item, ssl.SSLError | urllib3.exceptions.SSLError | requests.exceptions.SSLError):
            return "tls", str(chain[-1] if isinstance(chain[-1], ssl.SSLError) else item)
    # urllib3's NewConnectionError (refused, no route...) subclasses its ConnectTimeoutError: test it first
    refused = any(isinstance(item, urllib3.exceptions.NewConnectionError) for item in chain)
    for item in chain if not refused else ():
        if isinstance(item, TimeoutError | urllib3.exceptions.TimeoutError | requests.exceptions.Timeout):
            return "timeout", ""
    for item in reversed(chain):
        found = _ERRNO.search(str(item))
        if found:
            return "unreachable", found.group(0).strip()
    return "unreachable", str(chain[-1]) or type(chain[-1]).__name__


def _looker_message(text: str) -> str:
    """Return Looker's ``message`` from an error body (or the text itself, shortened)."""
    text = text.strip()
    try:
        body = json.loads(text)
    except ValueError:
        return text[:500]
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return text[:500]


# --- result stream ----------------------------------------------------------------------------------------


#: An escaped backslash, a surrogate pair's escape, or a lone surrogate's (so ``\\ud800`` stays text).
_SURROGATE_ESCAPE = re.compile(
    rb"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|\\u[dD][89a-fA-F][0-9a-fA-F]{2}"
)
#: The end of a read that may be the start of such an escape (kept back for the next read).
_ESCAPE_TAIL = re.compile(rb"(?:\\u[dD][89abAB][0-9a-fA-F]{2})?(?:\\(?:u(?:[dD][0-9a-fA-F]{0,2})?)?)?\Z")
#: Characters of the body quoted when it is not JSON.
EXCERPT_CHARS = 200


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
    ) -> None:
        self.look_id = look_id
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
        doc = self._parse_head(head)
        pivots = tuple(_pivot_value(p) for p in doc.get("pivots") or () if isinstance(p, dict))
        fields = tuple(self._fields(doc.get("fields") or {}, info, first, bool(pivots)))
        return LookResultMeta(
            look_id=self.look_id,
            fields=fields,
            pivots=pivots,
            ran_at=_parse_ran_at(doc.get("ran_at")),
            limit=self._limit,
        )

    def _parse_head(self, head: bytes) -> dict[str, Any]:
        """Return the top-level keys before ``data``; raise on a ``looker_error`` answer."""
        if head.lstrip().startswith(b"["):
            raise self._array_error(head)
        doc: dict[str, Any] = {}
        try:
            for key, value in IJSON.kvitems(io.BytesIO(head), "", use_float=False):
                if key == "data":
                    break
                doc[key] = value
        except ijson.JSONError:
            pass  # the head stops inside the rows (the row stream reports a body that breaks off there)
        if not isinstance(doc.get("fields"), dict):
            raise LookStreamError(
                f"Look {self.look_id}: the result has no field metadata before its rows (not json_detail?)",
                look_id=self.look_id,
            )
        return doc

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
            isinstance(e, urllib3.exceptions.ReadTimeoutError | TimeoutError) for e in _exception_chain(exc)
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


def _look_info(look_id: str, look: models40.LookWithQuery) -> LookInfo:
    """Build :class:`LookInfo` from looker_sdk's ``LookWithQuery``."""
    query = look.query
    vis = (query.vis_config if query else None) or {}
    limit_text = (query.limit if query else None) or ""
    return LookInfo(
        id=str(look.id or look_id),
        title=look.title or "",
        model=query.model if query else None,
        view=query.view if query else None,
        fields=tuple(query.fields or ()) if query else (),
        limit=int(limit_text) if re.fullmatch(r"-?\d+", limit_text.strip()) else None,
        pivots=tuple(query.pivots or ()) if query else (),
        hidden_fields=tuple(vis.get("hidden_fields") or ()),
        deleted=bool(look.deleted),
    )


def _normalise_look_id(look_id: str | int) -> str:
    text = str(look_id).strip()
    if not text:
        raise LookerApiError("A Look id is required (got an empty value)")
    return text


# --- the hook ---------------------------------------------------------------------------------------------


class LookerHook(BaseHook):
    """
    Talk to the Looker API 4.0 with the credentials of an Airflow connection.

    The connection (type ``looker``): Host = the API base URL (``https://company.cloud.looker.com``, a port
    such as ``:19999`` in the URL or in Port), Login = API client ID, Password = API client secret; extras
    ``verify_ssl`` (default true) and ``timeout`` (seconds, default 120).

    :param looker_conn_id: the Airflow connection id.
    :param retries: retries of a request that failed with a connection error, 429 or 5xx before its body
        started (idempotent requests only).
    :param backoff_factor: exponential backoff between retries: ``backoff_factor * 2 ** (retry - 1)`` s.
    :param max_backoff: longest wait between two retries, ``Retry-After`` included (seconds).
    """

    conn_name_attr = "looker_conn_id"
    default_conn_name = "looker_default"
    conn_type = "looker"
    hook_name = "Looker"

    def __init__(
        self,
        looker_conn_id: str = default_conn_name,
        *,
        retries: int = 3,
        backoff_factor: float = 1.0,
        max_backoff: float = 60.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.looker_conn_id = looker_conn_id
        self.retries = retries
        self.backoff_factor = backoff_factor
        self.max_backoff = max_backoff

    # --- client -------------------------------------------------------------------------------------------

    @cached_property
    def settings(self) -> LookerConnectionSettings:
        """The connection's settings, resolved once per hook."""
        return settings_from_connection(self.get_connection(self.looker_conn_id))

    @cached_property
    def session(self) -> LookerSession:
        """The HTTP session (with retries) shared by looker_sdk and result streams."""
        return _make_session(self.retries, self.backoff_factor, self.max_backoff)

    @cached_property
    def sdk(self) -> methods40.Looker40SDK:
        """A looker_sdk 4.0 client configured from the connection alone."""
        settings = ConnectionApiSettings(self.settings)
        transport = requests_transport.RequestsTransport(settings, self.session)
        auth = auth_session.AuthSession(settings, transport, serialize.deserialize40, API_VERSION)
        return methods40.Looker40SDK(
            auth, serialize.deserialize40, serialize.serialize40, transport, API_VERSION
        )

    def get_conn(self) -> methods40.Looker40SDK:
        """Return the looker_sdk 4.0 client."""
        return self.sdk

    def close(self) -> None:
        """Log out from Looker (best effort) and close the HTTP session."""
        if "sdk" in self.__dict__:
            try:
                self.sdk.auth.logout()
            except (sdk_error.SDKError, *_DESERIALIZE_ERRORS, requests.RequestException):
                self.log.debug("Logging out of Looker failed; ignored")
        if "session" in self.__dict__:
            self.session.close()

    # --- public API ---------------------------------------------------------------------------------------

    def test_connection(self) -> tuple[bool, str]:
        """Log in and read the API user; return ``(ok, message)`` for the UI's Test button."""
        try:
            user = self._call("Reading the API user", lambda: self.sdk.me(fields="id,display_name,email"))
        except LookerSegmentError as exc:
            return False, self._redact(str(exc))
        except Exception as exc:  # e.g. the connection does not exist: the UI shows the message
            return False, self._redact(f"{type(exc).__name__}: {exc}")
        name = user.display_name or user.email or f"user {user.id}"
        return True, f"Connected to {self.settings.base_url} as {name}"

    def get_look(self, look_id: str | int) -> LookInfo:
        """
        Return a Look's saved definition.

        :param look_id: the Look id.
        :raises LookNotFoundError: the Look does not exist or the API user cannot see it.
        :raises LookDeletedError: the Look is in the trash.
        """
        look_id = _normalise_look_id(look_id)
        look = self._call(f"Reading Look {look_id}", lambda: self.sdk.look(look_id), look_id=look_id)
        info = _look_info(look_id, look)
        if info.deleted:
            raise LookDeletedError(
                f"Look {look_id} is deleted (it is in Looker's trash): restore it or use another Look",
                look_id=look_id,
            )
        return info

    @contextmanager
    def stream_look(
        self, look_id: str | int, *, limit: int | None = -1, cache: bool = True, strict_limit: bool = False
    ) -> Iterator[LookStream]:
        """
        Run a Look and stream its result (``json_detail``, raw values, visualisation not applied).

        :param look_id: the Look id.
        :param limit: row limit; ``-1`` (default) for all rows, ``None`` for the Look's saved limit.
        :param cache: let Looker answer from its cache.
        :param strict_limit: raise :class:`LookTruncatedError` instead of warning when the number of rows
            equals the limit in effect (the result may be truncated).
        :return: a context manager giving a :class:`LookStream`; the HTTP response is closed on exit.
        """
        look_id = _normalise_look_id(look_id)
        info = self.get_look(look_id)
        effective = info.limit if limit is None else int(limit)
        self.log.info("Running Look %s (%s): limit %s, cache %s", look_id, info.title, effective, cache)
        response = self._open_result(look_id, None if limit is None else int(limit), cache)
        try:
            yield LookStream(
                look_id,
                response.raw,
                info,
                effective,
                strict_limit=strict_limit,
                read_timeout=self.settings.timeout,
                logger=self.log,
                redact=self._redact,
            )
        finally:
            response.close()

    # --- internals ----------------------------------------------------------------------------------------

    def _open_result(self, look_id: str, limit: int | None, cache: bool) -> requests.Response:
        """Start the ``json_detail`` run and return the response once its status is 200 (body unread)."""
        url = f"{self.settings.base_url}/api/{API_VERSION}/looks/{quote(look_id, safe='')}/run/json_detail"
        params = {"apply_formatting": "false", "apply_vis": "false", "cache": "true" if cache else "false"}
        if limit is not None:
            params["limit"] = str(limit)
        action = f"Running Look {look_id}"
        for attempt in range(2):
            headers = self._call("Logging in to Looker", lambda: self.sdk.auth.authenticate({}))
            try:
                response = self.session.get(
                    url, params=params, headers=headers, stream=True, timeout=self.settings.timeout
                )
            except requests.RequestException as exc:
                raise LookerApiError(self._transport_message(action, exc), look_id=look_id) from exc
            if response.status_code == 401 and attempt == 0:
                response.close()
                self.log.info("Looker refused the access token (expired?); logging in again")
                self._forget_token()
                continue
            if response.status_code != 200:
                message = _looker_message(response.text[:65536])
                response.close()
                raise self._http_error(action, response.status_code, message, look_id=look_id)
            response.raw.decode_content = True
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _call(self, action: str, func: Callable[[], T], *, look_id: str | None = None) -> T:
        """Run a looker_sdk call; log in again once on 401; turn SDK errors into :class:`LookerApiError`."""
        for attempt in range(2):
            try:
                return func()
            except sdk_error.SDKError as exc:
                last = self.session.last
                status, url = getattr(last, "status", None), getattr(last, "url", "")
                transport_error = getattr(last, "error", None)
                login = url.endswith("/login")
                if status == 401 and not login and attempt == 0:
                    self._forget_token()
                    continue
                if transport_error is not None:
                    raise LookerApiError(
                        self._transport_message(action, transport_error), look_id=look_id
                    ) from None
                message = _looker_message(exc.message or "")
                raise self._http_error(action, status, message, look_id=look_id, login=login) from None
            except _DESERIALIZE_ERRORS as exc:
                status = getattr(self.session.last, "status", None)
                raise LookerApiError(
                    f"{action}: Looker's answer could not be read ({type(exc).__name__}); "
                    f"is Host the Looker API URL ({self.settings.base_url})?",
                    status=status,
                    look_id=look_id,
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _http_error(
        self,
        action: str,
        status: int | None,
        message: str,
        *,
        look_id: str | None = None,
        login: bool = False,
    ) -> LookerApiError:
        """Turn an HTTP error answer into the provider's exception, with a message a user can act on."""
        message = self._redact(message)
        if login:
            return LookerApiError(
                f"Looker rejected the API credentials of connection '{self.looker_conn_id}' "
                f"(client ID {self.settings.client_id}) at {self.settings.base_url}: "
                f"HTTP {status} {message}. Check the client ID and secret.",
                status=status,
            )
        if status == 404 and look_id is not None:
            return LookNotFoundError(
                f"Look {look_id} not found, or the API user cannot see it", status=404, look_id=look_id
            )
        if status == 401:
            return LookerApiError(
                f"{action}: Looker refused the API user even after logging in again (HTTP 401): {message}",
                status=status,
                look_id=look_id,
            )
        shown = f"HTTP {status}" if status else "error"
        return LookerApiError(f"{action} failed ({shown}): {message}", status=status, look_id=look_id)

    def _transport_message(self, action: str, exc: BaseException) -> str:
        """Describe a connection-level failure (TLS, timeout, unreachable host)."""
        kind, reason = _transport_problem(exc)
        base = self.settings.base_url
        if kind == "tls":
            text = (
                f"{action}: TLS failure talking to {base}: {reason}. Install the server's CA certificate, "
                "or set verify_ssl to false in the connection (test servers only)"
            )
        elif kind == "timeout":
            text = f"{action}: {base} did not answer within {self.settings.timeout:g} seconds (timeout)"
        else:
            text = f"{action}: cannot reach {base}: {reason}"
        return self._redact(text)

    def _forget_token(self) -> None:
        """Drop the access token so that the next call logs in again."""
        self.sdk.auth.token = auth_token.AuthToken()

    def _redact(self, text: str) -> str:
        """Remove the client secret and the access token from a text that may echo a server's answer."""
        secrets = [self.settings.client_secret] if "settings" in self.__dict__ else []
        if "sdk" in self.__dict__ and self.sdk.auth.token.access_token:
            secrets.append(self.sdk.auth.token.access_token)
        for secret in secrets:
            if secret:
                text = text.replace(secret, "***")
        return text
