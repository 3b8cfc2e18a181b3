"""
Segment destinations that accept calls from Looker, and the identifiers each one needs (pure). The table is
the chart of Segment's Looker source page, shipped as package data (``data/segment-destinations.tsv``:
``destination``, ``email``, ``user_id``, ``either``, ``note``; ``X``: required, ``X*``: required except as
the note says), read once. How the notes and the call types are applied by :func:`check_destinations`:
docs/destinations.md.
"""

from __future__ import annotations

import csv
import difflib
import functools
import importlib.resources
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from airflow_provider_looker_segment.exceptions import DestinationError

__all__ = [
    "ALIASES",
    "Destination",
    "DestinationCheck",
    "check_destinations",
    "load_destinations",
    "normalise_name",
    "parse_table",
    "resolve_destinations",
]

_TABLE = "data/segment-destinations.tsv"
_COLUMNS = ("destination", "email", "user_id", "either", "note")
_MARKS = ("", "X", "X*")

#: Other names users may type (normalised like destination names: lower-case letters and digits only).
ALIASES = {
    "appboy": "braze",
    "customerio": "customer.io",
    "kinesis": "amazon-kinesis",
    "firehose": "amazon-kinesis-firehose",
    "kinesisfirehose": "amazon-kinesis-firehose",
    "clearbit": "clearbit-enrichment",
    "autopilot": "autopilothq",
    "marketo": "marketo-v2",
    "sfmc": "salesforce-marketing-cloud",
    "exacttarget": "salesforce-marketing-cloud",
    "webhook": "webhooks",
    "promoter": "promoter.io",
    "ironio": "iron.io",
    "trayio": "tray.io",
    "helpscout": "help-scout",
    "treasuredata": "treasure-data",
    "whalealerts": "whale-alerts",
}

_IDENTIFIER_HINTS = {
    "user_id": "tag a field `user_id` in LookML or set user_id_field",
    "email": "tag a field `email` in LookML or set email_field, and do not exclude it",
    "anonymous_id": (
        "tag a field `segment_anonymous_id` in LookML, set anonymous_id_field or provide an email"
    ),
}


@dataclass(frozen=True)
class Destination:
    """
    One row of the destination table.

    :param name: the destination's name in the table, e.g. ``hubspot``.
    :param email: the mark in the ``email`` column: ``""``, ``"X"`` (required) or ``"X*"`` (see note).
    :param user_id: the mark in the ``user_id`` column.
    :param either: the mark in the ``either`` column (a userId or an email).
    :param note: the special note, e.g. ``*or anonymousId``.
    """

    name: str
    email: str = ""
    user_id: str = ""
    either: str = ""
    note: str = ""

    @property
    def requirement(self) -> str:
        """``email``, ``user_id``, ``both`` (email and userId), ``either`` or ``none``."""
        if self.email and self.user_id:
            return "both"
        if self.email:
            return "email"
        if self.user_id:
            return "user_id"
        return "either" if self.either else "none"

    @property
    def accepts_anonymous_id(self) -> bool:
        """The note lets an anonymousId stand in for the userId (``*or anonymousId``)."""
        return self.user_id == "X*" and "anonymousid" in self.note.lower().replace(" ", "")


