"""
Pure transformation of Look rows into Segment ``identify`` messages (no I/O, no Airflow, no logging).

Two steps, so that the per-row work is as small as possible:

1. :func:`plan_transform` looks at the Look's fields once (``LookResultMeta``) and decides which field gives
   the ``userId``, the email and the ``anonymousId``, which fields become which traits and how each value is
   converted. Configuration problems raise
   :class:`~airflow_provider_looker_segment.exceptions.TransformConfigError` before any row is read;
   doubtful choices become :attr:`TransformPlan.warnings` for the caller to log.
2. :func:`make_row_transformer` turns the plan into a function called once per row, returning
   ``(message, None)`` or ``(None, invalid_reason)``.

Documented formats
------------------
* **Identifiers.** ``userId`` and ``anonymousId`` are strings, trimmed: ``" 42 "``, ``42`` and ``42.0`` →
  ``"42"``, ``4.5`` → ``"4.5"``, ``2**64`` → ``"18446744073709551616"`` (integral numbers exactly), a
  number beyond a float's range → its decimal text (``1e400`` → ``"1E+400"``); ``None``, ``0``, ``""``,
  blank strings, booleans, NaN/±Infinity, arrays and objects are not identifiers. The email field gives
  ``traits.email`` (its raw value, whatever the trait key style).
* **Anonymous id derived from the email.** A row without ``userId`` and ``anonymousId`` but with an email
  (a string containing ``@``) gets
  ``anonymousId = str(uuid5(ANONYMOUS_ID_NAMESPACE, email.strip().lower()))``: the same email gives the
  same id on every run, in every DAG. A row with no identifier at all is invalid
  (:data:`INVALID_NO_IDENTIFIER`).
* **Trait values.** Strings, integers, floats and booleans are kept (``0``, ``false`` and ``""``
  round-trip); ``null`` stays ``null``; NaN and ±Infinity become ``null``; ``Decimal`` (how JSON numbers
  with a fraction or an exponent are read) becomes a float, or its decimal text beyond a float's range
  (``1E+400``); integers outside the 64-bit range become strings; a lone UTF-16 surrogate in a string
  (``"\\ud800"`` in JSON) becomes U+FFFD, the replacement character (in identifiers too);
  ``date``/``datetime``/``time`` objects become ISO 8601 strings. In fields whose LookML type starts with
  ``date`` or is ``time``/``datetime``/``timestamp``, Looker's unformatted
  ``"YYYY-MM-DD HH:MM[:SS[.ffffff]]"`` strings become ISO 8601 ``"YYYY-MM-DDTHH:MM[:SS[.ffffff]]"``
  (``"2024-01-05 10"`` of a ``date_hour`` becomes ``"2024-01-05T10:00"``); no UTC offset is added because
  Looker gives these values in the query's time zone. Other strings (``"2024-01-05"``, ``"2024-01"``) are
  already ISO 8601 and are left alone.
* **Arrays and objects** (Segment supports neither) become their compact JSON text, keys in their original
  order, non-ASCII characters kept: ``["a", 1]`` → ``'["a",1]'``, ``{"k": null}`` → ``'{"k":null}'``.
* **Pivoted measures** give one trait per pivot value. The key is the measure's key joined with the pivot's
  label (its ``label``, else its dimension values joined with ``" | "``, else its key):
  ``"orders count | complete"`` for the ``label`` style, ``"orders.count | complete"`` for the ``field``
  style, and ``"orders_count__complete"`` (pivot label snake-cased, double underscore) for the ``snake``
  style. A missing or null pivot cell gives a ``null`` trait.
* **messageId** is ``"lsg-"`` + the 32-hex-digit BLAKE2b-128 digest of the namespace (see
  :func:`build_message_id_namespace`), the row's ``userId``/``anonymousId`` and the compact JSON of its
  traits: 36 characters, identical when a task instance is retried, different for the next run and for
  two rows of one identity whose traits differ (two identical rows share one id, and Segment keeps one).
* **timestamp** is the time Looker ran the query, in UTC with milliseconds: ``"2024-01-05T10:00:00.000Z"``
  (a naive ``ran_at`` is taken as UTC); omitted when unknown.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timezone
from decimal import Decimal
from typing import Any

import orjson

from airflow_provider_looker_segment import PACKAGE_NAME, __version__
from airflow_provider_looker_segment.batching import EncodedMessage
from airflow_provider_looker_segment.exceptions import TransformConfigError
from airflow_provider_looker_segment.models import LookField, LookResultMeta, PivotValue, Row

__all__ = [
    "ANONYMOUS_ID_NAMESPACE",
    "INVALID_NO_IDENTIFIER",
    "RESERVED_TRAITS",
    "TRAIT_KEY_STYLES",
    "IdentifierChoice",
    "RowTransformer",
    "TransformOptions",
    "TransformPlan",
    "anonymous_id_from_email",
    "build_message_id_namespace",
    "format_timestamp",
    "make_row_transformer",
    "plan_transform",
]

#: Ways of turning a field into a trait key: short label lower-cased (the seed's ``sessions count``),
#: snake case (``sessions_count``) or the Looker field name (``users.sessions_count``, as Looker's action).
TRAIT_KEY_STYLES = ("label", "snake", "field")

#: LookML tags that mark identifier fields (the tags of Looker's own Segment action).
TAG_USER_ID = "user_id"
TAG_EMAIL = "email"
TAG_ANONYMOUS_ID = "segment_anonymous_id"

#: Segment's reserved identify traits (https://segment.com/docs/connections/spec/identify/#traits).
RESERVED_TRAITS = tuple(
    "address age avatar birthday company createdAt description email firstName gender id lastName name "
    "phone title username website".split()
)

#: Invalid-row reason: the row has no userId, no anonymousId and no usable email.
INVALID_NO_IDENTIFIER = "no_identifier"

#: Namespace of the UUID5 anonymous ids derived from emails (``uuid5(NAMESPACE_DNS, PACKAGE_NAME)``).
#: Never change it: it would give every email-only profile a new anonymousId.
ANONYMOUS_ID_NAMESPACE = uuid.UUID("939092db-b9f9-5a57-b221-ce58a1aa342a")

_NAMESPACE_BYTES = ANONYMOUS_ID_NAMESPACE.bytes

#: Prefix of every messageId made here.
MESSAGE_ID_PREFIX = "lsg-"

#: A row transformer: row → ``(message, None)`` or ``(None, invalid reason)``.
RowTransformer = Callable[[Row], tuple[dict[str, Any] | None, str | None]]

# Identifier kinds: internal name → name in Segment's message.
_USER_ID, _EMAIL, _ANONYMOUS_ID = "user_id", "email", "anonymous_id"
_MESSAGE_NAMES = {_USER_ID: "userId", _EMAIL: "email", _ANONYMOUS_ID: "anonymousId"}
_OPTION_NAMES = {_USER_ID: "user_id_field", _EMAIL: "email_field", _ANONYMOUS_ID: "anonymous_id_field"}
_TAGS = {_USER_ID: TAG_USER_ID, _EMAIL: TAG_EMAIL, _ANONYMOUS_ID: TAG_ANONYMOUS_ID}

# Field-name endings (after the view) and normalised labels that mean an identifier.
_NAME_HINTS = {
    _USER_ID: frozenset({"user_id", "userid", "segment_user_id"}),
    _EMAIL: frozenset({"email", "email_address", "emailaddress", "e_mail"}),
    _ANONYMOUS_ID: frozenset({"anonymous_id", "anonymousid", "segment_anonymous_id", "anon_id"}),
}
_LABEL_HINTS = {
    _USER_ID: frozenset({"user id", "userid", "segment user id"}),
    _EMAIL: frozenset({"email", "email address", "e mail", "e mail address"}),
    _ANONYMOUS_ID: frozenset({"anonymous id", "anonymousid", "segment anonymous id", "anon id"}),
}
#: View-name words of views that describe people (``users.id`` is a user id, ``orders.id`` is not).
_USER_ID_VIEW_WORDS = frozenset({"user", "users"})
_PERSON_VIEW_WORDS = frozenset(
    "user users customer customers person people persons contact contacts member members profile profiles "
    "lead leads subscriber subscribers".split()
)

_NON_ALNUM = re.compile(r"[^0-9a-z]+")
_SNAKE_SPLIT = re.compile(r"\W+")
_LABEL_SEPARATORS = re.compile(r"[\s_\-]+")
_LOOKER_DATETIME = re.compile(r"(\d{4}-\d{2}-\d{2}) (\d{2})((?::\d{2}(?::\d{2}(?:\.\d+)?)?)?)")
_TIME_TYPES = frozenset({"time", "datetime", "timestamp"})

_INT64_MIN = -(2**63)
_UINT64_MAX = 2**64 - 1
_NONE_TYPE = type(None)
#: Value classes copied to a trait as they are; anything else goes through a converter.
_PLAIN = frozenset({str, int, bool, _NONE_TYPE})
#: For date/time-typed fields strings are converted too.
_PLAIN_NO_STR = frozenset({int, bool, _NONE_TYPE})

_RESERVED_BY_NORM = {_NON_ALNUM.sub("", t.lower()): t for t in RESERVED_TRAITS}


# --------------------------------------------------------------------------------------------- options


def _optional_name(option: str, value: object, what: str) -> str | None:
    """Validate an optional name option; ``None``, ``""`` and blanks (an empty template) mean unset."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TransformConfigError(f"{option} must be {what} or None, got {type(value).__name__}")
    return value.strip() or None


