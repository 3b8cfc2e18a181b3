"""
Benchmark child: the Segment stand-in's ceiling for our batches.

Builds up to :data:`DISTINCT_BATCHES` request bodies exactly as the provider does (LookStream over the stored
body → transform → Batcher → ``Batch.body``), then posts them round-robin from 4 threads (the SegmentHook's
initial window), one ``requests`` session each, until at least ``events`` events were sent: the
events per second measured are how fast the stand-in takes our batches (and ``requests`` posts them). The
``imported`` mark follows the preparation.

Config (JSON argument): ``look_id``, ``body_path``, ``events``, ``segment_url``, ``write_key``.
"""

from __future__ import annotations

from probe import Probe, read_config

PROBE = Probe()

import base64  # noqa: E402
import itertools  # noqa: E402
import threading  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import requests  # noqa: E402
from looks import look_info  # noqa: E402

from airflow_provider_looker_segment.batching import Batch, Batcher, format_sent_at  # noqa: E402
from airflow_provider_looker_segment.look_stream import LookStream  # noqa: E402
from airflow_provider_looker_segment.transform import (  # noqa: E402
    make_row_transformer,
    plan_transform,
)

DISTINCT_BATCHES = 8
THREADS = 4


def prepare(look_id: str, body_path: str) -> list[tuple[bytes, int]]:
    """Up to DISTINCT_BATCHES ``(request body, events)`` pairs from the Look's first rows."""
    info = look_info(look_id)
    bodies: list[tuple[bytes, int]] = []
    with open(body_path, "rb") as body:
        stream = LookStream(look_id, body, info, -1)
        transform = make_row_transformer(
            plan_transform(stream.meta),
            ran_at=stream.meta.ran_at,
            message_id_namespace="ceiling",
        )
        messages = (message for message, _reason in map(transform, stream.rows) if message is not None)
        for item in Batcher().split(messages):
            if isinstance(item, Batch):
                bodies.append((item.body(format_sent_at()), len(item)))
                if len(bodies) == DISTINCT_BATCHES:
                    break
    return bodies


def main() -> None:
    """Post the prepared batches until ``events`` were sent; print the measurements."""
    config = read_config()
    bodies = prepare(str(config["look_id"]), config["body_path"])
    url = config["segment_url"].rstrip("/") + "/v1/batch"
    token = base64.b64encode(f"{config['write_key']}:".encode()).decode()
    headers = {"Content-Type": "application/json", "Authorization": f"Basic {token}"}
    plan: list[tuple[bytes, int]] = []
    total = 0
    for body, count in itertools.cycle(bodies):
        if total >= config["events"]:
            break
        plan.append((body, count))
        total += count
    local = threading.local()
    PROBE.mark("imported")

    def post(item: tuple[bytes, int]) -> int:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        response = session.post(url, data=item[0], headers=headers, timeout=60)
        return item[1] if response.status_code == 200 else 0

    with ThreadPoolExecutor(THREADS) as executor:
        accepted = sum(executor.map(post, plan))
    PROBE.mark("done")
    PROBE.emit(rows=total, sent=accepted, requests=len(plan), rejected=0, failed=total - accepted)


if __name__ == "__main__":
    main()
