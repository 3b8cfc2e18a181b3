"""
How Looker's raw values are written in Segment messages (pure functions, no I/O): identifiers, the
anonymousIds derived from an email or a group id, trait values, date-times (in UTC when the query's time zone
is known), arrays and objects, timestamps. The rules, with examples: docs/rows-to-calls.md ("Identifiers",
"Values").
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable
from datetime import date, datetime, time, timezone, tzinfo
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

#: Namespace of the UUID5 anonymous ids derived from emails (``uuid5(NAMESPACE_DNS, PACKAGE_NAME)``).
#: Never change it: it would give every email-only profile a new anonymousId.
ANONYMOUS_ID_NAMESPACE = uuid.UUID("939092db-b9f9-5a57-b221-ce58a1aa342a")

#: Namespace of the UUID5 anonymous ids derived from group ids (``uuid5(ANONYMOUS_ID_NAMESPACE, "groupId")``):
#: a group id and an email never give the same id. Never change it either.
GROUP_ANONYMOUS_ID_NAMESPACE = uuid.UUID("1d983c1c-6dae-5e95-9bfe-dd6955cc3e1f")

_NAMESPACE_BYTES = ANONYMOUS_ID_NAMESPACE.bytes
_GROUP_NAMESPACE_BYTES = GROUP_ANONYMOUS_ID_NAMESPACE.bytes
_LOOKER_DATETIME = re.compile(r"(\d{4}-\d{2}-\d{2}) (\d{2})((?::\d{2}(?::\d{2}(?:\.\d+)?)?)?)")
_LOOKER_PARTS = re.compile(r"(\d{4})-(\d{2})-(\d{2}) (\d{2})(?::(\d{2})(?::(\d{2})(\.\d+)?)?)?")
_TIME_TYPES = frozenset({"time", "datetime", "timestamp"})
#: LookML ``date_*`` types whose values carry a time of day (``date_time``, ``date_hour6``, ...).
_TIME_OF_DAY_PREFIXES = (
    "date_time",
    "date_raw",
    "date_hour",
    "date_minute",
    "date_second",
    "date_millisecond",
    "date_microsecond",
)
_INT64_MIN = -(2**63)
_UINT64_MAX = 2**64 - 1
_NONE_TYPE = type(None)
#: Value classes copied to a trait as they are; anything else goes through a converter.
_PLAIN = frozenset({str, int, bool, _NONE_TYPE})
#: For date/time-typed fields strings are converted too.
_PLAIN_NO_STR = frozenset({int, bool, _NONE_TYPE})

#: Turns one raw value into a trait value.
Converter = Callable[[Any], Any]


def format_timestamp(moment: datetime) -> str:
    """
    Return ``moment`` as ISO 8601 in UTC with milliseconds (``2024-01-05T10:00:00.000Z``).

    The provider's one UTC timestamp format (messages' ``timestamp``, ``sentAt``).

    :param moment: an aware datetime; a naive one is taken as UTC.
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- traits -----------------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    """orjson fallback for values of arrays/objects that JSON does not know."""
    if isinstance(value, Decimal):
        return _decimal_value(value)
    if isinstance(value, (set, frozenset)):
        return list(value)
    return str(value)


def _json_text(value: Any) -> str:
    """Compact JSON text of an array or object (the documented format of such traits)."""
    try:
        return orjson.dumps(value, default=_json_default).decode()
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def _decimal_value(value: Decimal) -> float | str | None:
    """A JSON number with a fraction or an exponent: a float, or its decimal text beyond a float's range."""
    if not value.is_finite():
        return None
    number = float(value)
    return number if number - number == 0.0 else str(value)


def to_trait_value(value: Any) -> Any:
    """
    Convert one raw Looker value into a trait value (a JSON scalar): docs/rows-to-calls.md, "Values".

    :param value: the raw value.
    :return: ``str``, ``int``, ``float``, ``bool`` or ``None``.
    """
    if value is None or value.__class__ in (str, int, bool):
        return value
    if isinstance(value, Decimal):
        return _decimal_value(value)
    if isinstance(value, float):
        number = float(value)
        return number if number - number == 0.0 else None  # NaN and ±Infinity: null
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return _json_text(value)
    if isinstance(value, int):
        return int(value)
    return str(value)


def to_time_trait_value(value: Any) -> Any:
    """Like :func:`to_trait_value`, and Looker's ``YYYY-MM-DD HH:MM:SS`` strings become ISO 8601."""
    if isinstance(value, str):
        match = _LOOKER_DATETIME.fullmatch(value)
        if match is None:
            return str(value)
        day, hour, rest = match.groups()
        return f"{day}T{hour}{rest or ':00'}"
    return to_trait_value(value)


