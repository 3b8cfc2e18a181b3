"""
The local spool of a changed-only run: every row of the Look on disk, so that memory stays flat.

Each message's encoding is appended to one flat file (read back by offset for the calls to send), and a
record of it to one of 256 partition files chosen by the top byte of its identity hash: ``(identity hash,
row number, traits digest, kind, identity, alt, offset, length)``, written in ``marshal`` chunks of
:data:`CHUNK_RECORDS`. The identity hashes of a partition form one contiguous range, as do the rows of the
state's ``identities`` table (ordered by hash), so a partition of the Look is compared with a range of the
state, a 256th of each at a time (see :mod:`~airflow_provider_looker_segment.sync_run`).

Partition files also hold *claims*: a row with a userId and an anonymousId (its own, or derived from its
email) claims that anonymousId, in the partition of the anonymousId's hash, so that a member the state knew
by that anonymousId is found as the same member.
"""

from __future__ import annotations

import hashlib
import marshal
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import orjson

from airflow_provider_looker_segment.transform import complete_encoding

#: Partitions of a spool: the top byte of the (signed) identity hash, plus 128.
PARTITIONS: Final = 256
#: Records kept in memory per partition before they are written (so at most 256 x this many in memory).
CHUNK_RECORDS = 128
#: A partition with more records than this is compared in slices of at most about as many (a slice is a
#: contiguous range of identity hashes: 2, 4, ... 256 of them per partition), so that the working set of a
#: comparison does not grow with the cohort.
SLICE_RECORDS = 8_192
#: 32 hex digits of the messageId and ``"}`` end every message the transform encodes.
MESSAGE_ID_TAIL: Final = 34
_U64: Final = 1 << 64
_ROW, _CLAIM = 0, 1


def partition_range(partition: int) -> tuple[int, int]:
    """The signed identity hashes of a partition: ``lo <= ihash <= hi``."""
    lo = (partition - 128) << 56
    return lo, lo + (1 << 56) - 1


def encode(message: Mapping[str, Any]) -> bytes:
    """Encode a message that carries no encoding, its messageId last (as the transform writes it)."""
    from airflow_provider_looker_segment.batching import encode_event

    if not isinstance(message.get("messageId"), str):
        raise ValueError(f"a message to spool needs a messageId, not {message.get('messageId')!r}")
    return encode_event(
        {**{k: v for k, v in message.items() if k != "messageId"}, "messageId": message["messageId"]}
    )


