"""
What a sync reads from Looker: a saved Look (``look_id``) or any Looker query (``query_id``, or the
``query_slug`` of an Explore URL's ``qid``). Exactly one of them is given; no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from airflow_provider_looker_segment.exceptions import InvalidParameterError
from airflow_provider_looker_segment.params import to_optional_str

__all__ = ["LOOK", "QUERY", "SOURCE_PARAMETERS", "LookerSource"]

#: The kinds of source.
LOOK = "look"
QUERY = "query"
#: The operator's parameters that name the source; exactly one is given.
SOURCE_PARAMETERS = ("look_id", "query_id", "query_slug")


@dataclass(frozen=True)
class LookerSource:
    """
    The Looker source of a sync.

    :param kind: :data:`LOOK` or :data:`QUERY`.
    :param id: the Look id, or the query id (``None`` for a query given by slug until Looker resolved it).
    :param slug: the query's slug, when the query was given by it (or once Looker told it).
    """

    kind: str
    id: str | None
    slug: str | None = None

    @classmethod
    def from_arguments(
        cls, look_id: Any = None, query_id: Any = None, query_slug: Any = None
    ) -> LookerSource:
        """
        Read the (rendered) source parameters: exactly one of ``look_id``, ``query_id``, ``query_slug``.

        :raises InvalidParameterError: none or several of them are given; the message names them.
        """
        given = {
            name: text
            for name, value in zip(SOURCE_PARAMETERS, (look_id, query_id, query_slug), strict=True)
            if (text := to_optional_str(value)) is not None
        }
        if len(given) != 1:
            found = (
                "none was given"
                if not given
                else "got " + " and ".join(f"{name}={value!r}" for name, value in given.items())
            )
            raise InvalidParameterError(
                "Give exactly one of look_id (a saved Look, as in /looks/42), query_id (a Looker query "
                "id) or query_slug (the qid of an Explore URL, as in /explore/model/view?qid=aogBgL6o3cK): "
                f"{found}."
            )
        ((name, value),) = given.items()
        if name == "look_id":
            return cls(LOOK, value)
        if name == "query_id":
            return cls(QUERY, value)
        return cls(QUERY, None, value)

    @property
    def is_look(self) -> bool:
        """Whether the source is a saved Look."""
        return self.kind == LOOK

    @property
    def label(self) -> str:
        """How logs and messages name it: ``Look 42``, ``Query 123``, or ``Query aogBgL6o...`` (a slug)."""
        if self.is_look:
            return f"Look {self.id}"
        return f"Query {self.id}" if self.id is not None else f"Query {self.slug}"

    @property
    def key(self) -> str:
        """
        What identifies the source among a task's runs (the messageIds' namespace): the Look id as it always
        was, ``query-<id>`` (or ``query-slug-<slug>`` before Looker resolved the slug) for a query.
        """
        if self.is_look:
            return str(self.id)
        return f"query-{self.id}" if self.id is not None else f"query-slug-{self.slug}"

    def resolved(self, query_id: str, slug: str | None = None) -> LookerSource:
        """The query source once Looker named its id (and slug)."""
        return replace(self, id=str(query_id), slug=slug or self.slug)

    def summary(self) -> dict[str, Any]:
        """The summary's keys naming the source: ``source``, ``look_id``, ``query_id``, ``query_slug``."""
        return {
            "source": self.kind,
            "look_id": self.id if self.is_look else None,
            "query_id": None if self.is_look else self.id,
            "query_slug": None if self.is_look else self.slug,
        }
