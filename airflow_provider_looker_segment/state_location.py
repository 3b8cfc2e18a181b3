"""
Where a changed-only sync keeps its state: the ``state_path`` folder (local or any ObjectStoragePath URL), the
warning when it is local but tasks may run on several machines, and the state's key (docs/changed-only.md).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from airflow.sdk import ObjectStoragePath

from airflow_provider_looker_segment.exceptions import InvalidParameterError
from airflow_provider_looker_segment.params import to_optional_str
from airflow_provider_looker_segment.settings import SyncOptions
from airflow_provider_looker_segment.sync_run import CohortStateStore
from airflow_provider_looker_segment.sync_state import check_state_key, legacy_sync_keys, sync_key

#: Executors that run every task on the scheduler's machine: local state is shared by all of them.
LOCAL_EXECUTORS = frozenset({"LocalExecutor", "SequentialExecutor", "DebugExecutor"})
#: Folder of the state files under AIRFLOW_HOME when ``state_path`` is not given.
DEFAULT_STATE_FOLDER = "looker_segment_state"


def warn_if_state_is_local(state_path: ObjectStoragePath, log: logging.Logger | Any) -> None:
    """Warn when the changed-only state is on local disk but tasks may run on several machines."""
    if state_path.protocol not in ("", "file", "local"):
        return
    remote = sorted(set(_configured_executors()) - LOCAL_EXECUTORS)
    if remote:
        log.warning(
            "sync_mode='changed' keeps its state on this worker's local disk (%s) but the executor (%s) "
            "may run the next run on another machine, which would not see it and would send everyone "
            "again. Set state_path to shared storage, e.g. s3://aws_default@bucket/looker-segment/.",
            state_path,
            ", ".join(remote),
        )


def _configured_executors() -> list[str]:
    """The executor class names of ``[core] executor`` (a comma-separated list, entries may be aliased)."""
    from airflow.configuration import conf

    names = conf.get("core", "executor", fallback="") or ""
    return [entry.split(":")[-1].strip().rsplit(".", 1)[-1] for entry in names.split(",") if entry.strip()]


def state_folder(state_path: str | ObjectStoragePath | None) -> ObjectStoragePath:
    """The folder of the sync state files: ``state_path``, else ``$AIRFLOW_HOME/looker_segment_state``."""
    if isinstance(state_path, ObjectStoragePath):
        return state_path
    text = to_optional_str(state_path)
    if text is None:
        home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
        text = os.path.join(home, DEFAULT_STATE_FOLDER)
    if (
        "://" not in text
        and re.match(r"[A-Za-z][A-Za-z0-9+.-]*:(?![\\/])", text)
        and not re.match(r"[A-Za-z]:[\\/]", text)
    ):
        raise InvalidParameterError(
            f"state_path {text!r} looks like a URL without '//': write a local folder as a path "
            "(/var/lib/looker-segment or file:///var/lib/looker-segment) or a URL as scheme://..., e.g. "
            "s3://bucket/looker-segment/"
        )
    if "://" not in text:
        text = "file://" + os.path.abspath(os.path.expanduser(text))
    return ObjectStoragePath(text)


def open_state_store(
    options: SyncOptions, base_url: str, write_key: str, log: logging.Logger | Any
) -> CohortStateStore:
    """
    The state store of a changed-only sync: in ``state_path`` (warned about when local on a multi-machine
    executor), keyed by ``state_key`` or else by the source, the call type and the Segment source.

    :param options: the sync's options (``state_path``, ``state_key``, the source, ``call``, ``event``).
    :param base_url: the Segment connection's API URL.
    :param write_key: the Segment source's write key (hashed into the key, never stored).
    :param log: where the warning and the state's location go.
    """
    state_path = state_folder(options.state_path)
    warn_if_state_is_local(state_path, log)
    own_key, source = options.state_key, options.source
    key = sync_key(
        source.id if source.is_look else None,
        base_url,
        write_key,
        call=options.call,
        state_key=None if own_key is None else check_state_key(own_key),
        query_id=None if source.is_look else source.id,
    )
    legacy = (
        ()
        if own_key or not source.is_look
        else legacy_sync_keys(options.look_id, base_url, write_key, call=options.call, event=options.event)
    )
    log.info("Sync state: %s/%s.state", state_path, key)
    return CohortStateStore(state_path, key, legacy_keys=legacy)
