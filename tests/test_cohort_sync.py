"""The pure parts of sync_mode="changed": identity keys, messageIds, exit calls, undelivered identities."""

from __future__ import annotations

from airflow_provider_looker_segment.cohort_sync import (
    exit_message,
    identity_of,
    keyed_message_id,
    undelivered_identities,
)
from airflow_provider_looker_segment.sync_state import ExitIdentity, identity_hash


def test_identity_prefers_user_id():
    assert identity_of({"userId": "42", "anonymousId": "a-1"}) == ("userId", "42")
    assert identity_of({"anonymousId": "a-1"}) == ("anonymousId", "a-1")


def test_keyed_message_ids_map_back_to_identities():
    ihash = identity_hash("userId", "42")
    keyed = keyed_message_id(ihash, "lsg-" + "0" * 32)
    assert len(keyed) == 53 and keyed.endswith("lsg-" + "0" * 32)
    assert undelivered_identities([keyed], complete=True) == {ihash}
    assert undelivered_identities([keyed], complete=False) is None  # capped list: advance nothing
    assert undelivered_identities(["not-ours"], complete=True) is None


def test_exit_message_is_deterministic_and_minimal():
    departed = ExitIdentity("anonymousId", "anon-1", identity_hash("anonymousId", "anon-1"))
    kwargs = {
        "membership_trait": "in_cohort",
        "message_id_namespace": '["dag","task","run",-1,"42"]',
        "timestamp": "2026-11-29T00:00:00.000Z",
        "library": {"name": "x", "version": "1"},
    }
    message = exit_message(departed, **kwargs)
    assert message["anonymousId"] == "anon-1" and "userId" not in message
    assert message["traits"] == {"in_cohort": False}
    assert message == exit_message(departed, **kwargs)
    assert undelivered_identities([message["messageId"]], complete=True) == {departed.ihash}
    other_run = exit_message(departed, **{**kwargs, "message_id_namespace": '["dag","task","run2",-1,"42"]'})
    assert other_run["messageId"] != message["messageId"]
