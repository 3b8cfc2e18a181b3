"""
The row path of issue 14, old against new: parse + transform + batch (the floor, as ``bench/case_floor.py``
runs it), on the same machine, in the same run, interleaved.

``old`` is the package at a git revision (``--old-ref``, read with ``git archive``; nothing in the repository
changes); ``new`` is the working tree. Each measurement is a fresh child process (``--child``) that imports
one of the two, reads the ``json_detail`` body of a generated Look of the Looker stand-in (written once to
``/dev/shm``, as the stand-in serves it) and runs one stage:

* ``parse``: ``LookStream`` over the body, every row read;
* ``transform``: + ``plan_transform`` / ``make_row_transformer`` with the operator's defaults;
* ``floor``: + ``Batcher().split`` and ``Batch.body``: ``bench/case_floor.py``'s pipeline;
* ``dedupe``: the floor with ``drop_duplicates`` between transform and batching, as the operator runs it.

The child measures with ``bench/probe.py`` (wall and CPU seconds of the stage, ``VmHWM`` peak RSS, RSS
after the imports) and a BLAKE2b digest of every batch body (with a fixed ``sentAt``): old and new must give
the same bytes, messageIds included. Results: the median of ``--repeats`` runs and the median of the
per-repeat old ÷ new ratios (the machine is shared: compare ratios measured together, not absolute figures).
``--profile`` adds a cProfile of the new floor; ``--candidates`` times, in one process and interleaved, the
ways of reading the rows that were considered (``json_detail`` or plain ``json``, ijson or orjson).

Usage::

    .venv/bin/python bench/profile_rows.py [--rows 100000,1000000] [--repeats 3] [--stages floor,...]
        [--old-ref 491ec37] [--profile] [--json results.json]
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PACKAGE = "airflow_provider_looker_segment"
#: The revision before issue 14's row path work.
DEFAULT_OLD_REF = "491ec37"
STAGES = ("parse", "transform", "floor", "dedupe")
DAG_ID, TASK_ID, RUN_ID = "bench_looker_to_segment", "sync", "manual__profile_rows"
SENT_AT = "2026-01-01T00:00:00.000Z"
PROFILE_TOP = 15


# --- the child ----------------------------------------------------------------------------------------------


def _messages(rows: Iterable[dict[str, Any]], transform: Callable[[Any], tuple[Any, Any]]) -> Iterator[dict]:
    """Rows to messages, skipping invalid rows (as bench/case_floor.py)."""
    for row in rows:
        message, _reason = transform(row)
        if message is not None:
            yield message


def run_stage(stage: str, body_path: str, look_id: str) -> dict[str, Any]:
    """Run one stage over the stored body; return its counts and the digest of the batch bodies."""
    from looks import look_info

    from airflow_provider_looker_segment import __version__
    from airflow_provider_looker_segment.batching import Batch, Batcher
    from airflow_provider_looker_segment.dedupe import DuplicateCounts, drop_duplicates
    from airflow_provider_looker_segment.look_stream import LookStream
    from airflow_provider_looker_segment.transform import (
        build_message_id_namespace,
        make_row_transformer,
        plan_transform,
    )

    digest = hashlib.blake2b(digest_size=16)
    events = batches = 0
    with open(body_path, "rb") as body:
        stream = LookStream(look_id, body, look_info(look_id), -1)
        if stage == "parse":
            for _row in stream.rows:
                pass
            return {"rows": stream.row_count, "events": 0, "batches": 0, "digest": ""}
        plan = plan_transform(stream.meta)
        namespace = build_message_id_namespace(
            dag_id=DAG_ID, task_id=TASK_ID, run_id=RUN_ID, map_index=-1, look_id=look_id
        )
        library = {"name": "airflow-provider-looker-segment", "version": __version__}
        transform = make_row_transformer(
            plan, ran_at=stream.meta.ran_at, message_id_namespace=namespace, library=library
        )
        messages = _messages(stream.rows, transform)
        if stage == "transform":
            for message in messages:
                digest.update(message.encoded)
                events += 1
        else:
            if stage == "dedupe":
                messages = drop_duplicates(messages, DuplicateCounts())
            for item in Batcher().split(messages):
                if isinstance(item, Batch):
                    events += len(item)
                    batches += 1
                    digest.update(item.body(SENT_AT))
    return {"rows": stream.row_count, "events": events, "batches": batches, "digest": digest.hexdigest()}


def child(config: dict[str, Any]) -> None:
    """A measured child: import the row path, run one stage, print the probe's result line."""
    sys.path.insert(0, str(BENCH))
    from probe import Probe

    probe = Probe()
    import airflow_provider_looker_segment.batching
    import airflow_provider_looker_segment.dedupe
    import airflow_provider_looker_segment.look_stream
    import airflow_provider_looker_segment.transform

    where = str(Path(airflow_provider_looker_segment.look_stream.__file__).resolve().parent.parent)
    probe.mark("imported")
    if config.get("profile"):
        profiler = cProfile.Profile()
        counts = profiler.runcall(run_stage, config["stage"], config["body_path"], config["look_id"])
        counts["profile"] = top_functions(profiler)
    else:
        counts = run_stage(config["stage"], config["body_path"], config["look_id"])
    probe.mark("done")
    probe.emit(tree=where, **counts)


