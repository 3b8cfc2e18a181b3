"""
Pure transformation of Look rows into Segment ``identify``, ``group`` or ``track`` messages (no I/O, no
Airflow, no logging), in two steps so that the per-row work is as small as possible:
:func:`plan_transform` reads the Look's fields once (the rules: :mod:`.field_roles`), and
:func:`make_row_transformer` turns the plan into the function called once per row (values: :mod:`.values`).
What the messages hold (identifiers, traits, messageId, timestamp): docs/rows-to-calls.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from airflow_provider_looker_segment import PACKAGE_NAME, __version__
from airflow_provider_looker_segment.batching import EncodedMessage
from airflow_provider_looker_segment.exceptions import TransformConfigError
from airflow_provider_looker_segment.field_roles import (
    ANONYMOUS_ID,
    EMAIL,
    GROUP_ID,
    USER_ID,
    VALUES_KEY,
    IdentifierChoice,
    TraitSpec,
    choose_identifiers,
    field_list,
    overwrite_note,
    plan_traits,
    trait_keys,
)
from airflow_provider_looker_segment.models import LookResultMeta, Row
from airflow_provider_looker_segment.settings import SyncOptions
from airflow_provider_looker_segment.values import (
    anonymous_id_from_email,
    anonymous_id_from_group,
    format_timestamp,
    json_safe,
    to_identifier,
)

#: Invalid-row reason: the row has no userId, no anonymousId and no usable email.
INVALID_NO_IDENTIFIER = "no_identifier"
#: Invalid-row reason (group calls): the row has no group id.
INVALID_NO_GROUP_ID = "no_group_id"
#: Invalid-row reason (group calls with ``group_without_user="skip"``): the row has no user identifier.
INVALID_NO_USER_FOR_GROUP = "no_user_for_group"

#: Prefix of every messageId made here.
MESSAGE_ID_PREFIX = "lsg-"

#: A row transformer: row → ``(message, None)`` or ``(None, invalid reason)``.
RowTransformer = Callable[[Row], tuple[dict[str, Any] | None, str | None]]


# ------------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class TransformPlan:
    """
    How every row of one Look becomes a Segment message (built by :func:`plan_transform`).

    :param look_id: the Look.
    :param user_id: field giving ``userId``, or ``None``.
    :param email: field giving the email (``traits.email`` and derived anonymousIds), or ``None``.
    :param anonymous_id: field giving ``anonymousId``, or ``None``.
    :param specs: the trait sources in field order (internal, used by :func:`make_row_transformer`).
    :param warnings: things worth a warning (reserved traits reached by another column, keys differing only by
        case, no trait at all).
    :param group_id: field giving ``groupId`` (group calls), or ``None``.
    :param options: the sync's options (``call``, ``event``, ``membership_trait``, ``group_without_user``...).
    """

    look_id: str
    user_id: IdentifierChoice | None
    email: IdentifierChoice | None
    anonymous_id: IdentifierChoice | None
    specs: tuple[TraitSpec, ...]
    warnings: list[str] = field(default_factory=list)
    group_id: IdentifierChoice | None = None
    options: SyncOptions = field(default_factory=SyncOptions)

    @property
    def call(self) -> str:
        """``"identify"``, ``"group"`` or ``"track"``."""
        return self.options.call

    @property
    def event(self) -> str | None:
        """The event name of track calls, or ``None``."""
        return self.options.event

    @property
    def membership_trait(self) -> str | None:
        """The trait set to ``True`` on every message, or ``None``."""
        return self.options.membership_trait

    @property
    def group_without_user(self) -> str:
        """``"anonymous_id"`` or ``"skip"`` (group calls of rows without a user identifier)."""
        return self.options.group_without_user

    @property
    def values_key(self) -> str:
        """Where the columns go: ``"traits"`` (identify, group) or ``"properties"`` (track)."""
        return VALUES_KEY[self.call]

    @property
    def identifiers(self) -> dict[str, dict[str, str] | None]:
        """
        JSON-serialisable identifier choices: ``{"userId": {"field", "how"} | None, "email": ...,
        "anonymousId": ...}`` (and ``"groupId"`` for group calls); ``anonymousId`` reads ``derived from
        email, for rows without a userId`` when there is no anonymousId field: rows with neither a userId nor
        an anonymousId get one from the email (for group calls, else from the group id).
        """
        anonymous = self.anonymous_id
        if anonymous is None and self.email is not None:
            anonymous = IdentifierChoice(self.email.field, "derived from email, for rows without a userId")
        elif anonymous is None and self.group_id is not None and self.group_without_user == "anonymous_id":
            anonymous = IdentifierChoice(
                self.group_id.field, "derived from the group id, for rows without a user identifier"
            )
        found = {
            "userId": self.user_id.to_dict() if self.user_id else None,
            "email": self.email.to_dict() if self.email else None,
            "anonymousId": anonymous.to_dict() if anonymous else None,
        }
        if self.call == "group":
            found["groupId"] = self.group_id.to_dict() if self.group_id else None
        return found

    @property
    def traits(self) -> dict[str, str | list[str]]:
        """Field → trait key, in field order; a pivoted field maps to the list of its per-pivot keys."""
        return {
            name: key if pivots is None else [trait_key for _pivot_key, trait_key in pivots]
            for name, key, pivots, _plain, _convert in self.specs
        }

    @property
    def trait_keys(self) -> tuple[str, ...]:
        """Every trait key a message can carry, in order (membership trait last)."""
        keys = trait_keys(self.specs)
        if self.membership_trait:
            keys.append(self.membership_trait)
        return tuple(keys)

    @property
    def overwrite_note(self) -> str | None:
        """What each identify or group call overwrites in downstream tools, for the plan's log line."""
        return overwrite_note(self.trait_keys, self.call)

    @property
    def has_user_id(self) -> bool:
        """The Look has a userId field."""
        return self.user_id is not None

    @property
    def has_email(self) -> bool:
        """Messages carry ``traits.email`` (an email field that is not excluded; never for track calls)."""
        return self.email is not None and "email" in self.trait_keys and self.values_key == "traits"

    @property
    def has_anonymous_id(self) -> bool:
        """Rows can get an anonymousId: from an anonymousId field, derived from the email or the group id."""
        from_group = self.group_id is not None and self.group_without_user == "anonymous_id"
        return self.anonymous_id is not None or self.email is not None or from_group

    @property
    def has_group_id(self) -> bool:
        """Messages carry a ``groupId`` (group calls)."""
        return self.group_id is not None


