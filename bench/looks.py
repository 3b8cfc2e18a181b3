"""The Look definition the benchmark's children give :class:`LookStream` for a stored result body."""

from __future__ import annotations

from airflow_provider_looker_segment.models import LookInfo


def look_info(look_id: str) -> LookInfo:
    """The Look's definition as LookStream needs it (a generated Look: no hidden fields, no pivots)."""
    return LookInfo(
        id=look_id,
        title="",
        model=None,
        view=None,
        fields=(),
        limit=None,
        pivots=(),
        hidden_fields=(),
        deleted=False,
    )