def _field_names(option: str, value: object) -> tuple[str, ...]:
    """Validate a list of field names (a bare string is refused: it would be read letter by letter)."""
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TransformConfigError(
            f"{option} must be a list of Looker field names such as ['users.phone'], got {value!r}"
        )
    names = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise TransformConfigError(f"{option} must contain Looker field names (strings), got {item!r}")
        names.append(item.strip())
    return tuple(dict.fromkeys(names))


def _trait_name_map(value: object) -> dict[str, str]:
    """Validate ``trait_names``: a mapping of field name → non-empty trait key."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TransformConfigError(
            f"trait_names must be a mapping of Looker field name to trait key, got {type(value).__name__}"
        )
    result = {}
    for name, key in value.items():
        if not isinstance(name, str) or not name.strip():
            raise TransformConfigError(f"trait_names keys must be Looker field names, got {name!r}")
        if not isinstance(key, str) or not key.strip():
            raise TransformConfigError(f"trait_names[{name!r}] must be a non-empty trait key, got {key!r}")
        result[name.strip()] = key.strip()
    return result


@dataclass(frozen=True)
class TransformOptions:
    """
    The user's choices for turning a Look into identify calls; values are validated and normalised.

    :param user_id_field: Looker field giving ``userId`` (overrides detection); ``None``/``""``: detect.
    :param email_field: Looker field giving ``traits.email`` (overrides detection); ``None``/``""``: detect.
    :param anonymous_id_field: Looker field giving ``anonymousId`` (overrides detection); ``None``/``""``:
        detect.
    :param trait_names: Looker field name → trait key, overriding ``trait_key_style`` for those fields. It
        may name a hidden field (which then becomes a trait); it may not rename the email field (always
        ``email``) nor name the userId/anonymousId fields (identifiers are not traits).
    :param trait_key_style: ``"label"`` (default: short label lower-cased, ``sessions count``), ``"snake"``
        (``sessions_count``) or ``"field"`` (``users.sessions_count``).
    :param exclude_fields: fields never sent as traits. Excluding the email field keeps it as an identifier
        (it still derives anonymousIds) but sends no ``traits.email``.
    :param membership_trait: when set, every message also gets ``traits[membership_trait] = True``.
    """

    user_id_field: str | None = None
    email_field: str | None = None
    anonymous_id_field: str | None = None
    trait_names: Mapping[str, str] = field(default_factory=dict)
    trait_key_style: str = "label"
    exclude_fields: tuple[str, ...] = ()
    membership_trait: str | None = None

    def __post_init__(self) -> None:
        for option in ("user_id_field", "email_field", "anonymous_id_field"):
            name = _optional_name(option, getattr(self, option), "a Looker field name such as 'users.id'")
            object.__setattr__(self, option, name)
        membership = _optional_name("membership_trait", self.membership_trait, "a trait key")
        object.__setattr__(self, "membership_trait", membership)
        object.__setattr__(self, "trait_names", _trait_name_map(self.trait_names))
        object.__setattr__(self, "exclude_fields", _field_names("exclude_fields", self.exclude_fields))
        style = self.trait_key_style
        if style not in TRAIT_KEY_STYLES:
            raise TransformConfigError(
                f"trait_key_style must be one of {', '.join(map(repr, TRAIT_KEY_STYLES))}, got {style!r}"
            )

    def explicit_field(self, kind: str) -> str | None:
        """Return the field named by the option for identifier ``kind`` (``user_id``, ``email``, ...)."""
        return getattr(self, _OPTION_NAMES[kind])


# ------------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class IdentifierChoice:
    """
    The field chosen for one identifier and why.

    :param field: the Looker field name.
    :param how: ``parameter``, ``tag user_id``/``tag email``/``tag segment_anonymous_id``, ``field name``,
        ``label`` or ``derived from email, for rows without a userId``.
    """

    field: str
    how: str

    def to_dict(self) -> dict[str, str]:
        """Return ``{"field": ..., "how": ...}``."""
        return {"field": self.field, "how": self.how}


#: One trait source, precomputed for the row loop: (field name, trait key or None for a pivoted field,
#: pivot (key, trait key) pairs or None, value classes kept as they are, converter for other values).
_TraitSpec = tuple[str, str | None, tuple[tuple[str, str], ...] | None, frozenset, Callable[[Any], Any]]


@dataclass(frozen=True)
class TransformPlan:
    """
    How every row of one Look becomes an identify message (built by :func:`plan_transform`).

    :param look_id: the Look.
    :param user_id: field giving ``userId``, or ``None``.
    :param email: field giving the email (``traits.email`` and derived anonymousIds), or ``None``.
    :param anonymous_id: field giving ``anonymousId``, or ``None``.
    :param specs: the trait sources in field order (internal, used by :func:`make_row_transformer`).
    :param membership_trait: trait set to ``True`` on every message, or ``None``.
    :param warnings: things worth a log line (reserved traits reached by another column, overwritten traits).
    """

    look_id: str
    user_id: IdentifierChoice | None
    email: IdentifierChoice | None
    anonymous_id: IdentifierChoice | None
    specs: tuple[_TraitSpec, ...]
    membership_trait: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def identifiers(self) -> dict[str, dict[str, str] | None]:
        """
        JSON-serialisable identifier choices: ``{"userId": {"field", "how"} | None, "email": ...,
        "anonymousId": ...}``; ``anonymousId`` reads ``derived from email, for rows without a userId`` when
        there is no anonymousId field: rows with neither a userId nor an anonymousId get one from the email.
        """
        anonymous = self.anonymous_id
        if anonymous is None and self.email is not None:
            anonymous = IdentifierChoice(self.email.field, "derived from email, for rows without a userId")
        return {
            "userId": self.user_id.to_dict() if self.user_id else None,
            "email": self.email.to_dict() if self.email else None,
            "anonymousId": anonymous.to_dict() if anonymous else None,
        }

    @property
    def traits(self) -> dict[str, str | list[str]]:
        """Field → trait key, in field order; a pivoted field maps to the list of its per-pivot keys."""
        return {
            name: key if pivots is None else [pair[1] for pair in pivots]
            for name, key, pivots, _plain, _convert in self.specs
        }

    @property
    def trait_keys(self) -> tuple[str, ...]:
        """Every trait key a message can carry, in order (membership trait last)."""
        keys: list[str] = []
        for _name, key, pivots, _plain, _convert in self.specs:
            keys.extend([key] if pivots is None else [pair[1] for pair in pivots])
        if self.membership_trait:
            keys.append(self.membership_trait)
        return tuple(keys)

    @property
    def has_user_id(self) -> bool:
        """The Look has a userId field."""
        return self.user_id is not None

    @property
    def has_email(self) -> bool:
        """Messages carry ``traits.email`` (an email field that is not excluded)."""
        return self.email is not None and "email" in self.trait_keys

    @property
    def has_anonymous_id(self) -> bool:
        """Rows can get an anonymousId: from an anonymousId field, or derived from the email."""
        return self.anonymous_id is not None or self.email is not None


def plan_transform(meta: LookResultMeta, options: TransformOptions | None = None) -> TransformPlan:
    """
    Decide, from the Look's fields, how each row becomes an identify message.

    Identifiers are found in this order: the explicit options; the LookML tags ``user_id``, ``email`` and
    ``segment_anonymous_id``; then field names or labels meaning a user id (``users.user_id``, ``users.id``,
    label ``User ID``), an email (``users.email``, label ``Email Address``) or an anonymous id, visible
    fields first. Traits are every other visible field (the email field included, as ``email``).

    :param meta: the Look's result metadata (fields and pivots).
    :param options: the user's choices; defaults to :class:`TransformOptions` ``()``.
    :return: the plan; its ``warnings`` are meant for the task log.
    :raises TransformConfigError: unknown fields in the options, two fields for one identifier, no
        identifier at all, or two columns giving the same trait key.
    """
    options = options or TransformOptions()
    _check_fields_exist(meta, options)
    choices = _choose_identifiers(meta, options)
    if not any(choices.values()):
        raise TransformConfigError(_no_identifier_message(meta))
    pairs, explicit = _trait_pairs(meta, options, choices)
    warnings: list[str] = []
    specs = tuple(_trait_spec(f, key, meta.pivots, options.trait_key_style, warnings) for f, key in pairs)
    _check_duplicate_keys(specs, options.membership_trait)
    email_field = choices[_EMAIL].field if choices[_EMAIL] else None
    warnings.extend(_reserved_trait_warnings(pairs, explicit, email_field, options.membership_trait))
    warnings.extend(_general_warnings(specs, options.membership_trait))
    return TransformPlan(
        look_id=str(meta.look_id),
        user_id=choices[_USER_ID],
        email=choices[_EMAIL],
        anonymous_id=choices[_ANONYMOUS_ID],
        specs=specs,
        membership_trait=options.membership_trait,
        warnings=warnings,
    )


def _field_list(meta: LookResultMeta) -> str:
    return ", ".join(f.name for f in meta.fields) or "(none)"


def _check_fields_exist(meta: LookResultMeta, options: TransformOptions) -> None:
    """Every field named in the options must be a column of the Look (catches typos early)."""
    known = {f.name for f in meta.fields}
    unknown = [
        f"{name} ({option})"
        for option, names in (
            ("user_id_field", [options.user_id_field]),
            ("email_field", [options.email_field]),
            ("anonymous_id_field", [options.anonymous_id_field]),
            ("trait_names", list(options.trait_names)),
            ("exclude_fields", list(options.exclude_fields)),
        )
        for name in names
        if name is not None and name not in known
    ]
    if unknown:
        raise TransformConfigError(
            f"Look {meta.look_id} has no field {'; '.join(unknown)}. The Look's fields: {_field_list(meta)}"
        )


def _no_identifier_message(meta: LookResultMeta) -> str:
    return (
        f"Look {meta.look_id} has no identifier field: no field is tagged user_id, email or "
        "segment_anonymous_id in LookML, and none is named or labelled like a user id, an email or an "
        "anonymous id. Tag a field or set user_id_field, email_field or anonymous_id_field. "
        f"The Look's fields: {_field_list(meta)}"
    )


def _normalise_label(label: str | None) -> str:
    return _LABEL_SEPARATORS.sub(" ", label).strip().lower() if label else ""


def _split_name(name: str) -> tuple[str, str]:
    """Return ``(view, field)`` of ``view.field`` (view ``""`` for table calculations)."""
    view, _, last = name.lower().rpartition(".")
    return view, last


def _view_words(view: str) -> set[str]:
    return set(_NON_ALNUM.sub(" ", view).split())


def _hint(kind: str, f: LookField) -> str | None:
    """Return ``field name`` or ``label`` when the field's name or label means identifier ``kind``."""
    view, last = _split_name(f.name)
    if last in _NAME_HINTS[kind] or (
        kind == _USER_ID and last == "id" and _view_words(view) & _USER_ID_VIEW_WORDS
    ):
        return "field name"
    labels = {_normalise_label(f.label_short), _normalise_label(f.label)}
    return "label" if labels & _LABEL_HINTS[kind] else None


