"""
The one coercion layer: operator arguments (rendered templates) and connection extras into typed values.

Jinja renders to strings unless the DAG sets ``render_template_as_native_obj=True``, and URI connections give
every extra as a string; these helpers accept both forms (``"false"`` and ``False``, ``"['hubspot']"`` and
``["hubspot"]``, ``"30"`` and ``30``), use one vocabulary for booleans, and raise
:class:`~airflow_provider_looker_segment.exceptions.InvalidParameterError` naming the parameter (an operator
argument such as ``limit``, or an extra such as ``extra 'timeout' of connection 'looker_default'``).
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Mapping
from typing import Any

from airflow_provider_looker_segment.exceptions import InvalidParameterError

_TRUE = frozenset({"true", "1", "yes", "on", "y", "t"})
_FALSE = frozenset({"false", "0", "no", "off", "n", "f"})
_EMPTY = frozenset({"", "none", "null"})


def is_empty(value: Any) -> bool:
    """Whether a value means "not set": ``None``, a blank string, ``"none"`` or ``"null"``."""
    return value is None or (isinstance(value, str) and value.strip().lower() in _EMPTY)


def to_bool(value: Any, *, name: str, default: bool = False) -> bool:
    """
    Return ``value`` as a boolean.

    :param value: a bool, a number (0 or 1), or a string such as ``"True"``, ``"no"``, ``"y"``, ``"off"``.
    :param name: the parameter's name, for the error message.
    :param default: the value when ``value`` is empty (see :func:`is_empty`).
    """
    if isinstance(value, bool):
        return value
    if is_empty(value):
        return default
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidParameterError(f"{name} must be true or false, got {value!r}")


def to_number(
    value: Any,
    *,
    name: str,
    default: float | None = None,
    whole: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
) -> Any:
    """
    Return ``value`` as a finite ``float`` (or ``int`` with ``whole=True``), within the given bounds.

    :param value: a number or a rendered number; booleans are refused.
    :param name: the parameter's name, for the error message.
    :param default: the value when ``value`` is empty (see :func:`is_empty`).
    :param whole: an ``int`` is wanted (``2.0`` is accepted, ``2.5`` is refused).
    :param minimum: the smallest accepted value.
    :param maximum: the largest accepted value.
    :param above: values must be strictly greater than this.
    """
    if is_empty(value):
        return default
    kind = "a whole number" if whole else "a number"
    try:
        if isinstance(value, bool):
            raise ValueError(value)
        number = float(value) if not isinstance(value, int) else value
        if isinstance(number, float) and not math.isfinite(number):
            raise ValueError(value)
        if whole:
            if isinstance(number, float) and not number.is_integer():
                raise ValueError(value)
            number = int(number)
    except (TypeError, ValueError, OverflowError):
        raise InvalidParameterError(f"{name} must be {kind}, got {value!r}") from None
    bounds = []
    if above is not None:
        bounds.append(f"above {above:g}")
    if minimum is not None:
        bounds.append(f"at least {minimum:g}")
    if maximum is not None:
        bounds.append(f"at most {maximum:g}")
    if (
        (above is not None and not number > above)
        or (minimum is not None and number < minimum)
        or (maximum is not None and number > maximum)
    ):
        raise InvalidParameterError(f"{name} must be {kind} {' and '.join(bounds)}, got {value!r}")
    return number


def _parse_literal(value: str) -> Any:
    """Parse a rendered list or dict, written as JSON or as a Python literal."""
    try:
        return json.loads(value)
    except ValueError:
        return ast.literal_eval(value)


def to_str_list(value: Any, *, name: str) -> list[str]:
    """
    Return ``value`` as a list of strings.

    :param value: ``None``, a list, a rendered list (``"['a', 'b']"``) or a comma-separated string.
    :param name: the parameter's name, for the error message.
    """
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text or text.lower() in ("none", "null"):
            return []
        if text[0] in "[(":
            try:
                value = _parse_literal(text)
            except (ValueError, SyntaxError) as err:
                raise InvalidParameterError(f"{name} is not a valid list: {value!r} ({err})") from None
        else:
            return [part.strip() for part in text.split(",") if part.strip()]
    if not isinstance(value, (list, tuple, set)):
        raise InvalidParameterError(
            f"{name} must be a list of strings, got {type(value).__name__}: {value!r}"
        )
    return [str(item).strip() for item in value if str(item).strip()]


def to_str_dict(value: Any, *, name: str) -> dict[str, str]:
    """
    Return ``value`` as a ``{str: str}`` mapping.

    :param value: ``None``, a mapping, or a rendered mapping (JSON or a Python literal).
    :param name: the parameter's name, for the error message.
    """
    return {str(k): str(v) for k, v in to_mapping(value, name=name).items()}


def to_mapping(value: Any, *, name: str) -> dict[Any, Any]:
    """
    Return ``value`` as a mapping, its values as they are (a rendered ``None`` stays ``None``).

    :param value: ``None``, a mapping, or a rendered mapping (JSON or a Python literal).
    :param name: the parameter's name, for the error message.
    """
    if value is None:
        return {}
    if isinstance(value, str):
        text = value.strip()
        if not text or text.lower() in ("none", "null"):
            return {}
        try:
            value = _parse_literal(text)
        except (ValueError, SyntaxError) as err:
            raise InvalidParameterError(f"{name} is not a valid mapping: {value!r} ({err})") from None
    if not isinstance(value, Mapping):
        raise InvalidParameterError(f"{name} must be a mapping of Looker field → trait key, got {value!r}")
    return dict(value)


def to_optional_str(value: Any) -> str | None:
    """Return ``value`` stripped, or ``None`` when it is empty or renders as ``None``."""
    if value is None:
        return None
    text = str(value).strip()
    return None if not text or text.lower() in ("none", "null") else text