@dataclass
class DestinationCheck:
    """
    The result of :func:`check_destinations`.

    :param errors: one line per unmet requirement, naming the destination and what it needs.
    :param warnings: settings to check or requirements that cannot be verified from the Look.
    """

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No errors."""
        return not self.errors


def normalise_name(name: str) -> str:
    """Lower-case letters and digits only: ``"Customer IO"``, ``"customer.io"`` → ``"customerio"``."""
    return re.sub(r"[^0-9a-z]+", "", name.lower())


def _parse_row(line_no: int, row: list[str]) -> Destination:
    if len(row) != len(_COLUMNS):
        raise ValueError(f"{_TABLE} line {line_no}: {len(_COLUMNS)} tab-separated columns expected: {row!r}")
    name, email, user_id, either, note = (cell.strip() for cell in row)
    for column, mark in (("email", email), ("user_id", user_id), ("either", either)):
        if mark not in _MARKS:
            raise ValueError(f"{_TABLE} line {line_no}: unknown mark {mark!r} in column {column}")
    if not name:
        raise ValueError(f"{_TABLE} line {line_no}: no destination name")
    return Destination(name=name, email=email, user_id=user_id, either=either, note=note)


def parse_table(text: str) -> dict[str, Destination]:
    """
    Parse the destination table.

    :param text: the TSV text, header first.
    :return: destination name → :class:`Destination`, in table order.
    :raises ValueError: a malformed table.
    """
    rows = list(csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or tuple(cell.strip() for cell in rows[0]) != _COLUMNS:
        raise ValueError(f"{_TABLE}: header {'/'.join(_COLUMNS)} expected")
    table: dict[str, Destination] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        destination = _parse_row(line_no, row)
        if destination.name in table:
            raise ValueError(f"{_TABLE} line {line_no}: {destination.name} appears twice")
        table[destination.name] = destination
    return table


@functools.cache
def load_destinations() -> dict[str, Destination]:
    """Return the packaged destination table (read once): name → :class:`Destination`, in table order."""
    resource = importlib.resources.files("airflow_provider_looker_segment").joinpath(_TABLE)
    return parse_table(resource.read_text(encoding="utf-8"))


@functools.cache
def _lookup() -> dict[str, str]:
    """Normalised name or alias → destination name."""
    lookup = {normalise_name(name): name for name in load_destinations()}
    lookup.update({alias: name for alias, name in ALIASES.items() if alias not in lookup})
    return lookup


def _suggestions(key: str) -> list[str]:
    lookup = _lookup()
    close = difflib.get_close_matches(key, list(lookup), n=6, cutoff=0.6)
    close += [k for k in lookup if key and len(key) >= 3 and (k.startswith(key) or key in k)]
    return list(dict.fromkeys(lookup[k] for k in close))[:3]


def _split_names(names: str | Iterable[str] | None) -> list[object]:
    if names is None:
        return []
    if isinstance(names, str):
        return [part for part in names.split(",") if part.strip()]
    return list(names)


def resolve_destinations(names: str | Iterable[str] | None) -> list[Destination]:
    """
    Turn the names a user typed into destinations (case, spaces and punctuation ignored; aliases known).

    :param names: destination names, e.g. ``["HubSpot", "appboy"]``; a string is read as a comma-separated
        list; ``None`` means no destination.
    :return: the destinations, in the given order, without duplicates.
    :raises DestinationError: unknown names (with close matches) or names that are not strings.
    """
    table, lookup = load_destinations(), _lookup()
    resolved: dict[str, Destination] = {}
    unknown: list[str] = []
    for name in _split_names(names):
        if not isinstance(name, str):
            raise DestinationError(f"Destination names must be strings, got {name!r}")
        key = normalise_name(name)
        if key in lookup:
            resolved.setdefault(lookup[key], table[lookup[key]])
            continue
        close = _suggestions(key)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        unknown.append(f"{name.strip()!r}{hint}")
    if unknown:
        raise DestinationError(
            f"Unknown Segment destination {', '.join(unknown)}. Known destinations (Segment's Looker source "
            f"chart): {', '.join(table)}"
        )
    return list(resolved.values())


def _missing(what: str, needs: str, hints: Iterable[str]) -> str:
    return f"{what} needs {needs}: the Look provides none ({'; '.join(_IDENTIFIER_HINTS[h] for h in hints)})"


def _identifier_errors(
    d: Destination, *, has_user_id: bool, has_email: bool, has_anonymous_id: bool
) -> tuple[list[str], list[str]]:
    """Errors and warnings of one destination's identifier requirement."""
    errors, warnings = [], []
    if d.user_id == "X" and not has_user_id:
        errors.append(_missing(d.name, "a userId", ["user_id"]))
    elif d.user_id == "X*" and not has_user_id:
        if d.accepts_anonymous_id and not has_anonymous_id:
            errors.append(_missing(d.name, "a userId or an anonymousId", ["user_id", "anonymous_id"]))
        elif not d.accepts_anonymous_id and d.name == "woopra":
            warnings.append(
                "woopra needs a userId unless a cookie is set in its destination settings, and the Look "
                "provides no userId: check the Woopra settings."
            )
        elif not d.accepts_anonymous_id:
            errors.append(_missing(d.name, "a userId", ["user_id"]))
    if d.email == "X" and not has_email:
        errors.append(_missing(d.name, "an email trait", ["email"]))
    elif d.email == "X*" and not has_email and d.name == "pardot":
        warnings.append(
            "pardot identifies prospects by the field set as unique identifier in its destination settings "
            "and the Look provides no email trait: make sure that setting names a trait the Look sends."
        )
    elif d.email == "X*" and not has_email:
        errors.append(_missing(d.name, "an email trait", ["email"]))
    if d.requirement == "either" and not (has_user_id or has_email):
        errors.append(_missing(d.name, "a userId or an email trait", ["user_id", "email"]))
    return errors, warnings