def _has_tag(f: LookField, tag: str) -> bool:
    return any(t.strip().lower() == tag for t in f.tags)


def _single(kind: str, candidates: list[LookField], how: str, look_id: str) -> IdentifierChoice | None:
    """Return the only candidate, or raise an error naming every candidate."""
    if not candidates:
        return None
    if len(candidates) > 1:
        names = " and ".join(f.name for f in candidates)
        raise TransformConfigError(
            f"Look {look_id}: {names} all qualify as the {_MESSAGE_NAMES[kind]} field ({how}). "
            f"Keep one (remove the tag, rename or remove the others) or set {_OPTION_NAMES[kind]}."
        )
    return IdentifierChoice(candidates[0].name, how)


def _by_tag(kind: str, meta: LookResultMeta, taken: set[str]) -> IdentifierChoice | None:
    tag = _TAGS[kind]
    candidates = [f for f in meta.fields if _has_tag(f, tag) and f.name not in taken]
    return _single(kind, candidates, f"tag {tag}", meta.look_id)


def _by_hint(kind: str, meta: LookResultMeta, taken: set[str]) -> IdentifierChoice | None:
    """Name/label detection; visible fields win over hidden ones, pivoted fields never qualify."""
    hints = [(f, _hint(kind, f)) for f in meta.fields if not f.pivoted and f.name not in taken]
    hints = [(f, how) for f, how in hints if how]
    visible = [(f, how) for f, how in hints if not f.hidden]
    chosen = visible or hints
    if len(chosen) > 1:
        _single(kind, [f for f, _how in chosen], "field name or label", meta.look_id)
    return IdentifierChoice(chosen[0][0].name, chosen[0][1]) if chosen else None


