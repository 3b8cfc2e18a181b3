"""
Flow control of a Segment delivery: :class:`FlowWindow` (how many batch requests in flight), :class:`Throttle`
(when the next one may start: the request rate, the ``events_per_second`` token bucket, Segment's
``Retry-After``) and :class:`PaceMeter` (the pace reached). Segment's limits and the knobs: docs/delivery.md.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable

#: Segment's guidance for the HTTP API: at most 1,000 requests per second per workspace.
SEGMENT_REQUESTS_PER_SECOND = 1000.0
#: Segment's inbound limit per workspace (its sources together) since 2024-01-25; beyond it Segment queues.
SEGMENT_EVENTS_PER_SECOND = 1000.0
#: With ``events_per_second``, a batch holds at most ``rate / PACED_BATCHES_PER_SECOND`` events (at least 1).
PACED_BATCHES_PER_SECOND = 10
#: Requests in flight before the first round trip has been measured (under the cap): a small Look's few
#: batches all go in the first round trip.
INITIAL_WINDOW = 8
#: In flight = batches per second x round trip x this, plus one: room for round trips longer than average.
HEADROOM = 1.5
#: Seconds below which two clock readings count as the same moment (sums of sleeps are not exact).
_EPSILON = 1e-9
#: Weight of a new sample in the moving averages of round trip, batch production time and batch size.
SMOOTHING = 0.25


def paced_batch_events(events_per_second: float, max_batch_events: int) -> int:
    """
    The most events one batch may carry under ``events_per_second``: a tenth of a second's worth, at least
    one, at most ``max_batch_events`` (why: docs/delivery.md, "Speed and pacing", ``events_per_second``).

    :param events_per_second: the pace.
    :param max_batch_events: the batcher's own cap.
    """
    return max(1, min(max_batch_events, int(events_per_second // PACED_BATCHES_PER_SECOND)))


def _average(old: float | None, sample: float, weight: float) -> float:
    """Exponentially weighted moving average; the first sample stands alone."""
    return sample if old is None else old + weight * (sample - old)


class FlowWindow:
    """
    How many batch requests may be in flight (not thread-safe: the delivery holds its lock).

    ``window = min(cap, ceiling, demand)``, at least 1, where

    * ``demand`` is what hides the round trip: ``ceil(rate x latency x headroom) + 1``, with ``rate`` the
      batches per second the caller produces (measured on its own working time, waits excluded), lowered to
      what the pacing lets through, and ``latency`` the moving average of accepted requests' round trips;
      :data:`INITIAL_WINDOW` until both are measured;
    * ``ceiling`` is the AIMD bound: it starts at ``cap``, halves (from the window in use) when a request
      sent since the last decrease meets a 429, 408, 5xx or a timeout (one decrease per congestion episode:
      requests already in flight when it happened do not halve it again), and grows by one each time a
      ceiling's worth of requests has been accepted.

    :param cap: the user's cap, ``max_in_flight``.
    :param requests_per_second: the request rate the throttle lets through (``None``: unlimited).
    :param events_per_second: the event rate the throttle lets through (``None``: unlimited).
    :param initial: the window before measurements.
    :param headroom: factor on rate x latency.
    :param smoothing: weight of a new sample in the moving averages.
    """

    def __init__(
        self,
        cap: int,
        *,
        requests_per_second: float | None = None,
        events_per_second: float | None = None,
        initial: int = INITIAL_WINDOW,
        headroom: float = HEADROOM,
        smoothing: float = SMOOTHING,
    ) -> None:
        if cap < 1:
            raise ValueError(f"the cap on requests in flight must be at least 1, not {cap}")
        self.cap = cap
        self.requests_per_second = requests_per_second
        self.events_per_second = events_per_second
        self.initial = max(1, min(cap, initial))
        self.headroom = headroom
        self.smoothing = smoothing
        self.ceiling = cap
        #: Moving average of accepted requests' round trips, seconds (``None`` before the first).
        self.latency: float | None = None
        #: Moving average of the caller's working seconds per batch (``None`` before the first batch).
        self.batch_seconds: float | None = None
        #: Moving average of events per batch.
        self.batch_events: float | None = None
        #: Congestion episodes so far; a request carries the epoch it was sent in (see :meth:`congested`).
        self.epoch = 0
        self.window = self.initial
        #: The largest window so far.
        self.peak = self.window
        self._accepted = 0

    def produced(self, seconds: float, events: int) -> None:
        """
        A batch is ready.

        :param seconds: the caller's working time for it (waits for room excluded).
        :param events: its events.
        """
        self.batch_seconds = _average(self.batch_seconds, max(0.0, seconds), self.smoothing)
        self.batch_events = _average(self.batch_events, float(events), self.smoothing)
        self._update()

    def accepted(self, seconds: float) -> None:
        """
        Segment accepted a request (2xx): measure its round trip, and grow the ceiling additively.

        :param seconds: from the request's start to its answer.
        """
        self.latency = _average(self.latency, max(0.0, seconds), self.smoothing)
        self._accepted += 1
        if self.ceiling < self.cap and self._accepted >= self.ceiling:
            self.ceiling += 1
            self._accepted = 0
        self._update()

    def congested(self, epoch: int) -> bool:
        """
        Segment pushed back (429, 408, 5xx, timeout) on a request sent in ``epoch``: halve the ceiling, once
        per episode. Return whether it was halved (``False`` for a request older than the last decrease).
        """
        if epoch != self.epoch:
            return False
        self.epoch += 1
        self.ceiling = max(1, min(self.ceiling, self.window) // 2)
        self._accepted = 0
        self._update()
        return True

    def batches_per_second(self) -> float:
        """The rate batches are produced at, lowered to what the pacing lets through (``inf`` if unknown)."""
        rate = 1.0 / self.batch_seconds if self.batch_seconds else math.inf
        if self.requests_per_second:
            rate = min(rate, self.requests_per_second)
        if self.events_per_second and self.batch_events:
            rate = min(rate, self.events_per_second / self.batch_events)
        return rate

    def demand(self) -> int:
        """Requests in flight that hide the round trip at the current rate (see the class)."""
        if self.latency is None or self.batch_seconds is None:
            return self.initial
        if self.latency <= 0:
            return 1
        needed = self.batches_per_second() * self.latency * self.headroom
        return self.cap if math.isinf(needed) else math.ceil(needed) + 1

    def _update(self) -> None:
        self.window = max(1, min(self.cap, self.ceiling, self.demand()))
        self.peak = max(self.peak, self.window)

    def describe(self) -> str:
        """One line for a task log."""
        latency = "not measured" if self.latency is None else f"{self.latency * 1000:,.0f} ms"
        return (
            f"up to {self.peak} requests in flight (cap {self.cap}; now {self.window}), round trip "
            f"{latency}, {self.epoch} slow-downs"
        )


class TokenBucket:
    """
    A token bucket of events (not thread-safe: :class:`Throttle` holds its lock).

    It fills at ``rate`` tokens per second up to ``capacity`` (default: one second's worth) and starts empty.
    A batch of N events takes N tokens; one larger than the capacity goes once the bucket is full and leaves
    a debt. Any T seconds carry at most ``capacity + rate x T`` events.

    :param rate: events per second.
    :param capacity: the most tokens the bucket holds (the largest burst after an idle time).
    """

    def __init__(self, rate: float, capacity: float | None = None) -> None:
        if not rate > 0:
            raise ValueError(f"the rate must be above 0, not {rate}")
        self.rate = rate
        self.capacity = capacity if capacity is not None else rate
        self.tokens = 0.0
        self.stamp: float | None = None  # the moment ``tokens`` was counted at

    def take(self, count: int, earliest: float) -> float:
        """
        Take ``count`` tokens; return the moment, not before ``earliest``, at which they may be spent.

        Reservations are served in call order: a later call never starts before an earlier one.
        """
        if self.stamp is None:
            self.stamp = earliest
        moment = max(earliest, self.stamp)
        tokens = min(self.capacity, self.tokens + (moment - self.stamp) * self.rate)
        need = min(float(count), self.capacity)
        if tokens < need:
            moment += (need - tokens) / self.rate
            tokens = need
        self.tokens = tokens - count
        self.stamp = moment
        return moment


class Throttle:
    """
    When the next request may start, shared by the senders (thread-safe): requests spaced ``1 /
    requests_per_second`` apart, events paced by a :class:`TokenBucket`, and pauses Segment asked for.

    :param requests_per_second: the request rate, ``None`` or 0 for none.
    :param events_per_second: the event rate, ``None`` or 0 for none.
    :param clock: monotonic seconds.
    :param burst: the most events the bucket holds (default: one second's worth); a paced delivery gives its
        largest batch (:func:`paced_batch_events`).
    """

    def __init__(
        self,
        requests_per_second: float | None,
        events_per_second: float | None,
        clock: Callable[[], float],
        burst: float | None = None,
    ) -> None:
        self._interval = 1.0 / requests_per_second if requests_per_second else 0.0
        self._bucket = TokenBucket(events_per_second, burst) if events_per_second else None
        self._clock = clock
        self._lock = threading.Lock()
        self._next_slot = 0.0
        self._paused_until = 0.0

    def pause_until(self, moment: float) -> None:
        """Hold every sender's next request until ``moment`` (a ``clock()`` reading)."""
        with self._lock:
            self._paused_until = max(self._paused_until, moment)

    def reserve(self, events: int = 0) -> float:
        """Take the next request slot for a batch of ``events``; return the seconds to wait before it."""
        with self._lock:
            now = self._clock()
            start = max(now, self._paused_until, self._next_slot)
            if self._bucket is not None and events:
                start = self._bucket.take(events, start)
            if self._interval:
                self._next_slot = start + self._interval
        return start - now


class PaceMeter:
    """
    Events Segment accepted, by the moment their request started (not thread-safe: the delivery holds its
    lock): how many, over how long, and the most that started within one second.

    The busiest second is counted over half-open windows ``[t, t + 1)`` ending at each request; requests that
    answer out of order are placed by their start, so the count holds unless one answers more than a second
    after a later one started.
    """

    def __init__(self) -> None:
        self.events = 0
        self.requests = 0
        #: When the first batch was ready (or the first accepted request started, if earlier) and the last
        #: accepted answer (``clock()`` readings).
        self.first: float | None = None
        self.last: float | None = None
        #: The most events in requests started within one second of each other.
        self.peak = 0
        self._starts: list[float] = []  # the last second's accepted requests, by start
        self._sizes: list[int] = []
        self._kept = 0  # events of the requests kept

    def begin(self, moment: float) -> None:
        """The first batch is ready at ``moment``: the delivery's time starts (later calls are ignored)."""
        if self.first is None:
            self.first = moment

    def record(self, started: float, answered: float, events: int) -> None:
        """Segment accepted a request of ``events`` started at ``started`` and answered at ``answered``."""
        self.events += events
        self.requests += 1
        self.first = started if self.first is None else min(self.first, started)
        self.last = answered if self.last is None else max(self.last, answered)
        starts, sizes = self._starts, self._sizes
        at = bisect.bisect_right(starts, started)
        starts.insert(at, started)
        sizes.insert(at, events)
        self._kept += events
        if at == len(starts) - 1:  # the usual case: the newest start; older than a second leaves the window
            drop = bisect.bisect_right(starts, started - 1.0 + _EPSILON)
            if drop:
                self._kept -= sum(sizes[:drop])
                del starts[:drop], sizes[:drop]
            self.peak = max(self.peak, self._kept)
            return
        window, low = 0, 0  # out of order: recount the windows ending at each request kept
        for index, start in enumerate(starts):
            window += sizes[index]
            while starts[low] <= start - 1.0 + _EPSILON:
                window -= sizes[low]
                low += 1
            self.peak = max(self.peak, window)

    @property
    def seconds(self) -> float:
        """From the first batch ready to the last accepted answer (0 before any)."""
        return 0.0 if self.first is None or self.last is None else max(0.0, self.last - self.first)

    def sustained(self) -> float:
        """Events per second over the delivery, counting at least one second (a small run is not a rate)."""
        return self.events / max(1.0, self.seconds)

    def over_limit(self, events_per_second: float | None) -> bool:
        """Whether an unpaced delivery sent more than Segment's 1,000 events within one second."""
        return not events_per_second and self.peak > SEGMENT_EVENTS_PER_SECOND

    def describe(self, events_per_second: float | None) -> str:
        """One line for the task log, with a hint when an unpaced delivery exceeded the workspace's limit."""
        line = (
            f"{self.events:,} events accepted in {self.seconds:.1f} s: {self.sustained():,.0f} events/s "
            f"sustained, at most {self.peak:,} in one second"
        )
        if events_per_second:
            return f"{line} (events_per_second {events_per_second:,g})"
        if self.over_limit(events_per_second):
            line += (
                f"; above Segment's {SEGMENT_EVENTS_PER_SECOND:,.0f} events per second per workspace, so "
                "Segment may queue the excess (nothing is dropped; destinations get the events later): set "
                "events_per_second to this task's share of 1,000 (divided among the tasks sending to the "
                "workspace at once) to stay within it"
            )
        return line
