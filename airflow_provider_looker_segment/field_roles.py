"""
What each of a Look's fields becomes in a Segment call (pure, used by :func:`.transform.plan_transform`): the
identifier fields (options, then LookML tags, then names and labels), the trait keys (pivoted measures
included), and the warnings. The rules: docs/rows-to-calls.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import tzinfo
from typing import Any, NamedTuple

from airflow_provider_looker_segment.exceptions import TransformConfigError
from airflow_provider_looker_segment.models import LookField, LookResultMeta, PivotValue
from airflow_provider_looker_segment.settings import SyncOptions
from airflow_provider_looker_segment.values import carries_time_of_day, time_zone, trait_converter

#: Segment's reserved identify traits (https://segment.com/docs/connections/spec/identify/#traits).
RESERVED_TRAITS = tuple(
    "address age avatar birthday company createdAt description email firstName gender id lastName name "
    "phone title username website".split()
)

# Identifier kinds, the options naming them, their names in Segment's message and their LookML tags (the
# tags of Looker's own Segment action).
USER_ID, EMAIL, ANONYMOUS_ID, GROUP_ID = "user_id", "email", "anonymous_id", "group_id"
_OPTION_NAMES = {
    USER_ID: "user_id_field",
    EMAIL: "email_field",
    ANONYMOUS_ID: "anonymous_id_field",
    GROUP_ID: "group_id_field",
}
_MESSAGE_NAMES = {USER_ID: "userId", EMAIL: "email", ANONYMOUS_ID: "anonymousId", GROUP_ID: "groupId"}
_TAGS = {
    USER_ID: "user_id",
    EMAIL: "email",
    ANONYMOUS_ID: "segment_anonymous_id",
    GROUP_ID: "segment_group_id",
}

# Field-name endings (after the view) and normalised labels that mean an identifier.
_NAME_HINTS = {
    USER_ID: frozenset({"user_id", "userid", "segment_user_id"}),
    EMAIL: frozenset({"email", "email_address", "emailaddress", "e_mail"}),
    ANONYMOUS_ID: frozenset({"anonymous_id", "anonymousid", "segment_anonymous_id", "anon_id"}),
    GROUP_ID: frozenset({"group_id", "groupid", "segment_group_id"}),
}
_LABEL_HINTS = {
    USER_ID: frozenset({"user id", "userid", "segment user id"}),
    EMAIL: frozenset({"email", "email address", "e mail", "e mail address"}),
    ANONYMOUS_ID: frozenset({"anonymous id", "anonymousid", "segment anonymous id", "anon id"}),
    GROUP_ID: frozenset({"group id", "groupid", "segment group id", "account id"}),
}
#: View-name words of views that describe people (``users.id`` is a user id, ``orders.id`` is not).
_USER_ID_VIEW_WORDS = frozenset({"user", "users"})
#: View-name words of views whose ``id`` is a group id (``accounts.id``), for group calls.
_GROUP_ID_VIEW_WORDS = frozenset(
    "account accounts group groups company companies organization organizations organisation organisations "
    "org orgs team teams workspace workspaces".split()
)
_PERSON_VIEW_WORDS = frozenset(
    "user users customer customers person people persons contact contacts member members profile profiles "
    "lead leads subscriber subscribers".split()
)

#: Segment's reserved group traits (https://segment.com/docs/connections/spec/group/#traits).
RESERVED_GROUP_TRAITS = tuple(
    "address avatar createdAt description email employees id industry name phone website plan".split()
)
#: What each call calls its column values.
VALUES_KEY = {"identify": "traits", "group": "traits", "track": "properties"}

_NON_ALNUM = re.compile(r"[^0-9a-z]+")
_SNAKE_SPLIT = re.compile(r"\W+")
_LABEL_SEPARATORS = re.compile(r"[\s_\-]+")
_RESERVED_BY_NORM = {
    "identify": {_NON_ALNUM.sub("", t.lower()): t for t in RESERVED_TRAITS},
    "group": {_NON_ALNUM.sub("", t.lower()): t for t in RESERVED_GROUP_TRAITS},
    "track": {},
}


class TraitSpec(NamedTuple):
    """One trait source, precomputed for the row loop."""

    #: The Looker field.
    name: str
    #: Its trait key; ``None`` for a pivoted field (see ``pivots``).
    key: str | None
    #: A pivoted field's (pivot key, trait key) pairs, or ``None``.
    pivots: tuple[tuple[str, str], ...] | None
    #: Value classes sent as they are.
    plain: frozenset
    #: The converter of other values.
    convert: Callable[[Any], Any]


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


def field_list(meta: LookResultMeta) -> str:
    """The Look's field names, for error messages."""
    return ", ".join(f.name for f in meta.fields) or "(none)"