def _choose_identifiers(
    meta: LookResultMeta, options: TransformOptions
) -> dict[str, IdentifierChoice | None]:
    """Explicit options first, then tags, then names/labels; userId and anonymousId never share a field."""
    kinds = (_USER_ID, _EMAIL, _ANONYMOUS_ID)
    explicit = {kind: options.explicit_field(kind) for kind in kinds}
    choices = {kind: IdentifierChoice(name, "parameter") if name else None for kind, name in explicit.items()}
    counterpart = {_USER_ID: _ANONYMOUS_ID, _ANONYMOUS_ID: _USER_ID}
    for kind in kinds:
        if choices[kind] is None:
            # A field explicitly set as the userId is not the anonymousId because of a tag (and vice versa).
            other = explicit.get(counterpart.get(kind, kind)) if kind in counterpart else None
            choices[kind] = _by_tag(kind, meta, {other} if other else set())
    for kind in kinds:
        if choices[kind] is None:
            taken = {c.field for k, c in choices.items() if c and k != kind}
            choices[kind] = _by_hint(kind, meta, taken)
    _check_identifier_fields(meta, choices)
    return choices


def _check_identifier_fields(meta: LookResultMeta, choices: dict[str, IdentifierChoice | None]) -> None:
    user_id, anonymous_id = choices[_USER_ID], choices[_ANONYMOUS_ID]
    if user_id and anonymous_id and user_id.field == anonymous_id.field:
        raise TransformConfigError(
            f"Look {meta.look_id}: {user_id.field} is chosen as the userId ({user_id.how}) and as the "
            f"anonymousId ({anonymous_id.how}); an anonymous id must not become the userId. "
            "Choose different fields."
        )
    for kind, choice in choices.items():
        look_field = meta.field_by_name(choice.field) if choice else None
        if look_field is not None and look_field.pivoted:
            raise TransformConfigError(
                f"Look {meta.look_id}: {look_field.name} is a pivoted measure and cannot be the "
                f"{_MESSAGE_NAMES[kind]} field ({choice.how})."
            )