def _special_note(d: Destination, trait_keys: set[str], call: str) -> tuple[list[str], list[str]]:
    """Errors and warnings of one destination's special note."""
    errors: list[str] = []
    warnings: list[str] = []
    if d.name == "totango" and call != "group":
        errors.append(
            f"totango also needs context.groupId, which {call} calls made from a Look do not carry: Totango "
            "would drop them. Send group calls (call='group', with the account id as group_id_field) to "
            "feed Totango accounts, or remove totango from destinations."
        )
    elif call == "track" and d.name in ("zendesk", "salesmachine", "marketo-v2"):
        pass  # notes about identify traits
    elif d.name == "zendesk" and "name" not in trait_keys:
        errors.append(
            "zendesk also needs a `name` trait: the Look gives none (add a column whose trait key is `name`, "
            "e.g. with trait_names)."
        )
    elif d.name == "salesmachine" and "account_uid" not in trait_keys:
        errors.append(
            "salesmachine needs an `account_uid` trait: the Look gives none (add a column whose trait key is "
            "`account_uid`, e.g. with trait_names)."
        )
    elif d.name == "pardot":
        warnings.append(
            "pardot: set the Pardot field to use as unique identifier in the Pardot destination settings "
            "before sending the Look."
        )
    elif d.name == "marketo-v2":
        keys = ", ".join(sorted(trait_keys)) or "(none)"
        warnings.append(
            "marketo-v2: create these custom traits in Marketo and map them in the destination settings "
            f"before sending the Look: {keys}."
        )
    return errors, warnings


def check_destinations(
    destinations: Iterable[Destination],
    *,
    has_user_id: bool,
    has_email: bool,
    has_anonymous_id: bool,
    trait_keys: Iterable[str],
    call: str = "identify",
    has_group_id: bool = False,
) -> DestinationCheck:
    """
    Check that the Look gives every destination the identifiers and traits it needs.

    The check is about the Look's fields, not its rows (docs/destinations.md, "What is checked").

    :param destinations: from :func:`resolve_destinations`.
    :param has_user_id: the Look has a userId field.
    :param has_email: messages carry ``traits.email``.
    :param has_anonymous_id: rows can carry an anonymousId (a field, or derived from the email).
    :param trait_keys: every trait key the messages can carry.
    :param call: ``"identify"`` (default), ``"group"`` or ``"track"`` (docs/destinations.md, "Call types").
    :param has_group_id: the messages carry a ``groupId`` (group calls).
    :return: errors (the task should fail naming them) and warnings (for the log).
    """
    keys = set(trait_keys)
    check = DestinationCheck()
    destinations = list(destinations)
    if call == "group":
        if not has_group_id:
            check.errors.append(
                "group calls need a groupId: tag the group id field segment_group_id in LookML or set "
                "group_id_field"
            )
        if destinations:
            check.warnings.append(
                "Segment's table lists what destinations need from identify calls; for group calls only the "
                "group id (and totango's groupId note) is checked: make sure each destination accepts group "
                f"calls ({', '.join(d.name for d in destinations)})."
            )
        return check
    for d in destinations:
        errors, warnings = _identifier_errors(
            d, has_user_id=has_user_id, has_email=has_email, has_anonymous_id=has_anonymous_id
        )
        if call == "track":
            carry = "an email trait, which track calls do not carry:"
            errors = [e.replace("an email trait:", carry) for e in errors]
        note_errors, note_warnings = _special_note(d, keys, call)
        check.errors.extend(errors + note_errors)
        check.warnings.extend(warnings + note_warnings)
    return check