# --- identifiers ------------------------------------------------------------------------------------------


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
    id_views = (
        _USER_ID_VIEW_WORDS if kind == USER_ID else _GROUP_ID_VIEW_WORDS if kind == GROUP_ID else frozenset()
    )
    if last in _NAME_HINTS[kind] or (last == "id" and _view_words(view) & id_views):
        return "field name"
    labels = {_normalise_label(f.label_short), _normalise_label(f.label)}
    return "label" if labels & _LABEL_HINTS[kind] else None


def _single(kind: str, candidates: list[LookField], how: str, label: str) -> IdentifierChoice | None:
    """Return the only candidate, or raise an error naming every candidate."""
    if not candidates:
        return None
    if len(candidates) > 1:
        names = " and ".join(f.name for f in candidates)
        raise TransformConfigError(
            f"{label}: {names} all qualify as the {_MESSAGE_NAMES[kind]} field ({how}). "
            f"Keep one (remove the tag, rename or remove the others) or set {_OPTION_NAMES[kind]}."
        )
    return IdentifierChoice(candidates[0].name, how)


def _by_tag(kind: str, meta: LookResultMeta, taken: set[str]) -> IdentifierChoice | None:
    tag = _TAGS[kind]
    candidates = [
        f for f in meta.fields if any(t.strip().lower() == tag for t in f.tags) and f.name not in taken
    ]
    return _single(kind, candidates, f"tag {tag}", meta.source_label)


def _by_hint(kind: str, meta: LookResultMeta, taken: set[str]) -> IdentifierChoice | None:
    """Name/label detection; visible fields win over hidden ones, pivoted fields never qualify."""
    hints = [(f, _hint(kind, f)) for f in meta.fields if not f.pivoted and f.name not in taken]
    hints = [(f, how) for f, how in hints if how]
    chosen = [(f, how) for f, how in hints if not f.hidden] or hints
    if len(chosen) > 1:
        _single(kind, [f for f, _how in chosen], "field name or label", meta.source_label)
    return IdentifierChoice(chosen[0][0].name, chosen[0][1]) if chosen else None


def choose_identifiers(meta: LookResultMeta, options: SyncOptions) -> dict[str, IdentifierChoice | None]:
    """
    Choose the identifier fields: explicit options first, then tags, then names/labels.

    For group calls (``options.call == "group"``) the group id is chosen first and required; the user
    identifiers are then optional. For identify and track calls there is no group id: a field tagged
    ``segment_group_id`` is an ordinary trait.

    :param meta: the Look's fields.
    :param options: the user's choices.
    :return: ``{USER_ID: choice or None, EMAIL: ..., ANONYMOUS_ID: ..., GROUP_ID: ...}``, at least one user
        identifier chosen (a group id for group calls).
    :raises TransformConfigError: no identifier, two candidates for one, one field for two identifiers, or
        a pivoted identifier.
    """
    group = options.call == "group"
    kinds = (GROUP_ID, USER_ID, EMAIL, ANONYMOUS_ID) if group else (USER_ID, EMAIL, ANONYMOUS_ID)
    explicit = {kind: getattr(options, _OPTION_NAMES[kind]) for kind in kinds}
    choices = {kind: IdentifierChoice(name, "parameter") if name else None for kind, name in explicit.items()}
    counterpart = {USER_ID: ANONYMOUS_ID, ANONYMOUS_ID: USER_ID}
    for kind in kinds:
        if choices[kind] is None:
            # A field explicitly set as the userId is not the anonymousId because of a tag (and vice versa).
            other = explicit.get(counterpart[kind]) if kind in counterpart else None
            taken = {other} if other else set()
            if kind != GROUP_ID and choices.get(GROUP_ID):
                taken.add(choices[GROUP_ID].field)
            choices[kind] = _by_tag(kind, meta, taken)
    for kind in kinds:
        if choices[kind] is None:
            taken = {c.field for k, c in choices.items() if c and k != kind}
            choices[kind] = _by_hint(kind, meta, taken)
    if group and choices[GROUP_ID] is None:
        raise TransformConfigError(
            f"{meta.source_label} has no group id field, which group calls need: no field is tagged "
            "segment_group_id in LookML, and none is named or labelled like a group or account id. Tag a "
            f"field or set group_id_field. The Look's fields: {field_list(meta)}"
        )
    choices.setdefault(GROUP_ID, None)
    if not group and not any(choices.values()):
        raise TransformConfigError(
            f"{meta.source_label} has no identifier field: no field is tagged user_id, email or "
            "segment_anonymous_id in LookML, and none is named or labelled like a user id, an email or an "
            "anonymous id. Tag a field or set user_id_field, email_field or anonymous_id_field. "
            f"The Look's fields: {field_list(meta)}"
        )
    by_field: dict[str, list[str]] = {}
    for kind in (GROUP_ID, USER_ID, ANONYMOUS_ID):
        if choices[kind]:
            by_field.setdefault(choices[kind].field, []).append(kind)
    for name, kinds_of_field in by_field.items():
        if len(kinds_of_field) > 1:
            roles = " and the ".join(
                f"{_MESSAGE_NAMES[k]} ({choices[k].how})"
                for k in kinds_of_field  # type: ignore[union-attr]
            )
            raise TransformConfigError(
                f"{meta.source_label}: {name} is chosen as the {roles}; one field cannot give two "
                "identifiers"
                + (" (an anonymous id must not become the userId)" if ANONYMOUS_ID in kinds_of_field else "")
                + f". Choose different fields (set {_OPTION_NAMES[kinds_of_field[0]]})."
            )
    for kind, choice in choices.items():
        look_field = meta.field_by_name(choice.field) if choice else None
        if choice and look_field is not None and look_field.pivoted:
            raise TransformConfigError(
                f"{meta.source_label}: {look_field.name} is a pivoted measure and cannot be the "
                f"{_MESSAGE_NAMES[kind]} field ({choice.how})."
            )
    return choices