def _trait_pairs(
    meta: LookResultMeta, options: TransformOptions, choices: dict[str, IdentifierChoice | None]
) -> tuple[list[tuple[LookField, str]], set[str]]:
    """Return ``[(field, base trait key)]`` in field order and the fields whose key the user chose."""
    email = choices[_EMAIL].field if choices[_EMAIL] else None
    identifiers = {c.field: kind for kind, c in choices.items() if c and kind != _EMAIL}
    for name in options.trait_names:
        if name in identifiers and name != email:
            raise TransformConfigError(
                f"trait_names names {name}, the {_MESSAGE_NAMES[identifiers[name]]} field; identifier "
                "fields are not traits. Remove it from trait_names."
            )
        if name == email and options.trait_names[name] != "email":
            raise TransformConfigError(
                f"trait_names renames {name}, the email field, which always becomes traits.email. "
                "Remove it from trait_names (or exclude it with exclude_fields)."
            )
    excluded = set(options.exclude_fields)
    pairs = []
    for f in meta.fields:
        if f.name in excluded or (f.name in identifiers and f.name != email):
            continue
        if f.hidden and f.name not in options.trait_names and f.name != email:
            continue
        if f.name == email:
            key = "email"
        else:
            key = options.trait_names.get(f.name) or _style_key(f, options.trait_key_style)
        pairs.append((f, key))
    return pairs, set(options.trait_names)