def top_functions(profiler: cProfile.Profile, count: int = PROFILE_TOP) -> list[dict[str, Any]]:
    """The functions with the most own time: name, calls, own seconds, cumulative seconds."""
    rows = []
    for (filename, line, name), (_p, calls, own, cumulative, _c) in pstats.Stats(profiler).stats.items():  # type: ignore[attr-defined]
        where = filename.split(f"{PACKAGE}/")[-1] if "/" in filename else filename
        rows.append(
            {
                "function": f"{where}:{line}({name})" if line else name,
                "calls": calls,
                "own_s": own,
                "cumulative_s": cumulative,
            }
        )
    rows.sort(key=lambda row: -row["own_s"])
    return rows[:count]


# --- the candidates ----------------------------------------------------------------------------------------


def _chunks(rows: bytes) -> Iterator[bytes]:
    """JSON arrays of the items in ``rows``, of about CHUNK_BYTES each, cut at row ends."""
    from airflow_provider_looker_segment.look_stream import CHUNK_BYTES, _row_end

    start = 0
    while start < len(rows):
        cut = _row_end(rows, min(len(rows), start + CHUNK_BYTES))
        cut = len(rows) if cut <= start else cut
        yield b"[" + rows[start:cut] + b"]"
        start = cut + 1


def candidates(rows: int, directory: Path, repeats: int) -> list[tuple[str, float, float]]:
    """
    Time the ways of reading a Look's rows that were considered, in this process, interleaved: (name, best
    CPU µs/row, median CPU µs/row). Every candidate must give the same rows (checked on the first repeat); the
    orjson ones check that no value is a float (orjson reads a fraction, an exponent or a huge int as one).
    """
    import io
    import time
    from decimal import Decimal
    from itertools import chain

    import msgspec
    import orjson
    from looks import look_info

    from airflow_provider_looker_segment.look_stream import _CELL_ROWS, IJSON, LookStream

    sys.path.insert(0, str(REPO / "tests"))
    from standins.looker_fixtures import JSON, generated_look
    from standins.looker_http import result_pieces

    look_id, detail_path = write_body(rows, directory)
    detail = detail_path.read_bytes()
    detail_rows = detail[detail.index(b'"data":[') + 8 : detail.rindex(b"]")]
    plain = b"".join(
        piece for piece, _n in result_pieces(generated_look(rows), JSON, {"limit": "-1"}, 2000, None, False)
    )
    exact = frozenset({str, int, bool, type(None)})
    any_json = msgspec.json.Decoder(float_hook=Decimal)

    def checked(chunk: list[Any]) -> list[Any]:
        if not exact.issuperset(map(type, chain.from_iterable(map(dict.values, chunk)))):
            raise AssertionError("a float: the chunk would have to be read again exactly")
        return chunk

    def detail_ijson() -> list[Any]:  # before: ijson's rows of {"value": ...} cells, unwrapped
        items = IJSON.items(io.BytesIO(detail), "data.item", use_float=False, buf_size=128 * 1024)
        return [{k: c["value"] for k, c in raw.items()} for raw in items]

    def detail_orjson() -> list[Any]:
        out: list[Any] = []
        for data in _chunks(detail_rows):
            out += checked([{k: c["value"] for k, c in raw.items()} for raw in orjson.loads(data)])
        return out

    def detail_msgspec() -> list[Any]:
        out: list[Any] = []
        for data in _chunks(detail_rows):
            out += [{k: c.value for k, c in raw.items()} for raw in _CELL_ROWS.decode(data)]
        return out

    def look_stream() -> list[Any]:  # now
        return list(LookStream(look_id, io.BytesIO(detail), look_info(look_id), -1).rows)

    def plain_ijson() -> list[Any]:
        return list(IJSON.items(io.BytesIO(plain), "item", use_float=False, buf_size=128 * 1024))

    def plain_orjson() -> list[Any]:
        return [row for data in _chunks(plain[1:-1]) for row in checked(orjson.loads(data))]

    def plain_msgspec() -> list[Any]:
        return [row for data in _chunks(plain[1:-1]) for row in any_json.decode(data)]

    functions = {
        "json_detail, ijson items, unwrapped (before)": detail_ijson,
        "json_detail, orjson chunks, unwrapped, floats checked": detail_orjson,
        "json_detail, msgspec chunks into cells, unwrapped": detail_msgspec,
        "json_detail, LookStream now (msgspec chunks, with its reads, checks and row counts)": look_stream,
        "json (plain rows), ijson items": plain_ijson,
        "json (plain rows), orjson chunks, floats checked": plain_orjson,
        "json (plain rows), msgspec chunks": plain_msgspec,
    }
    runs: dict[str, list[float]] = {}
    reference = None
    for repeat in range(repeats):
        for name, function in functions.items():
            started = time.process_time()
            result = function()
            runs.setdefault(name, []).append((time.process_time() - started) / rows * 1e6)
            if repeat == 0:
                reference = reference or result
                if result != reference:
                    raise AssertionError(f"{name} gives other rows")
            del result
    return [(name, min(times), statistics.median(times)) for name, times in runs.items()]