def plan_transform(meta: LookResultMeta, options: SyncOptions | None = None) -> TransformPlan:
    """
    Decide, from the Look's fields, how each row becomes a Segment message.

    The rules: :mod:`.field_roles` and docs/rows-to-calls.md, "Identifiers" and "Trait keys".

    :param meta: the Look's result metadata (fields and pivots).
    :param options: the user's choices; defaults to :class:`~.settings.SyncOptions` ``()``.
    :return: the plan; its ``warnings`` are meant for the task log.
    :raises TransformConfigError: unknown fields in the options, two fields for one identifier, no
        identifier at all, or two columns giving the same trait key.
    """
    options = options or SyncOptions()
    _check_fields_exist(meta, options)
    choices = choose_identifiers(meta, options)
    specs, warnings = plan_traits(meta, options, choices)
    return TransformPlan(
        look_id=str(meta.look_id),
        user_id=choices[USER_ID],
        email=choices[EMAIL],
        anonymous_id=choices[ANONYMOUS_ID],
        specs=specs,
        warnings=warnings,
        group_id=choices.get(GROUP_ID),
        options=options,
    )


def _check_fields_exist(meta: LookResultMeta, options: SyncOptions) -> None:
    """Every field named in the options must be a column of the Look (catches typos early)."""
    known = {f.name for f in meta.fields}
    unknown = [
        f"{name} ({option})"
        for option, names in (
            ("user_id_field", [options.user_id_field]),
            ("email_field", [options.email_field]),
            ("anonymous_id_field", [options.anonymous_id_field]),
            ("group_id_field", [options.group_id_field]),
            ("trait_names", list(options.trait_names)),
            ("exclude_fields", list(options.exclude_fields)),
        )
        for name in names
        if name is not None and name not in known
    ]
    if unknown:
        raise TransformConfigError(
            f"{meta.source_label} has no field {'; '.join(unknown)}. The Look's fields: {field_list(meta)}"
        )


# ----------------------------------------------------------------------------------------------- messages