def _snake(text: str) -> str:
    return _SNAKE_SPLIT.sub("_", text.lower()).strip("_")


def _style_key(f: LookField, style: str) -> str:
    """The trait key of field ``f`` in ``style``; falls back to the name's last part when labels are empty."""
    if style == "field":
        return f.name
    fallback = f.name.rpartition(".")[2]
    label = " ".join((f.label_short or f.label or "").split())
    if style == "snake":
        return _snake(label) or _snake(fallback) or f.name
    return label.lower() or " ".join(fallback.replace("_", " ").split()).lower() or f.name


def _pivot_label(pivot: PivotValue) -> str:
    label = pivot.label or " | ".join("" if v is None else str(v) for v in pivot.data.values())
    return " ".join(label.split()) or pivot.key


def _pivot_key(base: str, pivot: PivotValue, style: str) -> str:
    label = _pivot_label(pivot)
    if style == "snake":
        return f"{base}__{_snake(label) or _snake(pivot.key) or 'null'}"
    return f"{base} | {label}"


def _is_time_field(f: LookField) -> bool:
    kind = (f.type or "").lower()
    return kind.startswith("date") or kind in _TIME_TYPES


def _trait_spec(
    f: LookField, key: str, pivots: tuple[PivotValue, ...], style: str, warnings: list[str]
) -> _TraitSpec:
    """Precompute the row-loop entry of one field."""
    is_time = _is_time_field(f)
    plain = _PLAIN_NO_STR if is_time else _PLAIN
    convert = _to_time_trait_value if is_time else to_trait_value
    if not f.pivoted:
        return (f.name, key, None, plain, convert)
    if not pivots:
        warnings.append(f"{f.name} is pivoted but the Look has no pivot values: it gives no trait.")
    pairs = tuple((p.key, _pivot_key(key, p, style)) for p in pivots)
    return (f.name, None, pairs, plain, convert)