# --- the launcher -------------------------------------------------------------------------------------------


def write_body(rows: int, directory: Path) -> tuple[str, Path]:
    """Write the stand-in's json_detail body of its generated Look of ``rows`` rows: (Look id, path)."""
    sys.path.insert(0, str(REPO / "tests"))
    from standins.looker_fixtures import GENERATED_LOOK_BASE, JSON_DETAIL, generated_look
    from standins.looker_http import result_pieces

    look = generated_look(rows)
    path = directory / f"profile_rows_{rows}.json"
    with open(path, "wb") as out:
        for piece, _count in result_pieces(look, JSON_DETAIL, {"limit": "-1"}, 2000, None, False):
            out.write(piece)
    return str(GENERATED_LOOK_BASE + rows), path


def old_tree(ref: str, directory: Path) -> Path:
    """The package as it was at ``ref`` (``git archive``: nothing in the repository changes)."""
    root = directory / "old"
    root.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, PACKAGE], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    return root


def measure(root: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Run one child with ``root`` first on its path; return its result line."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(BENCH)]))
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(config)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=str(BENCH),
    )
    line = next(text for text in done.stdout.splitlines() if text.startswith("BENCH_RESULT "))
    result = json.loads(line.removeprefix("BENCH_RESULT "))
    if Path(result["tree"]).resolve() != root.resolve():
        raise RuntimeError(f"the child imported {result['tree']}, not {root}")
    return result


def summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Median figures of repeated runs of one variant."""
    rows = runs[0]["rows"]
    return {
        "rows_per_s": statistics.median(rows / r["pipeline"]["wall"] for r in runs),
        "cpu_s": statistics.median(r["pipeline"]["cpu"] for r in runs),
        "cpu_us_per_row": statistics.median(r["pipeline"]["cpu"] / rows * 1e6 for r in runs),
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "growth_mb": statistics.median(r["peak_rss_mb"] - r["rss_before_pipeline_mb"] for r in runs),
        "gc_s": statistics.median(r["gc_seconds"] for r in runs),
        "gc_passes": runs[0]["gc_passes"],
    }


def main() -> None:
    """Measure old and new, interleaved; print a Markdown report (and the raw results with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rows", default="100000,1000000", help="Look sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--old-ref", default=DEFAULT_OLD_REF)
    parser.add_argument("--profile", action="store_true", help="add a cProfile of the new floor (100k rows)")
    parser.add_argument("--candidates", action="store_true", help="time the ways of reading rows considered")
    parser.add_argument("--json", help="write the raw results to this file")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    sizes = [int(text) for text in args.rows.split(",")]
    stages = [stage for stage in args.stages.split(",") if stage]
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        bodies = {rows: write_body(rows, Path(tmp)) for rows in sizes}
        trees = {"old": old_tree(args.old_ref, Path(tmp)), "new": REPO}
        results: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
        for repeat in range(args.repeats):
            for rows in sizes:
                look_id, path = bodies[rows]
                for stage in stages:
                    order = ("old", "new") if repeat % 2 == 0 else ("new", "old")
                    for variant in order:
                        config = {"stage": stage, "body_path": str(path), "look_id": look_id}
                        result = measure(trees[variant], config)
                        results.setdefault((rows, stage, variant), []).append(result)
                        print(f"# {repeat + 1}/{args.repeats} {rows:,} {stage} {variant}", file=sys.stderr)
        profile = None
        if args.profile:
            look_id, path = bodies[min(sizes)]
            config = {"stage": "floor", "body_path": str(path), "look_id": look_id, "profile": True}
            profile = measure(REPO, config)
    report(results, sizes, stages, args, profile)
    if args.candidates:
        sys.path.insert(0, str(BENCH))
        with tempfile.TemporaryDirectory(dir=shm) as tmp:
            found = candidates(min(sizes), Path(tmp), max(3, args.repeats))
        print(f"\nReading the rows of a generated Look of {min(sizes):,} rows (CPU µs/row, one process):\n")
        print("| Format and parser | best | median |\n|---|---:|---:|")
        for name, best, median in found:
            print(f"| {name} | {best:.2f} | {median:.2f} |")
    if args.json:
        raw = {f"{rows} {stage} {variant}": runs for (rows, stage, variant), runs in results.items()}
        Path(args.json).write_text(json.dumps({"runs": raw, "profile": profile}, indent=1))


def report(
    results: dict[tuple[int, str, str], list[dict[str, Any]]],
    sizes: list[int],
    stages: list[str],
    args: argparse.Namespace,
    profile: dict[str, Any] | None,
) -> None:
    """Print the Markdown tables."""
    print(f"Old: the row path at {args.old_ref}; new: the working tree; {args.repeats} interleaved runs.\n")
    print(
        "| Rows | Stage | old rows/s | new rows/s | new ÷ old rows/s | old CPU µs/row | new CPU µs/row | "
        "old ÷ new CPU | old / new GC s | old peak RSS MB (growth) | new peak RSS MB (growth) | same bytes |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for rows in sizes:
        for stage in stages:
            old, new = results[(rows, stage, "old")], results[(rows, stage, "new")]
            a, b = summary(old), summary(new)
            pairs = list(zip(old, new, strict=True))
            ratio = statistics.median(o["pipeline"]["wall"] / n["pipeline"]["wall"] for o, n in pairs)
            cpu_ratio = statistics.median(o["pipeline"]["cpu"] / n["pipeline"]["cpu"] for o, n in pairs)
            same = len({(r["rows"], r["events"], r["batches"], r["digest"]) for r in old + new}) == 1
            print(
                f"| {rows:,} | {stage} | {a['rows_per_s']:,.0f} | {b['rows_per_s']:,.0f} | {ratio:.2f}x | "
                f"{a['cpu_us_per_row']:.2f} | {b['cpu_us_per_row']:.2f} | {cpu_ratio:.2f}x | "
                f"{a['gc_s']:.2f} / {b['gc_s']:.2f} | "
                f"{a['peak_rss_mb']:.0f} "
                f"({a['growth_mb']:+.0f}) | {b['peak_rss_mb']:.0f} ({b['growth_mb']:+.0f}) | "
                f"{'yes' if same else 'NO'} |"
            )
    if profile:
        print(f"\ncProfile of the new floor, {profile['rows']:,} rows (own time; cProfile slows calls):\n")
        print("| Function | calls | own s | cumulative s |\n|---|---:|---:|---:|")
        for entry in profile["profile"]:
            print(
                f"| `{entry['function']}` | {entry['calls']:,} | {entry['own_s']:.3f} | "
                f"{entry['cumulative_s']:.3f} |"
            )


if __name__ == "__main__":
    main()