class Spool:
    """
    The spool of one run, in ``folder``: ``bodies`` and ``part-<n>`` files.

    :param folder: a local folder of the run (removed with it).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._bodies = open(folder / "bodies", "wb", buffering=1 << 20)
        self._files: list[Any] = [None] * PARTITIONS
        self._buffers: list[list[tuple]] = [[] for _ in range(PARTITIONS)]
        self._reader: int | None = None
        self._written: set[int] = set()
        self._counts = [0] * PARTITIONS
        self.rows = 0
        self.bytes = 0
        self.tail = b""
        self.hasher: Any = None

    def write(
        self,
        messages: Iterable[Mapping[str, Any]],
        *,
        tail: bytes | None,
        by_group: bool,
        claims: bool,
        hasher: Any = None,
    ) -> None:
        """
        Spool messages in the Look's order.

        :param messages: calls with an ``encoded`` attribute (the transform's) or encodable JSON; an ``alias``
            attribute is the anonymousId derived from the row's email.
        :param tail: the bytes every encoding of the run carries before the messageId's 32 hex digits: kept
            once, not per row.
        :param by_group: the messages are group calls (keyed by their ``groupId``).
        :param claims: write claims (a userId row's anonymousId), to find members whose identity switched.
        :param hasher: with messages made with ``defer_message_id`` (their ``encoded`` is the head only), the
            transform's messageId hash: the encoding is completed when read (:meth:`body`).
        """
        blake2b, dumps, sort_keys, from_bytes, u64 = (
            hashlib.blake2b,
            orjson.dumps,
            orjson.OPT_SORT_KEYS,
            int.from_bytes,
            _U64,
        )
        write, buffers, flush = self._bodies.write, self._buffers, self._flush
        tail_start = -(MESSAGE_ID_TAIL + len(tail)) if tail else 0
        pos, seq = self.bytes, self.rows
        user_prefix, anon_prefix, group_prefix = b"userId:", b"anonymousId:", b"groupId:"
        for message in messages:
            alt = None
            if by_group:
                kind, text, prefix = 2, message["groupId"], group_prefix
            else:
                text = message.get("userId")
                if text:
                    kind, prefix = 0, user_prefix
                    if claims:
                        other = message.get("anonymousId") or getattr(message, "alias", None)
                        if other:
                            value = from_bytes(
                                blake2b(
                                    anon_prefix + other.encode("utf-8", "surrogatepass"), digest_size=8
                                ).digest(),
                                "big",
                            )
                            alt = value - u64 if value >> 63 else value
                else:
                    kind, text, prefix = 1, message["anonymousId"], anon_prefix
            identity = text.encode("utf-8", "surrogatepass")
            value = from_bytes(blake2b(prefix + identity, digest_size=8).digest(), "big")
            ihash = value - u64 if value >> 63 else value
            values = message["traits"] if "traits" in message else message["properties"]
            value = from_bytes(blake2b(dumps(values, option=sort_keys), digest_size=8).digest(), "big")
            digest = value - u64 if value >> 63 else value
            body = getattr(message, "encoded", None)
            if body is None:
                body = encode(message)
                length = len(body) * 2
            elif hasher is not None:
                length = len(body) * 2 + 1  # odd: a head, completed when read
            elif tail_start and body[tail_start:-MESSAGE_ID_TAIL] == tail:
                body = body[:tail_start] + body[-MESSAGE_ID_TAIL:]
                length = len(body) * 2 + 1  # odd: the tail was taken out
            else:
                length = len(body) * 2
            write(body)
            part = (ihash >> 56) + 128
            buffer = buffers[part]
            buffer.append((_ROW, ihash, seq, digest, kind, identity, alt, pos, length))
            if len(buffer) >= CHUNK_RECORDS:
                flush(part)
            if alt is not None:
                part = (alt >> 56) + 128
                buffer = buffers[part]
                buffer.append((_CLAIM, alt, seq, ihash))
                if len(buffer) >= CHUNK_RECORDS:
                    flush(part)
            pos += length >> 1
            seq += 1
        self.rows, self.bytes, self.tail, self.hasher = seq, pos, tail or b"", hasher

    def close_writing(self) -> None:
        """Write what is buffered and close the files written."""
        for part in range(PARTITIONS):
            if self._buffers[part]:
                self._flush(part)
            if self._files[part] is not None:
                self._files[part].close()
                self._files[part] = None
        self._bodies.close()
        self._reader = os.open(self.folder / "bodies", os.O_RDONLY)

    def _flush(self, part: int) -> None:
        self._counts[part] += len(self._buffers[part])
        data = marshal.dumps(self._buffers[part])
        if self._files[part] is None:
            self._files[part] = open(self.folder / f"part-{part}", "ab", buffering=0)
            self._written.add(part)
        self._files[part].write(len(data).to_bytes(4, "little") + data)
        self._buffers[part].clear()

    def slices(
        self, part: int, expected_state: int = 0
    ) -> Iterator[tuple[int, int, list[tuple], list[tuple]]]:
        """
        A partition in slices, in hash order: ``(lo, hi, rows, claims)``, the slice's identity hashes from
        ``lo`` to ``hi``, its rows ``(ihash, seq, digest, kind, identity, alt, pos, length)`` in the Look's
        order and its claims ``(alt, seq, claimer ihash)``.

        :param expected_state: how many identities of the state fall in the partition (so that a slice holds
            about :data:`SLICE_RECORDS` of the Look's records or of the state's, whichever is more).
        """
        lo, hi = partition_range(part)
        bits = max(0, (max(self._counts[part], expected_state) - 1) // SLICE_RECORDS).bit_length()
        bits = min(bits, 8)
        if not bits:
            rows, claims = self._read(self.folder / f"part-{part}") if part in self._written else ([], [])
            yield lo, hi, rows, claims
            return
        width, shift = 1 << (56 - bits), 56 - bits
        paths = self._split(part, bits, shift)
        for index in range(1 << bits):
            path = paths.get(index)
            rows, claims = self._read(path) if path is not None else ([], [])
            if path is not None:
                path.unlink()
            yield lo + index * width, lo + (index + 1) * width - 1, rows, claims

    def _split(self, part: int, bits: int, shift: int) -> dict[int, Path]:
        """Write a partition's records to ``1 << bits`` slice files; return the paths of those written."""
        if part not in self._written:
            return {}
        mask, paths = (1 << bits) - 1, {}
        buffers: list[list[tuple]] = [[] for _ in range(1 << bits)]
        files: dict[int, Any] = {}

        def flush(index: int) -> None:
            if index not in files:
                paths[index] = self.folder / f"part-{part}-{index}"
                files[index] = open(paths[index], "ab", buffering=0)
            data = marshal.dumps(buffers[index])
            files[index].write(len(data).to_bytes(4, "little") + data)
            buffers[index].clear()

        try:
            for chunk in self._chunks(self.folder / f"part-{part}"):
                for record in chunk:
                    index = (record[1] >> shift) & mask  # the row's hash, or the claimed anonymousId's
                    buffers[index].append(record)
                    if len(buffers[index]) >= CHUNK_RECORDS:
                        flush(index)
            for index, buffer in enumerate(buffers):
                if buffer:
                    flush(index)
        finally:
            for file in files.values():
                file.close()
        return paths

    @staticmethod
    def _chunks(path: Path) -> Iterator[list[tuple]]:
        with open(path, "rb") as file:
            while header := file.read(4):
                yield marshal.loads(file.read(int.from_bytes(header, "little")))

    def _read(self, path: Path) -> tuple[list[tuple], list[tuple]]:
        rows: list[tuple] = []
        claims: list[tuple] = []
        for chunk in self._chunks(path):
            for record in chunk:
                (rows if record[0] == _ROW else claims).append(record[1:])
        return rows, claims

    def body(self, pos: int, length: int) -> bytes:
        """A spooled encoding, with its tail put back."""
        body = os.pread(self._reader, length >> 1, pos)  # type: ignore[arg-type]
        if length & 1 and self.hasher is not None:
            return complete_encoding(body, self.tail, self.hasher)
        if length & 1:
            body = body[:-MESSAGE_ID_TAIL] + self.tail + body[-MESSAGE_ID_TAIL:]
        return body

    def close(self) -> None:
        """Close every file (the run removes the folder)."""
        for file in (*self._files, self._bodies):
            if file is not None:
                file.close()
        if self._reader is not None:
            os.close(self._reader)
            self._reader = None


def iter_chunks(values: list[tuple], size: int) -> Iterator[list[tuple]]:
    """``values`` in lists of at most ``size``."""
    for start in range(0, len(values), size):
        yield values[start : start + size]