def _check_duplicate_keys(specs: tuple[_TraitSpec, ...], membership_trait: str | None) -> None:
    """Two sources of one trait key would silently overwrite each other: refuse."""
    sources: dict[str, list[str]] = {}
    for name, key, pivots, _plain, _convert in specs:
        if pivots is None:
            sources.setdefault(key, []).append(name)
        for pivot_key, trait_key in pivots or ():
            sources.setdefault(trait_key, []).append(f"{name} (pivot {pivot_key!r})")
    if membership_trait:
        sources.setdefault(membership_trait, []).append("membership_trait")
    clashes = [f"{key!r} from {' and '.join(names)}" for key, names in sources.items() if len(names) > 1]
    if clashes:
        raise TransformConfigError(
            f"Two columns give the same trait key: {'; '.join(clashes)}. Rename one with trait_names, "
            "choose another trait_key_style or drop one with exclude_fields."
        )


def _is_intended(reserved: str, f: LookField, explicit: set[str], email_field: str | None) -> bool:
    """Whether the column is the natural source of a reserved trait (``users.name`` → ``name``)."""
    if reserved == "id":
        return False
    if reserved == "email":
        return f.name == email_field
    if f.name in explicit:
        return True
    view, last = _split_name(f.name)
    same_name = _NON_ALNUM.sub("", last) == reserved.lower()
    return same_name and (not view or bool(_view_words(view) & _PERSON_VIEW_WORDS))


def _reserved_trait_warnings(
    pairs: list[tuple[LookField, str]], explicit: set[str], email_field: str | None, membership: str | None
) -> list[str]:
    warnings = []
    for f, key in pairs:
        if f.pivoted:
            continue
        reserved = _RESERVED_BY_NORM.get(_NON_ALNUM.sub("", key.lower()))
        if reserved and not _is_intended(reserved, f, explicit, email_field):
            warnings.append(
                f"Trait {key!r} comes from {f.name} (label {f.label_short or f.label!r}), which does not "
                f"look like the source of Segment's reserved trait {reserved!r}; downstream tools give it a "
                "special meaning. Rename it with trait_names or drop it with exclude_fields."
            )
    if membership and _NON_ALNUM.sub("", membership.lower()) in _RESERVED_BY_NORM:
        warnings.append(f"membership_trait {membership!r} is one of Segment's reserved traits.")
    return warnings


def _general_warnings(specs: tuple[_TraitSpec, ...], membership: str | None) -> list[str]:
    keys: list[str] = []
    for _name, key, pivots, _plain, _convert in specs:
        keys.extend([key] if pivots is None else [pair[1] for pair in pivots])
    warnings = []
    by_lower: dict[str, list[str]] = {}
    for key in keys:
        by_lower.setdefault(key.lower(), []).append(key)
    for same in (v for v in by_lower.values() if len(v) > 1):
        warnings.append(
            f"Trait keys {', '.join(map(repr, same))} differ only by case; some tools merge them."
        )
    if membership:
        keys.append(membership)
    if keys:
        warnings.append(
            "Each identify overwrites these traits in downstream tools that already have them: "
            f"{', '.join(keys)} (avoid trait names your marketing tools already use)."
        )
    else:
        warnings.append("The Look gives no trait: the identify calls will carry identifiers only.")
    return warnings


# ------------------------------------------------------------------------------------------------ values


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


def _finite_float(value: float) -> float | None:
    return value if value - value == 0.0 else None


def _decimal_value(value: Decimal) -> float | str | None:
    """A JSON number with a fraction or an exponent: a float, or its decimal text beyond a float's range."""
    if not value.is_finite():
        return None
    number = float(value)
    return number if number - number == 0.0 else str(value)


def to_trait_value(value: Any) -> Any:
    """
    Convert one raw Looker value into a trait value (a JSON scalar), as documented in this module.

    :param value: the raw value.
    :return: ``str``, ``int``, ``float``, ``bool`` or ``None``.
    """
    if value is None or value.__class__ in (str, int, bool):
        return value
    if isinstance(value, Decimal):
        return _decimal_value(value)
    if isinstance(value, float):
        return _finite_float(float(value))
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return _json_text(value)
    if isinstance(value, int):
        return int(value)
    return str(value)


def _to_time_trait_value(value: Any) -> Any:
    """Like :func:`to_trait_value`, and Looker's ``YYYY-MM-DD HH:MM:SS`` strings become ISO 8601."""
    if isinstance(value, str):
        match = _LOOKER_DATETIME.fullmatch(value)
        if match is None:
            return str(value)
        day, hour, rest = match.groups()
        return f"{day}T{hour}{rest or ':00'}"
    return to_trait_value(value)


def _json_safe(value: Any) -> Any:
    """Last-resort fix of a value orjson refuses: an integer beyond 64 bits, a lone surrogate (U+FFFD)."""
    if value.__class__ is int and not _INT64_MIN <= value <= _UINT64_MAX:
        return str(value)
    if isinstance(value, str):  # surrogate pairs are joined, each lone surrogate becomes U+FFFD
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return value


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
        return _identifier(str(value))
    return None


