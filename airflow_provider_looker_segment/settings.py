"""
The one parameter model: the operator's (rendered) arguments, coerced and checked once into
:class:`SyncOptions`, which every layer reads (the transform, the pipeline, the state). The reference of each
parameter: docs/parameters.md.

Every problem is an :class:`~airflow_provider_looker_segment.exceptions.InvalidParameterError` naming the
parameter and the fix, raised before Looker is read or anything is sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from airflow_provider_looker_segment.batching import MAX_EVENT_BYTES
from airflow_provider_looker_segment.exceptions import InvalidParameterError
from airflow_provider_looker_segment.look_filters import normalise_filters
from airflow_provider_looker_segment.params import (
    to_bool,
    to_mapping,
    to_number,
    to_optional_str,
    to_str_dict,
    to_str_list,
)
from airflow_provider_looker_segment.sources import LOOK, QUERY, LookerSource

#: Values of ``sync_mode``.
SYNC_ALL = "all"
SYNC_CHANGED = "changed"
SYNC_MODES = (SYNC_ALL, SYNC_CHANGED)
#: The Segment calls a Look's rows can become (``call``).
CALLS = ("identify", "group", "track")
#: Ways of turning a field into a trait key (``trait_key_style``): short label lower-cased, snake case or the
#: Looker field name.
TRAIT_KEY_STYLES = ("label", "snake", "field")
#: What a group call of a row without a user identifier does (``group_without_user``).
GROUP_WITHOUT_USER = ("anonymous_id", "skip")
#: The largest row limit Looker's API takes (a 64-bit integer).
MAX_LIMIT = 2**63 - 1
#: Bytes of a track call besides its event name: type, identity, timestamp, context, a 53-character
#: messageId (a generous bound: an event name that leaves less room than this fits in no event).
TRACK_CALL_BYTES = 400


@dataclass(frozen=True)
class SyncOptions:
    """
    What one sync does, read from the operator's (rendered) arguments by :meth:`from_arguments`: its fields
    are the operator's templated parameters, of the same names and meanings (docs/parameters.md).

    Exactly one of ``look_id``, ``query_id`` and ``query_slug`` is set by :meth:`from_arguments` (a query
    given by slug gets its ``query_id`` too once Looker resolved it). Built directly (tests, the benchmark),
    the values are trusted as they are.
    """

    look_id: str | None = None
    user_id_field: str | None = None
    email_field: str | None = None
    anonymous_id_field: str | None = None
    trait_names: dict[str, str] = field(default_factory=dict)
    trait_key_style: str = "label"
    exclude_fields: tuple[str, ...] = ()
    destinations: tuple[str, ...] = ()
    dry_run: bool = False
    limit: int = -1
    max_invalid_rows: int | None = None
    sync_mode: str = SYNC_ALL
    full_refresh: bool = False
    membership_trait: str | None = None
    max_exit_ratio: float = 0.5
    call: str = "identify"
    group_id_field: str | None = None
    event: str | None = None
    entered_event: str | None = None
    exited_event: str | None = None
    filters: dict[str, str] = field(default_factory=dict)
    group_without_user: str = "anonymous_id"
    query_id: str | None = None
    query_slug: str | None = None
    #: Checked when the state is opened (:mod:`.state_location`): only changed-only syncs read them.
    state_path: Any = None
    state_key: str | None = None

    @classmethod
    def from_arguments(cls, **arguments: Any) -> SyncOptions:
        """
        Coerce rendered arguments (strings or native values) and check them.

        :raises InvalidParameterError: a value cannot be used; the message names the parameter.
        """
        source = LookerSource.from_arguments(
            arguments.get("look_id"), arguments.get("query_id"), arguments.get("query_slug")
        )
        style = to_optional_str(arguments.get("trait_key_style")) or "label"
        if style not in TRAIT_KEY_STYLES:
            raise InvalidParameterError(
                f"trait_key_style must be one of {', '.join(TRAIT_KEY_STYLES)}, "
                f"got {arguments.get('trait_key_style')!r}"
            )
        limit = to_number(arguments.get("limit"), name="limit", whole=True)
        if limit is not None and limit < -1:
            raise InvalidParameterError(f"limit must be -1 (all rows) or a positive number, got {limit}")
        if limit is not None and limit > MAX_LIMIT:
            raise InvalidParameterError(
                f"limit must be at most {MAX_LIMIT:,} (Looker's largest row limit), got {limit:,}: "
                "use -1 for all rows"
            )
        sync_mode = to_optional_str(arguments.get("sync_mode")) or SYNC_ALL
        if sync_mode not in SYNC_MODES:
            raise InvalidParameterError(
                f"sync_mode must be one of {', '.join(SYNC_MODES)}, got {arguments.get('sync_mode')!r}"
            )
        call = to_optional_str(arguments.get("call")) or "identify"
        if call not in CALLS:
            raise InvalidParameterError(
                f"call must be one of {', '.join(CALLS)}, got {arguments.get('call')!r}"
            )
        event = _event_name("event", arguments.get("event"))
        if call == "track" and event is None:
            raise InvalidParameterError(
                "call='track' needs event, the name of the track event (e.g. 'Joined VIP cohort'): set event"
            )
        if call != "track" and event is not None:
            raise InvalidParameterError(
                f"event ({event!r}) names the event of track calls: set call='track', or leave event empty"
            )
        group_id_field = to_optional_str(arguments.get("group_id_field"))
        if call != "group" and group_id_field is not None:
            raise InvalidParameterError(
                f"group_id_field ({group_id_field!r}) gives the groupId of group calls: set call='group', "
                "or leave group_id_field empty"
            )
        without_user = to_optional_str(arguments.get("group_without_user")) or "anonymous_id"
        if without_user not in GROUP_WITHOUT_USER:
            raise InvalidParameterError(
                f"group_without_user must be one of {', '.join(GROUP_WITHOUT_USER)} (what a group call of a "
                "row without a user identifier does: send it with the anonymousId derived from the group id, "
                f"or skip the row), got {arguments.get('group_without_user')!r}"
            )
        if call != "group" and without_user != "anonymous_id":
            raise InvalidParameterError(
                f"group_without_user ({without_user!r}) applies to group calls: set call='group', or leave "
                "group_without_user at its default"
            )
        cohort_events = {}
        for name in ("entered_event", "exited_event"):
            cohort_events[name] = _event_name(name, arguments.get(name))
            if cohort_events[name] is not None and sync_mode != SYNC_CHANGED:
                raise InvalidParameterError(
                    f"{name} ({cohort_events[name]!r}) needs sync_mode='changed': entries and exits are "
                    "found by comparing with the last delivered run. Set sync_mode='changed' or leave "
                    f"{name} empty"
                )
        ratio = arguments.get("max_exit_ratio")
        try:
            max_exit_ratio = to_number(ratio, name="max_exit_ratio", default=0.5, minimum=0, maximum=1)
        except InvalidParameterError:
            raise InvalidParameterError(
                f"max_exit_ratio must be a number from 0 to 1, got {ratio!r}"
            ) from None
        return cls(
            look_id=source.id if source.is_look else None,
            query_id=None if source.is_look else source.id,
            query_slug=source.slug,
            user_id_field=to_optional_str(arguments.get("user_id_field")),
            email_field=to_optional_str(arguments.get("email_field")),
            anonymous_id_field=to_optional_str(arguments.get("anonymous_id_field")),
            trait_names=_trait_names(arguments.get("trait_names")),
            trait_key_style=style,
            exclude_fields=tuple(
                dict.fromkeys(to_str_list(arguments.get("exclude_fields"), name="exclude_fields"))
            ),
            destinations=tuple(to_str_list(arguments.get("destinations"), name="destinations")),
            dry_run=to_bool(arguments.get("dry_run"), name="dry_run"),
            limit=-1 if not limit else limit,
            max_invalid_rows=to_number(
                arguments.get("max_invalid_rows"), name="max_invalid_rows", whole=True, minimum=0
            ),
            sync_mode=sync_mode,
            full_refresh=to_bool(arguments.get("full_refresh"), name="full_refresh"),
            membership_trait=to_optional_str(arguments.get("membership_trait")),
            max_exit_ratio=float(max_exit_ratio),
            call=call,
            group_id_field=group_id_field,
            filters=parse_filters(arguments.get("filters")),
            event=event,
            group_without_user=without_user,
            state_path=arguments.get("state_path"),
            state_key=to_optional_str(arguments.get("state_key")),
            **cohort_events,
        )

    @property
    def source(self) -> LookerSource:
        """The Look or query this sync reads."""
        if self.look_id is not None:
            return LookerSource(LOOK, self.look_id)
        return LookerSource(QUERY, self.query_id, self.query_slug)

    @property
    def label(self) -> str:
        """How logs and messages name the source: ``Look 42``, ``Query 123``."""
        return self.source.label

    @property
    def changed_only(self) -> bool:
        """Whether this sync keeps state and sends only what changed."""
        return self.sync_mode == SYNC_CHANGED


def parse_filters(value: Any) -> dict[str, str]:
    """
    ``filters``: Looker field → filter expression, checked by
    :func:`~airflow_provider_looker_segment.look_filters.normalise_filters` (the expressions are Looker's to
    judge: ``NULL``, ``-NULL``, ``EMPTY``... pass as they are).
    """
    try:
        filters = to_mapping(value, name="filters")
    except InvalidParameterError as error:
        raise InvalidParameterError(
            f"{error}. filters must map Looker field names to Looker filter expressions, e.g. "
            '{"users.created_date": "2026-11-28"}'
        ) from None
    return normalise_filters(filters)


def _trait_names(value: Any) -> dict[str, str]:
    """``trait_names``: Looker field name → non-empty trait key, both stripped."""
    names = {}
    for name, key in to_str_dict(value, name="trait_names").items():
        if not name.strip():
            raise InvalidParameterError(f"trait_names keys must be Looker field names, got {name!r}")
        if not key.strip():
            raise InvalidParameterError(f"trait_names[{name!r}] must be a non-empty trait key, got {key!r}")
        names[name.strip()] = key.strip()
    return names


def _event_name(name: str, value: Any) -> str | None:
    """
    A track event name (``event``, ``entered_event``, ``exited_event``), or ``None`` when not given; refused
    when it leaves no room for the rest of a call in Segment's 32 KB per event (every call would be rejected).
    """
    event = to_optional_str(value)
    if event is None:
        return None
    size = len(orjson.dumps(event))
    if size + TRACK_CALL_BYTES > MAX_EVENT_BYTES:
        raise InvalidParameterError(
            f"{name} is {len(event):,} characters ({size:,} bytes encoded): a track call carrying it cannot "
            f"fit in Segment's limit of {MAX_EVENT_BYTES:,} bytes per event, so Segment would reject every "
            f"call. Use a short event name (at most {MAX_EVENT_BYTES - TRACK_CALL_BYTES - 2:,} bytes); "
            f"it starts with {event[:40]!r}"
        )
    return event
