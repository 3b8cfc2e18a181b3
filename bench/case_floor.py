"""
Benchmark child: the floor - our own CPU cost with the network taken away.

The Look's ``json_detail`` body, fetched once from the Looker stand-in before timing into a file on a RAM
file system (``/dev/shm``), is parsed by the LookerHook's own :class:`LookStream` (rows decoded by
msgspec a chunk at a time, the head by ijson's fastest backend), planned and transformed by
``plan_transform`` / ``make_row_transformer`` with the operator's defaults and message-id namespace, split
by the SegmentHook's :class:`Batcher` into the same batches, each joined into its request body
(``Batch.body``) as the hook does before posting it. Nothing is sent.

Config (JSON argument): ``look_id``, ``body_path``, ``run_id``; ``profile: true`` runs the pipeline under
cProfile and adds the functions with the most own time to the result (its timings are then inflated).
"""

from __future__ import annotations

from probe import Probe, read_config

PROBE = Probe()

import cProfile  # noqa: E402
import pstats  # noqa: E402
from collections.abc import Callable, Iterable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

from looks import look_info  # noqa: E402

from airflow_provider_looker_segment import PACKAGE_NAME, __version__  # noqa: E402
from airflow_provider_looker_segment.batching import Batch, Batcher, format_sent_at  # noqa: E402
from airflow_provider_looker_segment.look_stream import IJSON, LookStream  # noqa: E402
from airflow_provider_looker_segment.transform import (  # noqa: E402
    build_message_id_namespace,
    make_row_transformer,
    plan_transform,
)

DAG_ID = "bench_looker_to_segment"
TASK_ID = "sync"
#: Functions listed by the profile.
PROFILE_TOP = 15


def _messages(rows: Iterable[dict[str, Any]], transform: Callable[[Any], tuple[Any, Any]]) -> Iterator[dict]:
    """Rows to messages, skipping invalid rows (the operator's loop, without its counters)."""
    for row in rows:
        message, _reason = transform(row)
        if message is not None:
            yield message


def pipeline(config: dict[str, Any]) -> dict[str, int]:
    """Parse, transform and batch the stored body once; return the counts."""
    look_id = str(config["look_id"])
    events = batches = body_bytes = rejected = 0
    with open(config["body_path"], "rb") as body:
        stream = LookStream(look_id, body, look_info(look_id), -1)
        plan = plan_transform(stream.meta)
        namespace = build_message_id_namespace(
            dag_id=DAG_ID, task_id=TASK_ID, run_id=config["run_id"], map_index=-1, look_id=look_id
        )
        transform = make_row_transformer(
            plan,
            ran_at=stream.meta.ran_at,
            message_id_namespace=namespace,
            library={"name": PACKAGE_NAME, "version": __version__},
        )
        for item in Batcher().split(_messages(stream.rows, transform)):
            if isinstance(item, Batch):
                events += len(item)
                batches += 1
                body_bytes += len(item.body(format_sent_at()))
            else:
                rejected += 1
        rows = stream.row_count
    return {
        "rows": rows,
        "sent": events,
        "rejected": rejected,
        "failed": 0,
        "batches": batches,
        "bytes": body_bytes,
    }


def top_functions(profiler: cProfile.Profile, count: int = PROFILE_TOP) -> list[dict[str, Any]]:
    """The functions with the most own time: name, calls, own seconds, cumulative seconds."""
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, name), (_prim, calls, own, cumulative, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = filename.split("airflow_provider_looker_segment/")[-1] if "/" in filename else filename
        label = f"{where}:{line}({name})" if line else name
        rows.append({"function": label, "calls": calls, "own_s": own, "cumulative_s": cumulative})
    rows.sort(key=lambda row: -row["own_s"])
    return rows[:count]


def main() -> None:
    """Run the floor once (optionally profiled); print the measurements and the counts."""
    config = read_config()
    PROBE.mark("imported")
    extra: dict[str, Any] = {"ijson_backend": getattr(IJSON, "backend_name", "?")}
    if config.get("profile"):
        profiler = cProfile.Profile()
        counts = profiler.runcall(pipeline, config)
        extra["profile"] = top_functions(profiler)
    else:
        counts = pipeline(config)
    PROBE.mark("done")
    PROBE.emit(**counts, **extra)


if __name__ == "__main__":
    main()