def _identifier(value: Any) -> str | None:
    """Return a userId/anonymousId string, or ``None`` for values that are not identifiers."""
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
    # uuid.uuid5(ANONYMOUS_ID_NAMESPACE, normalised), three times faster (no UUID object).
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + normalised.encode("utf-8", "surrogatepass")).digest())
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    text = digest[:16].hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


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


def format_timestamp(ran_at: datetime) -> str:
    """Return ``ran_at`` as ISO 8601 in UTC with milliseconds (``2024-01-05T10:00:00.000Z``); naive = UTC."""
    if ran_at.tzinfo is None:
        ran_at = ran_at.replace(tzinfo=timezone.utc)
    return ran_at.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _dump_head(message: dict[str, Any]) -> bytes:
    """
    Compact JSON of a message's identity and traits (the start of its encoding); values orjson refuses
    (e.g. a lone surrogate in a string) are fixed in place first (rare path).
    """
    try:
        return orjson.dumps(message)
    except orjson.JSONEncodeError:
        traits = message["traits"]
        for key, value in traits.items():
            traits[key] = _json_safe(value)
        for key in ("userId", "anonymousId"):
            if key in message:
                message[key] = _json_safe(message[key])
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
) -> RowTransformer:
    """
    Build the per-row function of a plan: row → ``(message, None)`` or ``(None, invalid reason)``.

    Messages have the keys ``type``, ``userId``/``anonymousId``, ``traits`` (in field order), ``timestamp``,
    ``context`` and ``messageId``, in that order. The ``context.library`` dict is shared by all messages:
    treat messages as read-only.

    :param plan: the plan from :func:`plan_transform`.
    :param ran_at: when Looker ran the query (the messages' ``timestamp``); ``None``: no timestamp.
    :param message_id_namespace: what makes this task run unique (see :func:`build_message_id_namespace`).
    :param library: ``context.library``; defaults to this package's name and version.
    :return: the transformer.
    """
    if not isinstance(message_id_namespace, str) or not message_id_namespace:
        raise TransformConfigError("message_id_namespace must be a non-empty string")
    library = dict(library) if library is not None else {"name": PACKAGE_NAME, "version": __version__}
    timestamp = format_timestamp(ran_at) if ran_at is not None else None
    hasher = hashlib.blake2b(message_id_namespace.encode() + b"\x1e", digest_size=16)
    uid_field = plan.user_id.field if plan.user_id else None
    anon_field = plan.anonymous_id.field if plan.anonymous_id else None
    email_field = plan.email.field if plan.email else None
    specs, membership = plan.specs, plan.membership_trait
    identifier, from_email, dump_head = _identifier, anonymous_id_from_email, _dump_head
    fill_pivots, new_message = _fill_pivots, EncodedMessage
    context = {"library": library}
    # What follows the traits in every message of the run, encoded once: timestamp, context, messageId key.
    tail_fields: dict[str, Any] = {"timestamp": timestamp} if timestamp is not None else {}
    tail_fields["context"] = context
    tail = b"," + orjson.dumps(tail_fields)[1:-1] + b',"messageId":"'
    prefix = MESSAGE_ID_PREFIX.encode()

    def transform(row: Row) -> tuple[dict[str, Any] | None, str | None]:
        get = row.get
        user_id = identifier(get(uid_field)) if uid_field else None
        anonymous_id = identifier(get(anon_field)) if anon_field else None
        if user_id is None and anonymous_id is None:
            anonymous_id = from_email(get(email_field)) if email_field else None
            if anonymous_id is None:
                return None, INVALID_NO_IDENTIFIER
        traits: dict[str, Any] = {}
        for name, key, pivots, plain, convert in specs:
            value = get(name)
            if pivots is None:
                traits[key] = value if value.__class__ in plain else convert(value)
            else:
                fill_pivots(traits, value, pivots, plain, convert)
        if membership:
            traits[membership] = True
        message = new_message(type="identify")
        if user_id is not None:
            message["userId"] = user_id
        if anonymous_id is not None:
            message["anonymousId"] = anonymous_id
        message["traits"] = traits
        # One encoding per message: its head (identity and traits) is both hashed into the messageId and
        # sent, followed by the run's constant fields and the messageId.
        head = dump_head(message)
        digest = hasher.copy()
        digest.update(head)
        hex_id = digest.hexdigest().encode()
        if timestamp is not None:
            message["timestamp"] = timestamp
        message["context"] = context
        message["messageId"] = MESSAGE_ID_PREFIX + hex_id.decode()
        message.encoded = head[:-1] + tail + prefix + hex_id + b'"}'
        return message, None

    return transform
