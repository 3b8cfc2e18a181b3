"""
The commit of a changed-only run: the next state from what Segment accepted of each unit handed to it (what
the *view* of an identity records, and when it leaves ``pending``: docs/changed-only.md).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from typing import NamedTuple

from airflow_provider_looker_segment import exceptions as errors
from airflow_provider_looker_segment.cohort_units import (
    CALL,
    CHANGED,
    ENTER,
    EVENT,
    EXIT,
    FULL,
    NEW,
    Handed,
    message_part,
)
from airflow_provider_looker_segment.sync_run import SyncRun
from airflow_provider_looker_segment.sync_state import signed, utcnow

log = logging.getLogger(__name__)
_FLUSH_ROWS = 10_000


class CommitResult(NamedTuple):
    """
    What a commit wrote: the state's ``generation``, ``identities`` and file size (``bytes``; ``saved``
    false when nothing changed, so nothing was written); units accepted for new identities (``added``),
    changed ones (``updated``) and exits (``removed``); units not accepted (``not_advanced``: sent again
    next run), and entries or exits left pending.
    """

    generation: int
    identities: int
    bytes: int
    added: int
    updated: int
    removed: int
    not_advanced: int
    pending: int
    saved: bool
    save_seconds: float = 0.0


def commit_run(
    run: SyncRun,
    handed: Handed,
    *,
    keep_departed: bool,
    membership_trait: bool,
    entered_event: bool,
    exited_event: bool,
) -> CommitResult:
    """
    Write the next state from what Segment accepted of each unit handed to it (the rejected and failed
    messages were given to :meth:`SyncRun.record_undelivered`); the run is then spent.

    A call accepted records the identity's traits digest; the view of an identity records what its entry
    or exit told Segment; an identity whose view is complete (a member in full, or out in full) leaves
    ``pending``, one out in full leaves the state. Parts the run does not send (no membership trait, no
    entry or exit event) count as told.

    :param handed: how far the run's messages were handed to Segment.
    :param keep_departed: the departed identities stay as they are (a possibly truncated Look).
    :param membership_trait: the run's calls carry a membership trait (exit calls are sent).
    :param entered_event: the run sends entry events.
    :param exited_event: the run sends exit events.
    :raises SyncStateConflictError: the stored state changed since this run loaded it.
    :raises SyncStateSaveError: the state could not be saved (after the store's retries).
    """
    run.end_sending()
    db, generation = run.db, run.previous_generation
    if not _load_undelivered(run, handed):  # a failed message of unknown identity: nothing advances
        handed = Handed()
    units_done, exits_done = handed.units_done, handed.exits_done if handed.exits_started else -1
    if handed.all_done:
        units_done = exits_done = 1 << 62
    exits_sent = membership_trait or exited_event
    drop_departed = not keep_departed and not exits_sent  # nothing to tell them: they just leave
    tally = {"added": 0, "accepted": 0, "complete": 0, "removed": 0, "changes": 0, "sent": 0}
    upserts: list[tuple] = []
    deletes: list[tuple] = []
    pending_upserts: list[tuple] = []
    pending_deletes: list[tuple] = []
    unit_ordinal = exit_ordinal = 0
    for (lo, hi), units, departed in run.plans():
        failed = dict(db.execute("SELECT ihash, bits FROM run.failed WHERE ihash BETWEEN ? AND ?", (lo, hi)))
        for _seq, verdict, ihash, kind, identity, _pos, _length, digest, transition, gen, view in units:
            tally["sent"] += 1
            if unit_ordinal > units_done:
                unit_ordinal += 1
                continue
            unit_ordinal += 1
            bits = failed.get(ihash, 0)
            alt = None
            if verdict == NEW and run.switched_alts:
                found = db.execute("SELECT alt FROM run.switches WHERE ihash = ?", (ihash,)).fetchone()
                if found:
                    alt, view = found[0], FULL
            # After its call was sent, Segment may hold the identity as a member (a call that failed may
            # have reached it): the call bit is set whatever the outcome, but only an accepted call
            # completes the unit (and records the digest).
            accepted_call = not bits & CALL
            if entered_event:
                new_event = EVENT if not bits & EVENT else view & EVENT
            else:
                new_event = EVENT
            new_view = CALL | new_event
            if accepted_call:
                upserts.append((ihash, digest, kind, identity))
                tally["accepted"] += 1
                tally["added"] += verdict == NEW and alt is None
                if alt is not None:
                    deletes.append((alt,))
                    pending_deletes.append((alt,))
            if accepted_call and new_view == FULL:
                tally["complete"] += 1
                if transition is not None:
                    pending_deletes.append((ihash,))
            elif verdict == CHANGED and transition is None and new_view == FULL:
                pass  # a member in full still: its old digest makes the next run send it again
            else:
                since = gen if transition == ENTER else generation
                pending_upserts.append((ihash, ENTER, since, new_view, kind, identity))
        for ihash, kind, identity, transition, gen, view, orphan in departed:
            if ihash in run.switched_alts:
                continue
            if drop_departed:
                deletes.append((ihash,))
                if transition is not None:
                    pending_deletes.append((ihash,))
                tally["removed"] += not orphan
                continue
            if keep_departed or not exits_sent:
                continue
            if exit_ordinal > exits_done:
                exit_ordinal += 1
                continue
            exit_ordinal += 1
            bits = failed.get(ihash, 0)
            new_call = 0 if not membership_trait or not bits & CALL else view & CALL
            new_event = 0 if not exited_event or not bits & EVENT else view & EVENT
            if new_call | new_event:
                since = gen if transition == EXIT else generation
                pending_upserts.append((ihash, EXIT, since, new_call | new_event, kind, identity))
            else:
                deletes.append((ihash,))
                if transition is not None:
                    pending_deletes.append((ihash,))
                tally["removed"] += not orphan
        _apply(db, upserts, deletes, pending_upserts, pending_deletes, tally)
    pending = db.execute("SELECT count(*) FROM main.pending").fetchone()[0]
    stayed = 0 if keep_departed else max(run.decision.departed - tally["removed"], 0)
    not_advanced = tally["sent"] - tally["complete"] + stayed
    entries = db.execute("SELECT count(*) FROM main.identities").fetchone()[0]
    if not tally["changes"]:
        db.rollback()
        log.info(
            "Sync %s: nothing changed; the state (generation %s) is kept as it is.",
            run.store.key,
            generation,
        )
        return CommitResult(generation, entries, 0, 0, 0, 0, not_advanced, pending, False)
    accepted, added = tally["accepted"], tally["added"]
    result = _save(run, entries, added, accepted, tally["removed"], not_advanced, pending)
    log.info("Sync %s: state generation %s saved: %s", run.store.key, result.generation, result)
    return result


def _apply(
    db: sqlite3.Connection,
    upserts: list[tuple],
    deletes: list[tuple],
    pending_upserts: list[tuple],
    pending_deletes: list[tuple],
    tally: dict[str, int],
) -> None:
    """Write a partition's changes to the local copy of the state."""
    if upserts:
        tally["changes"] += db.executemany(
            "INSERT OR REPLACE INTO main.identities (ihash, digest, kind, identity) VALUES (?, ?, ?, ?)",
            upserts,
        ).rowcount
    if deletes:
        tally["changes"] += db.executemany("DELETE FROM main.identities WHERE ihash = ?", deletes).rowcount
    if pending_deletes:
        tally["changes"] += db.executemany(
            "DELETE FROM main.pending WHERE ihash = ?", pending_deletes
        ).rowcount
    if pending_upserts:
        tally["changes"] += db.executemany(
            "INSERT OR REPLACE INTO main.pending VALUES (?, ?, ?, ?, ?, ?)", pending_upserts
        ).rowcount
    for batch in (upserts, deletes, pending_upserts, pending_deletes):
        batch.clear()


def _save(
    run: SyncRun, entries: int, added: int, accepted: int, removed: int, not_advanced: int, pending: int
) -> CommitResult:
    db, started = run.db, time.monotonic()
    state_id = int.from_bytes(os.urandom(4), "big") & 0x7FFF_FFFF
    generation = run.previous_generation + 1
    meta = {"sync_key": run.store.key, "generation": generation, "run_id": run.run_id}
    meta |= {"state_id": f"{state_id:08x}", "written_at": utcnow().isoformat(timespec="seconds")}
    db.executemany("INSERT OR REPLACE INTO main.meta VALUES (?, ?)", meta.items())
    db.execute(f"PRAGMA main.user_version = {state_id}")
    db.commit()
    next_state = run.workdir / "next.state"
    db.execute("VACUUM main INTO ?", (str(next_state),))  # compact, in hash order
    size = next_state.stat().st_size
    try:
        run.store.file.publish(next_state, run.token)
    except errors.SyncStateConflictError:
        raise
    except Exception as error:
        marked = run.store.file.write_unsaved_marker(
            {
                "run_id": run.run_id,
                "generation": run.previous_generation,
                "written_at": meta["written_at"],
            }
        )
        raise errors.SyncStateSaveError(
            run.store.key,
            str(run.store.state_path),
            error,
            attempts=len(run.store.file.save_retry_delays) + 1,
            generation=run.previous_generation,
            marked=marked,
        ) from error
    if run.unsaved is not None:
        run.store.file.remove_unsaved_marker()
    seconds = round(time.monotonic() - started, 3)
    return CommitResult(
        generation, entries, size, added, accepted - added, removed, not_advanced, pending, True, seconds
    )


def _load_undelivered(run: SyncRun, handed: Handed) -> bool:
    """
    Fill ``run.failed`` with the (identity, part bits) of the rejected and failed messages and of the
    parts of the unit handed in part; ``False`` when one of them names no identity.
    """
    db = run.db
    upsert = """INSERT INTO run.failed VALUES (?, ?)
                ON CONFLICT (ihash) DO UPDATE SET bits = bits | excluded.bits"""
    known, batch = True, []
    with open(run.undelivered_path, encoding="utf-8") as lines:
        for line in lines:
            part = message_part(line.rstrip("\n"))
            if part is None:
                known = False
                continue
            batch.append((signed(part[0]), part[1]))
            if len(batch) >= _FLUSH_ROWS:
                db.executemany(upsert, batch)
                batch.clear()
    if handed.partial is not None:
        batch.append((signed(handed.partial[0]), handed.partial[1]))
    db.executemany(upsert, batch)
    return known
