"""The provider registers with Airflow: entry point, connection types, hook classes, CLI listing."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import airflow_provider_looker_segment
from airflow_provider_looker_segment.get_provider_info import get_provider_info

AIRFLOW = str(Path(sys.executable).with_name("airflow"))


def _entry_point():
    matches = [
        ep
        for ep in entry_points(group="apache_airflow_provider")
        if ep.value.startswith("airflow_provider_looker_segment")
    ]
    assert len(matches) == 1, matches
    return matches[0]


def test_entry_point_resolves_to_provider_info():
    info = _entry_point().load()()
    assert info == get_provider_info()
    assert info["package-name"] == "airflow-provider-looker-segment"
    assert info["versions"] == [airflow_provider_looker_segment.__version__]


def _connection_types() -> dict[str, dict]:
    return {ct["connection-type"]: ct for ct in get_provider_info()["connection-types"]}


def test_both_connection_types_declared_with_form_fields():
    types = _connection_types()
    assert set(types) == {"looker", "segment_tracking"}
    looker = types["looker"]
    assert looker["hook-name"] == "Looker"
    assert set(looker["conn-fields"]) == {"verify_ssl", "timeout", "warehouse_namespace"}
    assert looker["conn-fields"]["verify_ssl"]["schema"]["default"] is True
    assert looker["conn-fields"]["timeout"]["schema"]["default"] == 120
    assert looker["ui-field-behaviour"]["relabeling"]["password"] == "Client secret (API key)"
    assert "API3" not in json.dumps(looker)  # Looker calls them API keys (client ID, client secret)
    segment = types["segment_tracking"]
    assert segment["hook-name"] == "Segment Tracking API"
    assert segment["ui-field-behaviour"]["relabeling"]["password"] == "Write key"
    assert "login" in segment["ui-field-behaviour"]["hidden-fields"]
    assert "source_name" in segment["conn-fields"]  # lineage: the source's name, never the write key


def test_both_extra_links_and_triggers_are_declared():
    info = get_provider_info()
    assert info["extra-links"] == [
        "airflow_provider_looker_segment.links.LookerLookLink",
        "airflow_provider_looker_segment.links.LookerExploreLink",
    ]
    for path in info["extra-links"]:
        module_name, _, class_name = path.rpartition(".")
        assert getattr(importlib.import_module(module_name), class_name)
    from airflow_provider_looker_segment.triggers.looker import LookerDatagroupTrigger, LookerQueryTaskTrigger

    assert {entry["python-modules"][0] for entry in info["triggers"]} == {
        "airflow_provider_looker_segment.triggers.looker"
    }
    assert LookerDatagroupTrigger.__module__.startswith("airflow_provider_looker_segment.triggers")
    assert LookerQueryTaskTrigger.__module__ == "airflow_provider_looker_segment.triggers.looker"


@pytest.mark.parametrize("conn_type", ["looker", "segment_tracking"])
def test_hook_classes_importable_and_consistent(conn_type: str):
    ct = _connection_types()[conn_type]
    module_name, _, class_name = ct["hook-class-name"].rpartition(".")
    hook_cls = getattr(importlib.import_module(module_name), class_name)
    assert hook_cls.conn_type == conn_type
    assert hook_cls.hook_name == ct["hook-name"]
    expected_default = {"looker": "looker_default", "segment_tracking": "segment_default"}[conn_type]
    assert hook_cls.default_conn_name == expected_default
    for entry in get_provider_info()["hooks"] + get_provider_info()["operators"]:
        for module in entry["python-modules"]:
            importlib.import_module(module)


def _airflow_cli(*args: str) -> str:
    env = {**os.environ, "AIRFLOW__LOGGING__LOGGING_LEVEL": "ERROR"}
    done = subprocess.run([AIRFLOW, *args], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_airflow_cli_lists_provider_and_hooks():
    providers = json.loads(_airflow_cli("providers", "list", "--output", "json"))
    ours = [p for p in providers if p["package_name"] == "airflow-provider-looker-segment"]
    assert ours and ours[0]["version"] == airflow_provider_looker_segment.__version__
    hooks = json.loads(_airflow_cli("providers", "hooks", "--output", "json"))
    by_type = {h["connection_type"]: h for h in hooks}
    assert by_type["looker"]["class"] == "airflow_provider_looker_segment.hooks.looker.LookerHook"
    assert by_type["segment_tracking"]["class"] == "airflow_provider_looker_segment.hooks.segment.SegmentHook"


# ------------------------------------------------------------------ the forms' numeric bounds and the hooks

#: Values typed into a numeric field of a connection form, around every bound the hooks have.
_TYPED = [-1, 0, 0.05, 0.1, 0.5, 0.99, 1, 1.5, 2, 30, 32, 63.5, 64, 65, 120, 1000, 10**6]


def _accepted(conn_type: str, name: str, value: float) -> bool:
    """Whether the hook takes ``value`` for the extra ``name`` of a connection of ``conn_type``."""
    from airflow.sdk import Connection

    from airflow_provider_looker_segment.exceptions import InvalidParameterError
    from airflow_provider_looker_segment.hooks.looker_connection import settings_from_connection
    from airflow_provider_looker_segment.hooks.segment import SegmentHook

    if conn_type == "looker":
        conn = Connection(
            conn_id="looker_form",
            conn_type="looker",
            host="https://looker.example.com",
            login="id",
            password="secret",
            extra=json.dumps({name: value}),
        )
        try:
            settings_from_connection(conn)
        except InvalidParameterError:
            return False
        return True
    conn = Connection(
        conn_id="segment_form", conn_type="segment_tracking", password="key", extra=json.dumps({name: value})
    )
    hook = SegmentHook(segment_conn_id="segment_form")
    hook.get_connection = lambda _conn_id: conn  # type: ignore[method-assign]
    try:
        hook.validate_config()
    except InvalidParameterError:
        return False
    return True


@pytest.mark.parametrize(
    ("conn_type", "name"),
    [
        ("looker", "timeout"),
        ("segment_tracking", "timeout"),
        ("segment_tracking", "max_in_flight"),
        ("segment_tracking", "requests_per_second"),
        ("segment_tracking", "events_per_second"),
    ],
)
def test_numeric_form_fields_accept_only_what_the_hook_accepts(conn_type: str, name: str):
    """
    The form's number input keeps to the schema's ``minimum`` and ``maximum``: every value the schema
    allows, the task takes; and the bounds are there (the hook refuses what lies beyond them).
    """
    import jsonschema

    schema = _connection_types()[conn_type]["conn-fields"][name]["schema"]
    assert "minimum" in schema, schema
    allowed = []
    for value in _TYPED:
        if jsonschema.Draft7Validator(schema).is_valid(value):
            allowed.append(value)
            assert _accepted(conn_type, name, value), f"the form saves {name}={value!r}, the task refuses it"
    assert allowed, schema
    below = schema["minimum"] - (1 if "integer" in schema["type"] else 0.01)
    assert not _accepted(conn_type, name, below)
    if "maximum" in schema:
        assert not _accepted(conn_type, name, schema["maximum"] + 1)
    if "default" in schema:
        assert _accepted(conn_type, name, schema["default"])


def test_form_bounds_are_the_hooks_bounds():
    from airflow_provider_looker_segment.hooks import segment

    fields = _connection_types()["segment_tracking"]["conn-fields"]
    assert fields["max_in_flight"]["schema"]["maximum"] == segment.MAX_IN_FLIGHT_LIMIT
    assert fields["max_in_flight"]["schema"]["default"] == segment.DEFAULT_MAX_IN_FLIGHT
    assert fields["requests_per_second"]["schema"]["minimum"] == segment.MIN_REQUESTS_PER_SECOND
    assert fields["events_per_second"]["schema"]["minimum"] == segment.MIN_EVENTS_PER_SECOND
