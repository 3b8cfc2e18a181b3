"""
HTTP plumbing shared by the Looker and the Segment hooks: a connection's base URL, transport errors in a
few words, and secrets kept out of texts. Each hook words its own messages from these.
"""

from __future__ import annotations

import base64
import re
import ssl
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3

from airflow_provider_looker_segment.exceptions import ConnectionConfigError

_DEFAULT_PORTS = {"http": 80, "https": 443}
_ERRNO = re.compile(r"\[Errno -?\d+\] [^'\")]+")
#: OpenSSL's words when a TLS handshake is answered in plain HTTP (``https://`` to an HTTP port).
_PLAIN_HTTP_TLS_WORDS = ("wrong version number", "record layer failure", "unknown protocol", "packet length")

#: What :func:`transport_problem` returns as the kind of a transport error.
PLAIN_HTTP = "plain_http"
TLS = "tls"
TIMEOUT = "timeout"
UNREACHABLE = "unreachable"
CLOSED = "closed"


def normalise_base_url(
    host: str | None,
    schema: str | None = None,
    port: int | None = None,
    *,
    what: str,
    keep_path: bool = False,
) -> str:
    """
    Return a connection's base URL, the same however its Host is written: ``scheme://host[:port][/path]``.

    A bare host gets the connection's Schema (``http``/``https``, default ``https``); scheme and host are
    lower-cased; the Port field is used when the Host has no port; a scheme's default port (443, 80) is
    dropped; a trailing ``/`` and ``/v1`` are dropped; credentials in the Host are refused.

    :param host: the connection's Host, e.g. ``https://x.cloud.looker.com:19999/api/4.0/`` or
        ``api.segment.io``.
    :param schema: the connection's Schema field.
    :param port: the connection's Port field.
    :param what: the connection, for error messages (e.g. ``"The Looker connection"``).
    :param keep_path: keep the path (a proxy prefix); otherwise it is dropped.
    :raises ConnectionConfigError: the Host is empty, not http(s), or carries credentials.
    """
    raw = (host or "").strip()
    if not raw:
        raise ConnectionConfigError(f"{what} has no Host")
    if "://" not in raw:
        scheme = (schema or "").strip().lower()
        raw = f"{scheme if scheme in _DEFAULT_PORTS else 'https'}://{raw}"
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    if parts.username or parts.password:
        raise ConnectionConfigError(
            f"{what}'s Host must not contain credentials; put secrets in the Password."
        )
    try:
        hostname, effective_port = parts.hostname, parts.port or port
    except ValueError:  # not a number, or over 65535
        hostname, effective_port = None, None
    if scheme not in _DEFAULT_PORTS or not hostname:
        raise ConnectionConfigError(f"{what}'s Host must be an http(s) URL or a host name, got {host!r}")
    netloc = f"[{hostname}]" if ":" in hostname else hostname
    if effective_port and int(effective_port) != _DEFAULT_PORTS[scheme]:
        netloc = f"{netloc}:{int(effective_port)}"
    path = parts.path.rstrip("/") if keep_path else ""
    if path.lower().endswith("/v1"):
        path = path[:-3].rstrip("/")
    return urlunsplit((scheme, netloc, path, "", ""))


def exception_chain(exc: BaseException) -> list[BaseException]:
    """
    Return ``exc`` and every exception it wraps, outermost first: exceptions in its ``args``, urllib3's
    ``reason``, ``__cause__`` and ``__context__``.
    """
    seen: list[BaseException] = []
    pending = [exc]
    while pending and len(seen) < 16:
        item = pending.pop(0)
        if any(item is known for known in seen):
            continue
        seen.append(item)
        pending += [arg for arg in item.args if isinstance(arg, BaseException)]
        for attr in ("reason", "__cause__", "__context__"):
            inner = getattr(item, attr, None)
            if isinstance(inner, BaseException):
                pending.append(inner)
    return seen


def is_plain_http_answer(exc: BaseException) -> bool:
    """Whether a TLS handshake failed because the server answered in plain HTTP (``https://`` to HTTP)."""
    texts = [
        str(item).replace("_", " ").lower() for item in exception_chain(exc) if isinstance(item, ssl.SSLError)
    ]
    return any(words in text for text in texts for words in _PLAIN_HTTP_TLS_WORDS)


def transport_problem(exc: BaseException) -> tuple[str, str]:
    """
    Classify a transport error (no answer from the server) with a short, secret-free reason.

    :return: ``(kind, reason)``, kind one of :data:`PLAIN_HTTP`, :data:`TLS`, :data:`TIMEOUT`,
        :data:`UNREACHABLE` (refused, name not resolved, no route) or :data:`CLOSED` (reset, closed without
        an answer).
    """
    chain = exception_chain(exc)
    tls = [item for item in chain if isinstance(item, ssl.SSLError | urllib3.exceptions.SSLError)]
    if tls or any(isinstance(item, requests.exceptions.SSLError) for item in chain):
        if is_plain_http_answer(exc):
            return PLAIN_HTTP, "the server answered in plain HTTP"
        codes = [getattr(item, "reason", None) for item in tls if isinstance(item, ssl.SSLError)]
        code = next((code for code in codes if isinstance(code, str) and code), None)
        return TLS, code or str(tls[-1] if tls else chain[-1])
    # urllib3's NewConnectionError (refused, no route...) subclasses its ConnectTimeoutError: test it first.
    refused = any(isinstance(item, urllib3.exceptions.NewConnectionError) for item in chain)
    if not refused and any(
        isinstance(item, TimeoutError | urllib3.exceptions.TimeoutError | requests.exceptions.Timeout)
        for item in chain
    ):
        return TIMEOUT, "no answer in time"
    for item in reversed(chain):
        found = _ERRNO.search(str(item))
        if found:
            return UNREACHABLE, found.group(0).strip()
    if refused or any(isinstance(item, urllib3.exceptions.NameResolutionError) for item in chain):
        return UNREACHABLE, str(chain[-1]) or type(chain[-1]).__name__
    if any(isinstance(item, ConnectionResetError) for item in chain):
        return CLOSED, "connection reset by the server"
    return CLOSED, "connection closed without an answer"


def redact(text: str, secrets: Iterable[str | None], *, basic_auth: bool = False) -> str:
    """
    Replace each secret in ``text`` by ``***``.

    :param text: e.g. a server's answer that may echo a request.
    :param secrets: the secrets; empty ones are skipped.
    :param basic_auth: also remove ``base64("<secret>:")``, the Basic ``Authorization`` form of a user name.
    """
    for secret in secrets:
        if not secret:
            continue
        text = text.replace(secret, "***")
        if basic_auth:
            text = text.replace(base64.b64encode(f"{secret}:".encode()).decode(), "***")
    return text