# --- trait keys -------------------------------------------------------------------------------------------


def trait_keys(specs: tuple[TraitSpec, ...]) -> list[str]:
    """Every trait key the specs give, in order (a pivoted field's per-pivot keys in pivot order)."""
    keys: list[str] = []
    for _name, key, pivots, _plain, _convert in specs:
        keys.extend([key] if pivots is None else [trait_key for _pivot_key, trait_key in pivots])
    return keys


def plan_traits(
    meta: LookResultMeta, options: SyncOptions, choices: dict[str, IdentifierChoice | None]
) -> tuple[tuple[TraitSpec, ...], list[str]]:
    """
    Decide which fields become which traits, and what about them is worth a warning.

    :param meta: the Look's fields and pivots.
    :param options: the user's choices (``trait_names``, ``trait_key_style``, ``exclude_fields``...).
    :param choices: the identifier fields, from :func:`choose_identifiers`.
    :return: the row loop's trait sources in field order, and the warnings.
    :raises TransformConfigError: ``trait_names`` names an identifier or renames the email field, or two
        columns give the same trait key.
    """
    email = choices[EMAIL].field if choices[EMAIL] else None
    pairs = _trait_pairs(meta, options, choices, email)
    warnings: list[str] = []
    style = options.trait_key_style
    zone = time_zone(meta.timezone)
    specs = tuple(_trait_spec(f, key, meta.pivots, style, warnings, zone) for f, key in pairs)
    timed = [f.name for f, _key in pairs if carries_time_of_day(f.type)]
    if timed and zone is None:
        said = (
            f"in the time zone {meta.timezone!r}, which this worker's time zone database does not know"
            if meta.timezone
            else "in which time zone it ran the query"
        )
        verb = "give" if len(timed) > 1 else "gives"
        warnings.append(
            f"{', '.join(timed)} {verb} date-times sent without a UTC offset "
            f"(e.g. 2024-01-05T10:11:12), the local time of the query: Looker did not say {said}. Segment's "
            "spec wants them in UTC and Engage drops timestamp traits without a zone: set the Look's "
            "query time zone in Looker (or install the zone's data on the workers)."
        )
    _check_duplicate_keys(specs, options.membership_trait)
    if options.call == "group" and email and choices[USER_ID] and email not in options.exclude_fields:
        warnings.append(
            f"{email} gives traits.email of the group calls, which downstream tools store as the group's "
            "(account's) email; if it is the user's email, exclude it with exclude_fields."
        )
    reserved = _RESERVED_BY_NORM[options.call]
    warnings += _reserved_trait_warnings(
        pairs, set(options.trait_names), email, options.membership_trait, reserved, options.call
    )
    warnings += _general_warnings(trait_keys(specs), options.membership_trait, options.call)
    return specs, warnings


def _trait_pairs(
    meta: LookResultMeta,
    options: SyncOptions,
    choices: dict[str, IdentifierChoice | None],
    email: str | None,
) -> list[tuple[LookField, str]]:
    """Return ``[(field, base trait key)]`` in field order."""
    identifiers = {c.field: kind for kind, c in choices.items() if c and kind != EMAIL}  # group id too
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
    return pairs


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


