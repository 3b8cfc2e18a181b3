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
    assert set(looker["conn-fields"]) == {"verify_ssl", "timeout"}
    assert looker["conn-fields"]["verify_ssl"]["schema"]["default"] is True
    assert looker["conn-fields"]["timeout"]["schema"]["default"] == 120
    assert looker["ui-field-behaviour"]["relabeling"]["password"] == "API client secret"
    segment = types["segment_tracking"]
    assert segment["hook-name"] == "Segment Tracking API"
    assert segment["ui-field-behaviour"]["relabeling"]["password"] == "Write key"
    assert "login" in segment["ui-field-behaviour"]["hidden-fields"]


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
