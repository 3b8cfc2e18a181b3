"""
Progress lines of a sync every ``progress_interval`` seconds (docs/delivery.md, "Progress lines").

A small thread writes them, so the row loop pays nothing: it only reads counts the sync keeps anyway and
the last delivery report. Started before Looker is asked, so the wait for its answer is reported too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

__all__ = ["SyncProgress"]


class SyncProgress:
    """
    Log a progress line every ``interval`` seconds until stopped (use it as a context manager).

    :param look_id: the Look.
    :param log: where the lines go.
    :param interval: seconds between two lines; 0 or less logs none.
    :param dry_run: whether nothing is sent (the lines then say so and carry no delivery counts).
    :param label: how the lines name the source (``Query 123``); default ``Look <look_id>``.
    """

    def __init__(
        self,
        look_id: str,
        log: logging.Logger | Any,
        interval: float,
        *,
        dry_run: bool,
        label: str | None = None,
    ) -> None:
        self._look_id = look_id
        self._label = label or f"Look {look_id}"
        self._rows_read: Callable[[], int] | None = None
        self._log = log
        self._interval = interval
        self._dry_run = dry_run
        self._started = self._reading_since = time.monotonic()
        self._report: Any = None
        self._sending = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reading(self, rows_read: Callable[[], int], *, sending: bool = True) -> None:
        """
        Follow the rows read from now on.

        :param rows_read: returns the rows read so far (called from the thread; reading an ``int`` is atomic).
        :param sending: whether events go out while the rows are read; ``False`` for a changed-only sync,
            which reads the whole Look and compares it with its state first (then :meth:`sending`).
        """
        self._rows_read = rows_read
        self._reading_since = time.monotonic()
        self._sending = sending

    def sending(self) -> None:
        """The whole Look was read (a changed-only sync): the events go out from now on."""
        self._sending = True

    def delivered(self, report: Any) -> None:
        """
        Keep the Segment hook's latest delivery report (the ``progress`` callback of ``SegmentHook.send``);
        the next line shows its counts.
        """
        self._report = report

    def line(self) -> str:
        """The progress line as of now."""
        now = time.monotonic()
        rows = self._rows_read() if self._rows_read is not None else 0
        if rows == 0:
            return f"{self._label}: waiting for Looker's answer ({now - self._started:,.0f} s)"
        rate = f"{rows / max(now - self._reading_since, 1e-9):,.0f} rows/s"
        if self._dry_run:
            return f"{self._label}: {rows:,} rows read ({rate}); dry run, nothing sent"
        if not self._sending:
            return f"{self._label}: {rows:,} rows read ({rate}), to compare with the sync state"
        report = self._report
        if report is None:
            return f"{self._label}: {rows:,} rows read, sending to Segment ({rate})"
        return (
            f"{self._label}: {rows:,} rows read, {report.delivered:,} events delivered, "
            f"{report.rejected:,} rejected, {report.failed:,} failed ({rate})"
        )

    def __enter__(self) -> SyncProgress:
        self._started = self._reading_since = time.monotonic()
        if self._interval > 0:
            self._thread = threading.Thread(
                target=self._run, name=f"lsg-progress-{self._look_id}", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._log.info("%s", self.line())