def _pivot_key(base: str, pivot: PivotValue, style: str) -> str:
    label = pivot.label or " | ".join("" if v is None else str(v) for v in pivot.data.values())
    label = " ".join(label.split()) or pivot.key
    if style == "snake":
        return f"{base}__{_snake(label) or _snake(pivot.key) or 'null'}"
    return f"{base} | {label}"


def _trait_spec(
    f: LookField,
    key: str,
    pivots: tuple[PivotValue, ...],
    style: str,
    warnings: list[str],
    zone: tzinfo | None = None,
) -> TraitSpec:
    """Precompute the row-loop entry of one field (``zone``: the query's time zone, for date-times)."""
    plain, convert = trait_converter(f.type, zone)
    if not f.pivoted:
        return TraitSpec(f.name, key, None, plain, convert)
    if not pivots:
        warnings.append(f"{f.name} is pivoted but the Look has no pivot values: it gives no trait.")
    pairs = tuple((p.key, _pivot_key(key, p, style)) for p in pivots)
    return TraitSpec(f.name, None, pairs, plain, convert)


def _check_duplicate_keys(specs: tuple[TraitSpec, ...], membership_trait: str | None) -> None:
    """Two sources of one trait key would silently overwrite each other: refuse."""
    sources: dict[str | None, list[str]] = {}
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


# --- warnings ---------------------------------------------------------------------------------------------


def _is_intended(
    reserved: str, f: LookField, explicit: set[str], email_field: str | None, call: str = "identify"
) -> bool:
    """
    Whether the column is the natural source of a reserved trait: ``users.name`` → ``name`` for identify
    calls, ``accounts.name`` → ``name`` (and ``accounts.plan`` → ``plan``) for group calls.
    """
    if reserved == "id":
        return False
    if reserved == "email":
        return f.name == email_field
    if f.name in explicit:
        return True
    view, last = _split_name(f.name)
    same_name = _NON_ALNUM.sub("", last) == reserved.lower()
    natural_views = _GROUP_ID_VIEW_WORDS if call == "group" else _PERSON_VIEW_WORDS
    return same_name and (not view or bool(_view_words(view) & natural_views))


def _reserved_trait_warnings(
    pairs: list[tuple[LookField, str]],
    explicit: set[str],
    email_field: str | None,
    membership: str | None,
    reserved_by_norm: dict[str, str],
    call: str = "identify",
) -> list[str]:
    warnings = []
    for f, key in pairs:
        reserved = None if f.pivoted else reserved_by_norm.get(_NON_ALNUM.sub("", key.lower()))
        if reserved and not _is_intended(reserved, f, explicit, email_field, call):
            warnings.append(
                f"Trait {key!r} comes from {f.name} (label {f.label_short or f.label!r}), which does not "
                f"look like the source of Segment's reserved trait {reserved!r}; downstream tools give it a "
                "special meaning. Rename it with trait_names or drop it with exclude_fields."
            )
    if membership and _NON_ALNUM.sub("", membership.lower()) in reserved_by_norm:
        warnings.append(f"membership_trait {membership!r} is one of Segment's reserved traits.")
    return warnings


def _general_warnings(keys: list[str], membership: str | None, call: str) -> list[str]:
    warnings = []
    by_lower: dict[str, list[str]] = {}
    for key in keys:
        by_lower.setdefault(key.lower(), []).append(key)
    for same in (v for v in by_lower.values() if len(v) > 1):
        warnings.append(
            f"Trait keys {', '.join(map(repr, same))} differ only by case; some tools merge them."
        )
    if not keys and not membership:
        warnings.append(
            f"The Look gives no {VALUES_KEY[call]}: the {call} calls will carry identifiers only."
        )
    return warnings


def overwrite_note(keys: list[str] | tuple[str, ...], call: str) -> str | None:
    """
    What every call of a sync writes over in downstream tools, for the plan's log line: not a warning, as it
    is true of every identify or group call, and a warning on every run would drown those that need action.

    :param keys: the trait keys the calls carry, the membership trait included.
    :param call: ``"identify"``, ``"group"`` or ``"track"`` (track calls overwrite no profile trait).
    :return: the note, or ``None`` when the calls overwrite nothing.
    """
    if not keys or call == "track":
        return None
    what = (
        "identify overwrites these traits"
        if call == "identify"
        else "group call overwrites these group traits"
    )
    return f"each {what} in downstream tools that already have them: {', '.join(keys)}"
