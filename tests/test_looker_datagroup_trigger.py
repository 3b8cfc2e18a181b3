"""
LookerDatagroupTrigger against the Looker stand-in over HTTP: run directly (as ``run()`` does, the first
poll sets the baseline), with a state store of the shape Airflow 3.3 injects (``aget``/``aset``), and two
watchers sharing one poll through Airflow's own ``SharedStreamManager``; faults (429/5xx retried, unknown
datagroup, bad credentials) fail clearly and without secrets. The real triggerer, with its real state store,
is in tests/test_e2e_datagroup.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from looker_helpers import CLIENT_ID, CLIENT_SECRET, connection_json, set_connection
from standins.looker_standin import LookerStandIn

from airflow_provider_looker_segment.triggers.looker import (
    DEFAULT_DATAGROUP_POLL_INTERVAL,
    LookerDatagroupTrigger,
)
from airflow_provider_looker_segment.triggers.looker_datagroup import LookerDatagroupError

CONN_ID = "looker_datagroups"
MODEL, NAME = "toastmates", "nightly_etl"
WRONG_SECRET = "Wr0ng-Datagroup-S3cret"
#: Seconds a test waits at most for what the stand-in is asked to do (never a timing assertion).
PATIENCE = 20.0


@pytest.fixture
def looker(monkeypatch):
    with LookerStandIn() as standin:
        set_connection(monkeypatch, CONN_ID, connection_json(standin.base_url, CLIENT_ID, CLIENT_SECRET))
        yield standin


def trigger(name: str = NAME, *, poll_interval: float = 0.05, **kwargs: Any) -> LookerDatagroupTrigger:
    return LookerDatagroupTrigger(CONN_ID, MODEL, name, poll_interval, retry_backoff=0, **kwargs)


def polls(looker: LookerStandIn) -> int:
    return sum(1 for r in looker.requests if r.path == "/api/4.0/datagroups" and r.status == 200)


async def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, "the stand-in never saw what the test waited for"
        await asyncio.sleep(0.02)


def logged(caplog, capfd) -> str:
    """What the watch logged: the trigger's own log (stdout) and the shared poll's (a module logger)."""
    output = capfd.readouterr()
    return caplog.text + output.out + output.err


class MemoryStateStore:
    """An asset state store of the shape Airflow 3.3 injects into event triggers (``aget``, ``aset``)."""

    def __init__(self, values: dict[str, Any] | None = None) -> None:
        self.values = dict(values or {})

    async def aget(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    async def aset(self, key: str, value: Any) -> None:
        assert value is not None
        json.dumps(value)  # a JSON value, as the real store requires
        self.values[key] = value


async def next_event(run: Any, looker: LookerStandIn, *, after_polls: int, then: Callable[[], Any]) -> Any:
    """Wait for ``after_polls`` polls, call ``then`` (e.g. trigger the datagroup), return the next event."""
    pending = asyncio.ensure_future(run.__anext__())
    await until(lambda: polls(looker) >= after_polls)
    assert not pending.done(), "an event fired before the datagroup advanced"
    then()
    return await asyncio.wait_for(pending, PATIENCE)


# --- the watch --------------------------------------------------------------------------------------------


def test_an_event_each_time_triggered_at_advances(looker, caplog, capfd):
    async def scenario() -> list[Any]:
        run = trigger().run()
        events = []
        try:
            for _ in range(2):
                seen = polls(looker)
                events.append(
                    await next_event(
                        run, looker, after_polls=seen + 2, then=lambda: looker.datagroups.trigger(MODEL, NAME)
                    )
                )
        finally:
            await run.aclose()
        return events

    baseline = looker.datagroups.triggered_at(MODEL, NAME)
    first, second = asyncio.run(scenario())
    assert first.payload == {
        "model_name": MODEL,
        "datagroup_name": NAME,
        "triggered_at": second.payload["previous_triggered_at"],
        "previous_triggered_at": baseline,  # the first poll set the baseline: no event for it
    }
    assert second.payload["triggered_at"] == looker.datagroups.triggered_at(MODEL, NAME)
    assert "baseline triggered_at 1764547200 (2025-12-01T00:00:00Z) (first poll)" in "".join(
        capfd.readouterr()
    )
    # One login for every poll (the token is kept while valid), one logout when the watch ends.
    assert looker.counters["logins"] == 1 and looker.counters["logouts"] == 1


def test_a_refresh_while_the_triggerer_was_down_fires_at_once(looker):
    watch = trigger()
    older = looker.datagroups.triggered_at(MODEL, NAME) - 3600
    watch.asset_state_store = store = MemoryStateStore({watch.state_key: {"triggered_at": older}})

    async def first_event() -> Any:
        run = watch.run()
        try:
            return await asyncio.wait_for(run.__anext__(), PATIENCE)
        finally:
            await run.aclose()

    event = asyncio.run(first_event())
    current = looker.datagroups.triggered_at(MODEL, NAME)
    assert (event.payload["previous_triggered_at"], event.payload["triggered_at"]) == (older, current)
    assert store.values[watch.state_key] == {"triggered_at": current}  # remembered for the next restart


def test_a_restart_does_not_fire_again_for_a_refresh_already_seen(looker):
    watch = trigger()
    current = looker.datagroups.triggered_at(MODEL, NAME)
    watch.asset_state_store = store = MemoryStateStore({watch.state_key: {"triggered_at": current}})

    async def scenario() -> Any:
        run = watch.run()
        try:
            return await next_event(
                run, looker, after_polls=3, then=lambda: looker.datagroups.trigger(MODEL, NAME)
            )
        finally:
            await run.aclose()

    event = asyncio.run(scenario())
    assert event.payload["previous_triggered_at"] == current
    assert store.values[watch.state_key] == {"triggered_at": event.payload["triggered_at"]}


def test_without_a_stored_value_the_first_poll_sets_and_saves_the_baseline(looker):
    watch = trigger()
    watch.asset_state_store = store = MemoryStateStore()

    async def scenario() -> None:
        run = watch.run()
        pending = asyncio.ensure_future(run.__anext__())
        try:
            await until(lambda: watch.state_key in store.values)
        finally:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
            await run.aclose()

    asyncio.run(scenario())
    assert store.values == {watch.state_key: {"triggered_at": looker.datagroups.triggered_at(MODEL, NAME)}}


def test_a_datagroup_never_triggered_fires_when_it_first_is(looker):
    watch = LookerDatagroupTrigger(CONN_ID, "b2b", "accounts_refresh", 0.05)

    async def scenario() -> Any:
        run = watch.run()
        try:
            return await next_event(
                run, looker, after_polls=2, then=lambda: looker.datagroups.trigger("b2b", "accounts_refresh")
            )
        finally:
            await run.aclose()

    event = asyncio.run(scenario())
    assert event.payload["previous_triggered_at"] is None and event.payload["triggered_at"] > 0


# --- sibling watchers share one poll ----------------------------------------------------------------------


def test_sibling_watchers_share_one_poll(looker):
    from airflow.triggers.shared_stream import SharedStreamManager

    nightly, hourly = trigger(NAME), trigger("hourly_sessions")
    assert nightly.shared_stream_key() == hourly.shared_stream_key()
    assert trigger(poll_interval=60).shared_stream_key() != nightly.shared_stream_key()

    async def scenario() -> tuple[Any, Any, int]:
        manager = SharedStreamManager()
        streams = {}
        for trigger_id, watch in enumerate((nightly, hourly)):
            shared = manager.subscribe(trigger_id=trigger_id, trigger=watch, key=watch.shared_stream_key())
            streams[trigger_id] = watch.filter_shared_stream(shared)
        try:
            waiting = [asyncio.ensure_future(stream.__anext__()) for stream in streams.values()]
            await until(lambda: polls(looker) >= 3)
            looker.datagroups.trigger(MODEL, NAME)
            looker.datagroups.trigger(MODEL, "hourly_sessions")
            first, second = await asyncio.wait_for(asyncio.gather(*waiting), PATIENCE)
            # Both events came from the same polls: every poll so far is one request for both watchers.
            return first, second, polls(looker)
        finally:
            for trigger_id, watch in enumerate((nightly, hourly)):
                await manager.unsubscribe(trigger_id, watch.shared_stream_key())
            await manager.stop_all()

    first, second, seen = asyncio.run(scenario())
    assert (first.payload["datagroup_name"], second.payload["datagroup_name"]) == (NAME, "hourly_sessions")
    # One session and one GET /datagroups per poll answer both watchers: two watchers polling alone would
    # log in twice and ask twice per poll.
    assert looker.counters["logins"] == 1
    assert seen >= 3


# --- faults -----------------------------------------------------------------------------------------------


def event_after_two_polls(looker: LookerStandIn, **trigger_kwargs: Any) -> Any:
    """The watch's first event when the datagroup is triggered after two polls (the faults' common run)."""

    async def scenario() -> Any:
        run = trigger(**trigger_kwargs).run()
        try:
            return await next_event(
                run, looker, after_polls=2, then=lambda: looker.datagroups.trigger(MODEL, NAME)
            )
        finally:
            await run.aclose()

    return asyncio.run(scenario())


def test_429_and_5xx_are_retried(looker, caplog, capfd):
    looker.fail_next_requests(2, method="GET", path="/api/4.0/datagroups", status=503, retry_after=0)
    looker.fail_next_requests(1, method="GET", path="/api/4.0/datagroups", status=429, retry_after=0)

    assert event_after_two_polls(looker, retries=3).payload["datagroup_name"] == NAME
    assert looker.counters["request_faults"] == 3
    assert "Looker answered HTTP 503; retry 1 of 3" in logged(caplog, capfd)


def test_a_poll_that_still_fails_is_logged_and_the_watch_goes_on(looker, caplog, capfd):
    looker.fail_next_requests(2, method="GET", path="/api/4.0/datagroups", status=503, retry_after=0)

    assert event_after_two_polls(looker, retries=1).payload["datagroup_name"] == NAME
    text = logged(caplog, capfd)
    assert (
        "Polling Looker's datagroups failed; next poll in 0.05 s" in text and "gave up after 1 retry" in text
    )


def test_an_unknown_datagroup_fails_naming_those_that_exist(looker, caplog, capfd):
    with pytest.raises(LookerDatagroupError) as raised:
        asyncio.run(_first(trigger("nightly_elt")))
    message = str(raised.value)
    assert message.startswith("Looker has no datagroup toastmates::nightly_elt (model_name='toastmates'")
    assert "toastmates::hourly_sessions, toastmates::nightly_etl, b2b::accounts_refresh" in message
    assert "the name given after 'datagroup:' in the LookML model file" in message
    assert message in logged(caplog, capfd)  # logged when found, raised one poll interval later


def test_bad_credentials_fail_clearly_without_the_secret(looker, monkeypatch, caplog, capfd):
    set_connection(monkeypatch, CONN_ID, connection_json(looker.base_url, CLIENT_ID, WRONG_SECRET))
    watch = trigger()
    with pytest.raises(LookerDatagroupError) as raised:
        asyncio.run(_first(watch))
    assert str(raised.value).startswith(
        f"Looker rejected the API credentials of connection '{CONN_ID}' (client ID {CLIENT_ID})"
    )
    assert "Check the client ID and secret" in str(raised.value)
    text = logged(caplog, capfd)
    assert str(raised.value) in text
    assert WRONG_SECRET not in str(raised.value) + text + json.dumps(watch.serialize())
    assert polls(looker) == 0


def test_a_missing_connection_fails_clearly(monkeypatch):
    with pytest.raises(
        LookerDatagroupError, match="The Looker connection 'no_such_connection' cannot be used"
    ):
        asyncio.run(_first(LookerDatagroupTrigger("no_such_connection", MODEL, NAME, 0.05)))


async def _first(watch: LookerDatagroupTrigger) -> Any:
    run = watch.run()
    try:
        return await asyncio.wait_for(run.__anext__(), PATIENCE)
    finally:
        await run.aclose()


# --- arguments --------------------------------------------------------------------------------------------


def test_serialized_kwargs_rebuild_the_trigger_and_hold_no_secret():
    watch = LookerDatagroupTrigger("looker_default", MODEL, NAME)
    classpath, kwargs = watch.serialize()
    assert classpath == "airflow_provider_looker_segment.triggers.looker.LookerDatagroupTrigger"
    assert kwargs == {
        "looker_conn_id": "looker_default",
        "model_name": MODEL,
        "datagroup_name": NAME,
        "poll_interval": DEFAULT_DATAGROUP_POLL_INTERVAL,
        "retries": 3,
        "retry_backoff": 2.0,
    }
    assert LookerDatagroupTrigger(**kwargs).serialize() == (classpath, kwargs)


def test_the_default_poll_fits_lookers_standard_budget():
    """Standard: 1,000 administrative API calls a month; a 31-day month of polls stays well within it."""
    polls_a_month = 31 * 24 * 3600 / DEFAULT_DATAGROUP_POLL_INTERVAL
    assert polls_a_month == 744 and polls_a_month < 1000


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"model_name": ""}, "model_name is required"),
        ({"datagroup_name": None}, "datagroup_name is required"),
        ({"poll_interval": 0}, "poll_interval must be above 0 seconds"),
    ],
)
def test_bad_arguments_are_refused(arguments, message):
    values = {"looker_conn_id": CONN_ID, "model_name": MODEL, "datagroup_name": NAME, **arguments}
    with pytest.raises(ValueError, match=message):
        LookerDatagroupTrigger(**values)