def build_message_id_namespace(
    *, dag_id: str, task_id: str, run_id: str, map_index: int | None, look_id: str | int
) -> str:
    """
    Join what makes a task run unique into the namespace of its messageIds (unambiguously: a JSON array).

    :param dag_id: the DAG id.
    :param task_id: the task id.
    :param run_id: the DAG run id (a new run gives new messageIds; a retry of the same run the same ones).
    :param map_index: the mapped task's index (``-1`` or ``None`` when not mapped).
    :param look_id: the Look.
    """
    map_index = -1 if map_index is None else map_index
    return orjson.dumps([dag_id, task_id, run_id, map_index, str(look_id)]).decode()


def is_group_without_user(message: Mapping[str, Any]) -> bool:
    """Whether a message is a group call whose only identity is the anonymousId derived from its group id."""
    group_id = message.get("groupId")
    return (
        message.get("type") == "group"
        and "userId" not in message
        and isinstance(group_id, str)
        and message.get("anonymousId") == anonymous_id_from_group(group_id)
    )


def _dump_head(message: dict[str, Any]) -> bytes:
    """
    Compact JSON of a message's identity and traits (the start of its encoding); values orjson refuses
    (e.g. a lone surrogate in a string) are fixed in place first (rare path).
    """
    try:
        return orjson.dumps(message)
    except orjson.JSONEncodeError:
        traits = message["traits"] if "traits" in message else message["properties"]
        for key, value in traits.items():
            traits[key] = json_safe(value)
        for key in ("groupId", "userId", "anonymousId"):
            if key in message:
                message[key] = json_safe(message[key])
        return orjson.dumps(message)


def _fill_pivots(
    traits: dict[str, Any],
    cell: Any,
    pivots: tuple[tuple[str, str], ...],
    plain: frozenset,
    convert: Callable[[Any], Any],
) -> None:
    """One trait per pivot value; a missing, null or non-object cell gives null traits."""
    if cell.__class__ is not dict:
        for _pivot_key, trait_key in pivots:
            traits[trait_key] = None
        return
    get = cell.get
    for pivot_key, trait_key in pivots:
        value = get(pivot_key)
        traits[trait_key] = value if value.__class__ in plain else convert(value)


