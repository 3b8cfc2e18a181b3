"""
Coercion of rendered template values into the types the operator needs.

Jinja renders to strings unless the DAG sets ``render_template_as_native_obj=True``; these helpers accept
both forms (``"false"`` and ``False``, ``"['hubspot']"`` and ``["hubspot"]``) and say clearly what was wrong.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping
from typing import Any

from airflow_provider_looker_segment.exceptions import InvalidParameterError

_TRUE = {"true", "1", "yes", "on", "y", "t"}
_FALSE = {"false", "0", "no", "off", "n", "f", "", "none", "null"}


def to_bool(value: Any, *, name: str) -> bool:
    """
    Return ``value`` as a boolean.

    :param value: a bool, or a rendered string such as ``"True"`` or ``"false"``.
    :param name: the parameter's name, for the error message.
    """
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidParameterError(f"{name} must be true or false, got {value!r}")


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
    return {str(k): str(v) for k, v in value.items()}


def to_optional_int(value: Any, *, name: str) -> int | None:
    """
    Return ``value`` as an int, or ``None`` when it is empty.

    :param value: an int, a rendered number, or ``None`` / ``""``.
    :param name: the parameter's name, for the error message.
    """
    if isinstance(value, bool):
        raise InvalidParameterError(f"{name} must be a whole number, got {value!r}")
    if value is None:
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if not text or text.lower() in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        raise InvalidParameterError(f"{name} must be a whole number, got {value!r}") from None


def to_optional_str(value: Any) -> str | None:
    """Return ``value`` stripped, or ``None`` when it is empty or renders as ``None``."""
    if value is None:
        return None
    text = str(value).strip()
    return None if not text or text.lower() in ("none", "null") else text