def zoned_time_converter(zone: tzinfo) -> Converter:
    """
    Return a converter like :func:`to_time_trait_value` whose Looker date-times, local times of ``zone``,
    become the instant in UTC: ``"2024-03-01 08:15:30"`` (``America/New_York``) → ``"2024-03-01T13:15:30Z"``.

    :param zone: the time zone the query ran in.
    """

    def convert(value: Any) -> Any:
        if not isinstance(value, str):
            return to_trait_value(value)
        match = _LOOKER_PARTS.fullmatch(value)
        if match is None:
            return str(value)
        year, month, day, hour, minute, second, fraction = match.groups()
        try:
            local = datetime(int(year), int(month), int(day), int(hour), int(minute or 0), int(second or 0))
        except ValueError:  # not a date (e.g. hour 24): as it came
            return str(value)
        moment = local.replace(tzinfo=zone).astimezone(timezone.utc)
        return f"{moment:%Y-%m-%dT%H:%M:%S}{fraction or ''}Z"  # offsets are whole minutes: fraction as is

    return convert


def time_zone(name: Any) -> tzinfo | None:
    """
    The time zone Looker names (``America/New_York``, ``UTC``), or ``None`` when it names none or one that
    this machine's time zone database does not know.
    """
    if not isinstance(name, str) or not name.strip():
        return None
    try:
        return ZoneInfo(name.strip())
    except (ZoneInfoNotFoundError, ValueError):
        return None


def carries_time_of_day(lookml_type: str | None) -> bool:
    """Whether values of this LookML type are date-times (a date and a time of day), not bare dates."""
    kind = (lookml_type or "").lower()
    return kind in _TIME_TYPES or kind.startswith(_TIME_OF_DAY_PREFIXES)


def trait_converter(lookml_type: str | None, zone: tzinfo | None = None) -> tuple[frozenset[type], Converter]:
    """
    Return how the values of a field of this LookML type become traits, for the row loop.

    :param lookml_type: the field's ``type`` (e.g. ``number``, ``date_time``), or ``None``.
    :param zone: the time zone the query ran in; ``None`` when unknown (date-times then keep no offset).
    :return: ``(classes copied as they are, converter for any other value)``.
    """
    kind = (lookml_type or "").lower()
    if kind.startswith("date") or kind in _TIME_TYPES:
        return _PLAIN_NO_STR, to_time_trait_value if zone is None else zoned_time_converter(zone)
    return _PLAIN, to_trait_value


def json_safe(value: Any) -> Any:
    """Last-resort fix of a value orjson refuses: an integer beyond 64 bits, a lone surrogate (U+FFFD)."""
    if value.__class__ is int and not _INT64_MIN <= value <= _UINT64_MAX:
        return str(value)
    if isinstance(value, str):  # surrogate pairs are joined, each lone surrogate becomes U+FFFD
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return value


# --- identifiers ------------------------------------------------------------------------------------------


def _identifier_slow(value: Any) -> str | None:
    """Identifier from a non-``str``/``int`` value: integral numbers lose their ``.0``; others are refused."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, Decimal):
        if not value.is_finite():
            return None
        number = float(value)
        if number - number != 0.0:
            return str(value)  # beyond a float's range: its decimal text, e.g. 1E+400
        if number and value == value.to_integral_value():
            return str(int(value))  # exactly, also beyond 2**53
        value = number
    if isinstance(value, float):
        if not value or value - value != 0.0:
            return None
        return str(int(value)) if value.is_integer() else repr(float(value))
    if isinstance(value, int):
        return str(int(value)) if value else None
    if isinstance(value, str):
        return to_identifier(str(value))
    return None


def to_identifier(value: Any) -> str | None:
    """
    Return a userId/anonymousId string (docs/rows-to-calls.md, "Identifiers").

    :param value: the raw value of the identifier field.
    :return: the identifier, or ``None`` for values that are not identifiers.
    """
    cls = value.__class__
    if cls is str:
        return value.strip() or None
    if cls is int:
        return str(value) if value else None
    return _identifier_slow(value)


def anonymous_id_from_email(email: Any) -> str | None:
    """
    Return the stable anonymousId of an email: ``str(uuid5(ANONYMOUS_ID_NAMESPACE, email.strip().lower()))``.

    :param email: the raw value of the email field.
    :return: the id, or ``None`` when the value is not a string containing ``@``.
    """
    if not isinstance(email, str):
        return None
    normalised = email.strip().lower()
    if "@" not in normalised:
        return None
    return _uuid5(_NAMESPACE_BYTES, normalised)


def anonymous_id_from_group(group_id: str) -> str:
    """
    Return the stable anonymousId of a group call without a user identifier:
    ``str(uuid5(GROUP_ANONYMOUS_ID_NAMESPACE, group_id))``.

    :param group_id: the group id as sent (from :func:`to_identifier`).
    """
    return _uuid5(_GROUP_NAMESPACE_BYTES, group_id)


def _uuid5(namespace: bytes, name: str) -> str:
    """``str(uuid.uuid5(namespace, name))``, three times faster (no UUID object), surrogates allowed."""
    digest = bytearray(hashlib.sha1(namespace + name.encode("utf-8", "surrogatepass")).digest())
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    text = digest[:16].hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