def make_row_transformer(
    plan: TransformPlan,
    *,
    ran_at: datetime | None,
    message_id_namespace: str,
    library: Mapping[str, Any] | None = None,
    derive_alias: bool = False,
    defer_message_id: bool = False,
) -> RowTransformer:
    """
    Build the per-row function of a plan: row → ``(message, None)`` or ``(None, invalid reason)``.

    Messages have the keys ``type``, ``event`` (track), ``groupId`` (group), ``userId``/``anonymousId``,
    ``traits`` (``properties`` for track; in field order), ``timestamp``, ``context`` and ``messageId``, in
    that order. The ``context.library`` dict is shared by all messages:
    treat messages as read-only.

    :param plan: the plan from :func:`plan_transform`.
    :param ran_at: when Looker ran the query (the messages' ``timestamp``); ``None``: no timestamp.
    :param message_id_namespace: what makes this task run unique (see :func:`build_message_id_namespace`).
    :param library: ``context.library``; defaults to this package's name and version.
    :param derive_alias: set ``message.alias`` on messages with a userId to the anonymousId derived from the
        row's email (a changed-only run finds by it a member that the state knew by that anonymousId).
    :param defer_message_id: leave the messageId, timestamp and context out: ``message.encoded`` is then
        only the identity and traits (the *head*), completed by :func:`complete_encoding` for the rows that
        are sent (a changed-only run spools every row, and sends few).
    :return: the transformer; its ``tail`` attribute holds the bytes every encoding carries between the
        traits and the messageId's 32 hex digits (the run's timestamp and context), its ``hasher`` the
        messageId's hash of the run's namespace.
    """
    if not isinstance(message_id_namespace, str) or not message_id_namespace:
        raise TransformConfigError("message_id_namespace must be a non-empty string")
    library = dict(library) if library is not None else {"name": PACKAGE_NAME, "version": __version__}
    timestamp = format_timestamp(ran_at) if ran_at is not None else None
    hasher = hashlib.blake2b(message_id_namespace.encode() + b"\x1e", digest_size=16)
    uid_field = plan.user_id.field if plan.user_id else None
    anon_field = plan.anonymous_id.field if plan.anonymous_id else None
    email_field = plan.email.field if plan.email else None
    group_field = plan.group_id.field if plan.group_id else None
    call, event, values_key = plan.call, plan.event, plan.values_key
    skip_without_user = plan.group_without_user == "skip"
    specs, membership = plan.specs, plan.membership_trait
    # Without pivots (the usual Look), each trait is one lookup: the loop skips the pivot test.
    flat = (
        None
        if any(spec.pivots is not None for spec in specs)
        else tuple((spec.name, spec.key, spec.plain, spec.convert) for spec in specs)
    )
    identifier, from_email, from_group = to_identifier, anonymous_id_from_email, anonymous_id_from_group
    fill_pivots, new_message, dumps, encode_error = (
        _fill_pivots,
        EncodedMessage,
        orjson.dumps,
        orjson.JSONEncodeError,
    )
    context = {"library": library}
    # What follows the traits in every message of the run, encoded once: timestamp, context, messageId key
    # and the messageId's prefix.
    tail_fields: dict[str, Any] = {"timestamp": timestamp} if timestamp is not None else {}
    tail_fields["context"] = context
    tail = b"," + orjson.dumps(tail_fields)[1:-1] + b',"messageId":"' + MESSAGE_ID_PREFIX.encode()

    def transform(row: Row) -> tuple[dict[str, Any] | None, str | None]:
        get = row.get
        group_id = None
        if group_field is not None:
            group_id = identifier(get(group_field))
            if group_id is None:
                return None, INVALID_NO_GROUP_ID
        user_id = anonymous_id = None
        if uid_field is not None:
            value = get(uid_field)
            user_id = (value.strip() or None) if value.__class__ is str else identifier(value)
        if anon_field is not None:
            anonymous_id = identifier(get(anon_field))
        alias = None
        if user_id is None and anonymous_id is None:
            anonymous_id = from_email(get(email_field)) if email_field else None
            if anonymous_id is None:
                if group_id is None:
                    return None, INVALID_NO_IDENTIFIER
                if skip_without_user:
                    return None, INVALID_NO_USER_FOR_GROUP
                anonymous_id = from_group(group_id)
        elif derive_alias and user_id is not None and anonymous_id is None and email_field is not None:
            alias = from_email(get(email_field))
        traits: dict[str, Any] = {}
        if flat is not None:
            for name, key, plain, convert in flat:
                value = get(name)
                traits[key] = value if value.__class__ in plain else convert(value)
        else:
            for name, key, pivots, plain, convert in specs:
                value = get(name)
                if pivots is None:
                    traits[key] = value if value.__class__ in plain else convert(value)
                else:
                    fill_pivots(traits, value, pivots, plain, convert)
        if membership:
            traits[membership] = True
        message = new_message()
        message["type"] = call
        if event is not None:
            message["event"] = event
        if group_id is not None:
            message["groupId"] = group_id
        if user_id is not None:
            message["userId"] = user_id
        if anonymous_id is not None:
            message["anonymousId"] = anonymous_id
        message[values_key] = traits
        # One encoding per message: its head (identity and traits) is both hashed into the messageId and
        # sent, followed by the run's constant fields and the messageId.
        try:
            head = dumps(message)
        except encode_error:
            head = _dump_head(message)
        if defer_message_id:
            message.encoded = head
            if alias is not None:
                message.alias = alias
            return message, None
        digest = hasher.copy()
        digest.update(head)
        hex_id = digest.hexdigest()
        if timestamp is not None:
            message["timestamp"] = timestamp
        message["context"] = context
        message["messageId"] = MESSAGE_ID_PREFIX + hex_id
        message.encoded = head[:-1] + tail + hex_id.encode() + b'"}'
        if alias is not None:
            message.alias = alias
        return message, None

    transform.tail = tail  # type: ignore[attr-defined]
    transform.hasher = hasher  # type: ignore[attr-defined]
    return transform


def complete_encoding(head: bytes, tail: bytes, hasher: Any) -> bytes:
    """
    The encoding of a message whose messageId was deferred (``defer_message_id``): its head, the run's tail
    and the messageId of the head, exactly as the transform would have made it.
    """
    digest = hasher.copy()
    digest.update(head)
    return head[:-1] + tail + digest.hexdigest().encode() + b'"}'
