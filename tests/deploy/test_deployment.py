"""
The deployment test (``make deploy-test``): a real multi-worker Airflow, installed from packages with
``requirements/constraints.txt``, used through its REST API as a user would.

PostgreSQL, Redis (the Celery broker), the CeleryExecutor with two workers of their own host names,
scheduler, dag-processor, api-server, moto's S3 server for the sync state and the Looker and Segment
stand-ins, all on 127.0.0.1 (see :mod:`deployment`). It checks that

* the pins install the object-storage filesystems: the Amazon provider with s3fs in this venv, the Google
  provider with gcsfs by a resolver check;
* the mapped multi-Look DAG runs on both workers and every row reaches Segment exactly once;
* a changed-only sync keeps its state on S3 (the Variable ``looker_segment_state_path``, or the trigger
  form's ``state_path``): everything, then nothing;
* two runs of one changed-only sync at once leave a consistent state;
* a worker killed mid-run loses nothing: Airflow's retry completes the sync and the next run is in sync;
* everything started is stopped by PID, and nothing is left running.

Skipped unless ``LSG_DEPLOY_TEST=1`` (set by ``make deploy-test``): ``make test`` does not run it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("LSG_DEPLOY_TEST") != "1":
    pytest.skip(
        "the deployment test runs with `make deploy-test` (LSG_DEPLOY_TEST=1)", allow_module_level=True
    )

import boto3  # only in the deployment venv
from airflow_services import live_group_members, quote
from deployment import (
    CeleryAirflow,
    Daemons,
    aws_connection,
    start_looker_standin,
    start_moto,
    start_postgres,
    start_redis,
    start_segment_standin,
)
from standins.connections import standin_connections
from standins.looker_fixtures import (
    GENERATED_LOOK_BASE,
    TOASTMATES_LOOK_ID,
    fixture_looks,
    generated_row,
)
from standins.segment_standin import SegmentStandInClient

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CONSTRAINTS = REPO / "requirements" / "constraints.txt"
COHORT_DAG = "looker_cohort_to_segment"
MAPPED_DAG = "looker_cohorts_to_segment_mapped"
DEPLOY_DAG = "lsg_deploy_changed_sync"
TASK_ID = "sync_cohort"
STATE_PATH_VARIABLE = "looker_segment_state_path"
BUCKET = "lsg-deploy-state"
WORKERS = {"worker-1": "lsg-worker-1.deploy.test", "worker-2": "lsg-worker-2.deploy.test"}
LOCKED = "is locked by"
TAKE_OVER = "Taking over the lock of sync"
RUN_TIMEOUT = 420


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_canonical(name)] = version.strip()
    return pins


# ------------------------------------------------------------------------------------- the constraints


def test_constraints_pin_airflow_and_recent_object_storage_filesystems():
    pins = _pins()
    assert pins["apache-airflow"] == "3.3.2"
    for name in ("s3fs", "gcsfs"):  # left alone, pip picks a 2020 s3fs
        assert int(pins[name].split(".")[0]) >= 2025, (name, pins[name])
    # botocore (the Amazon provider, s3fs) wants python-dateutil<3.0.0.
    assert int(pins["python-dateutil"].split(".")[0]) < 3, pins["python-dateutil"]
    assert {"apache-airflow-providers-amazon", "apache-airflow-providers-google", "botocore"} <= set(pins)


def test_deployment_venv_holds_the_pinned_versions():
    """This venv was installed with the pins and the Amazon provider's s3fs extra (make deploy-test)."""
    pins = _pins()
    installed = {_canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    for name in ("apache-airflow", "apache-airflow-providers-amazon", "s3fs", "aiobotocore", "botocore",
                 "apache-airflow-providers-celery", "apache-airflow-providers-postgres", "moto"):  # fmt: skip
        assert installed.get(name) == pins[name], name
    different = {
        name: (version, pins[name])
        for name, version in installed.items()
        if name in pins and version != pins[name]
    }
    assert different == {}, "installed versions that differ from the pins (installed, pinned)"
    check = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_google_provider_and_gcsfs_resolve_with_the_pins(tmp_path: Path):
    """The Google provider and gcsfs install with the pins (a resolver check: nothing is installed)."""
    report = tmp_path / "report.json"
    argv = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check",
            "--report", str(report), "-c", str(CONSTRAINTS), str(REPO),
            "apache-airflow-providers-google", "gcsfs"]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    planned = {
        _canonical(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    pins = _pins()
    for name in ("apache-airflow-providers-google", "gcsfs"):
        version = planned.get(name) or importlib.metadata.version(name)
        assert version == pins[name], name
    assert {name: v for name, v in planned.items() if name in pins and v != pins[name]} == {}


# ------------------------------------------------------------------------------------- the deployment


@dataclass
class Deployment:
    """The running deployment, with the calls the tests make."""

    airflow: CeleryAirflow
    segment: SegmentStandInClient
    s3: Any

    # -- runs, through the REST API -------------------------------------------------------------------

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        response = self.airflow.api(
            "POST", f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf}
        )
        assert response.status_code == 200, response.text
        return response.json()["dag_run_id"]

    def finish(self, dag_id: str, run_id: str, *, fail_fast: bool = True) -> dict[str, Any]:
        """
        Wait for a run to end and require success. ``fail_fast``: stop at the first failed try (the
        example DAGs retry five minutes later) rather than wait for the retries.
        """
        deadline = time.monotonic() + RUN_TIMEOUT
        path = f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id)}"
        while time.monotonic() < deadline:
            self.airflow.check_alive()
            run = self.airflow.api("GET", path).json()
            if run.get("state") in ("success", "failed"):
                break
            if fail_fast and any(
                ti["state"] in ("up_for_retry", "failed")
                for ti in self.airflow.task_instances(dag_id, run_id)
            ):
                break
            time.sleep(1)
        else:
            run = {"state": f"not finished in {RUN_TIMEOUT}s"}
        if run["state"] != "success":
            explanation = self.explain(dag_id, run_id)
            # End the run now: the next tests' runs must not wait behind it (max_active_runs).
            self.airflow.api("PATCH", path, json={"state": "failed"})
            raise AssertionError(f"run {run_id} of {dag_id}: {run['state']}\n{explanation}")
        return run

    def run(self, dag_id: str, conf: dict[str, Any], **kwargs: Any) -> str:
        run_id = self.trigger(dag_id, conf)
        self.finish(dag_id, run_id, **kwargs)
        return run_id

    def summary(self, dag_id: str, run_id: str, task_id: str = TASK_ID) -> dict[str, Any]:
        """The task's XCom ``return_value``, as the UI's XCom tab reads it."""
        response = self.airflow.api(
            "GET",
            f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id)}/taskInstances/{task_id}/xcomEntries/return_value",
        )
        assert response.status_code == 200, response.text
        value = response.json()["value"]
        return json.loads(value) if isinstance(value, str) else value

    def task_instance(self, dag_id: str, run_id: str, task_id: str = TASK_ID) -> dict[str, Any]:
        response = self.airflow.api(
            "GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id)}/taskInstances/{task_id}"
        )
        response.raise_for_status()
        return response.json()

    def explain(self, dag_id: str, run_id: str) -> str:
        """The task instances of a run, the logs of those that did not succeed, the services' logs."""
        lines = []
        for ti in self.airflow.task_instances(dag_id, run_id):
            where = f"{ti['task_id']}[{ti.get('map_index')}]"
            lines.append(f"{where}: {ti['state']}, try {ti['try_number']}, on {ti.get('hostname')}")
            if ti["state"] != "success" and ti.get("map_index", -1) == -1:
                for try_number in range(1, (ti["try_number"] or 0) + 1):
                    try:
                        log = self.airflow.task_log(dag_id, run_id, ti["task_id"], try_number)
                    except Exception as error:  # the log of a killed try may be missing
                        log = f"(no log: {error})"
                    lines.append(f"--- log of try {try_number} ---\n{log[-3000:]}")
        return "\n".join(lines) + "\n" + self.airflow.log_tails()

    def wait_for_log(
        self, dag_id: str, run_id: str, needle: str, try_number: int, timeout: float = 30
    ) -> str:
        """A try's log once it contains ``needle`` (the log can trail the task's state by a moment)."""
        deadline = time.monotonic() + timeout
        log = self.airflow.task_log(dag_id, run_id, TASK_ID, try_number)
        while needle not in log and time.monotonic() < deadline:
            time.sleep(0.5)
            log = self.airflow.task_log(dag_id, run_id, TASK_ID, try_number)
        return log

    # -- what Segment received ---------------------------------------------------------------------------

    def identities(self) -> Counter[str]:
        """How many events Segment received per userId."""
        return Counter(event.get("userId") for event in self.segment.events())

    # -- the state on S3 -------------------------------------------------------------------------------

    def keys(self, prefix: str) -> list[str]:
        listing = self.s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return sorted(item["Key"] for item in listing.get("Contents", []))

    def read_state(self, prefix: str) -> tuple[Any, list[Any]]:
        """The only state file under ``prefix``: its header and entries, read as the operator reads them."""
        from sync_state_helpers import read_header, stored_entries

        from airflow_provider_looker_segment.sync_run import CohortStateStore

        keys = self.keys(prefix)
        states = [key for key in keys if key.endswith(".state")]
        assert len(states) == 1, keys
        assert not [key for key in keys if key.endswith(".lock")], f"a lock was left behind: {keys}"
        key = states[0].rsplit("/", 1)[1].removesuffix(".state")
        store = CohortStateStore(f"s3://aws_default@{BUCKET}/{prefix}", key)
        return read_header(store), stored_entries(store)


def _state_url(prefix: str) -> str:
    return f"s3://aws_default@{BUCKET}/{prefix}"


def _generated_ids(rows: int) -> list[str]:
    return [generated_row(index)["users.id"] for index in range(rows)]


def _look_rows(look_id: str) -> list[str]:
    """The userIds of a Look of the stand-in (Look 1, or a generated Look)."""
    if look_id == TOASTMATES_LOOK_ID:
        return [row["users.id"] for row in fixture_looks()[TOASTMATES_LOOK_ID].rows]
    return _generated_ids(int(look_id) - GENERATED_LOOK_BASE)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    home = tmp_path_factory.mktemp("airflow-home")
    logs = tmp_path_factory.mktemp("servers")
    pg_folder = Path(tempfile.mkdtemp(prefix="lsg-deploy-pg-"))  # owned by the postgres user when root
    daemons = Daemons(logs)
    airflow: CeleryAirflow | None = None
    try:
        db_url = start_postgres(daemons, pg_folder)
        broker_url = start_redis(daemons, logs)
        moto_url = start_moto(daemons)
        looker_url = start_looker_standin(daemons)
        segment_url = start_segment_standin(daemons, logs)
        s3 = boto3.client(
            "s3",
            endpoint_url=moto_url,
            aws_access_key_id="lsg-deploy-access-key",
            aws_secret_access_key="lsg-deploy-secret-key",
            region_name="us-east-1",
        )
        s3.create_bucket(Bucket=BUCKET)

        dags = home / "dags"
        dags.mkdir()
        for source in [*(REPO / "dags").glob("*.py"), *(Path(__file__).parent / "dags").glob("*.py")]:
            shutil.copy(source, dags / source.name)
        env = {
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db_url,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": db_url.replace("+psycopg2", "+asyncpg"),
            "AIRFLOW__CELERY__BROKER_URL": broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{db_url}",  # db+postgresql+psycopg2: not psycopg 3
            "AIRFLOW__CORE__PARALLELISM": "4",
            # A killed worker's task is found out after 30 s without heartbeat (default 300 s).
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            "AIRFLOW_CONN_AWS_DEFAULT": aws_connection(moto_url),
            "AWS_EC2_METADATA_DISABLED": "true",  # never look for an instance metadata service
            **standin_connections(looker_url, segment_url),
        }
        airflow = CeleryAirflow(home, dags, env)
        airflow.start()
        for name, hostname in WORKERS.items():
            airflow.start_worker(name, hostname, concurrency=2)
        airflow.wait_for_workers()
        for dag_id in (COHORT_DAG, MAPPED_DAG, DEPLOY_DAG):
            airflow.wait_for_dag(dag_id)
            response = airflow.api("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})
            assert response.status_code == 200, response.text
        # The test process reads the state on S3 as the operator does: through aws_default.
        os.environ["AIRFLOW_CONN_AWS_DEFAULT"] = env["AIRFLOW_CONN_AWS_DEFAULT"]
        os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
        yield Deployment(airflow, SegmentStandInClient(segment_url), s3)
    finally:
        os.environ.pop("AIRFLOW_CONN_AWS_DEFAULT", None)
        if airflow is not None:
            airflow.stop()
        daemons.stop()
        shutil.rmtree(pg_folder, ignore_errors=True)
    # Every service, worker, task and server was stopped by PID; nothing is left running.
    assert airflow.leftovers() == {}, "processes left in Airflow's process groups (group -> PIDs)"
    assert daemons.leftovers() == {}, "processes left in the servers' process groups (group -> PIDs)"


# ------------------------------------------------------------------------------------------ scenarios


def test_mapped_dag_runs_on_both_workers_and_sends_every_row_once(deployment: Deployment):
    look_ids = [TOASTMATES_LOOK_ID, "1001200", "1001400", "1001600", "1001800", "1002000"]
    expected = Counter(user_id for look_id in look_ids for user_id in _look_rows(look_id))
    deployment.segment.reset()
    deployment.segment.set_faults(delay=0.5)  # each task lasts a few seconds: both workers get some
    try:
        run_id = deployment.run(MAPPED_DAG, {"look_ids": look_ids})
    finally:
        deployment.segment.set_faults()

    tis = [ti for ti in deployment.airflow.task_instances(MAPPED_DAG, run_id) if ti["task_id"] == TASK_ID]
    assert sorted(ti["map_index"] for ti in tis) == list(range(len(look_ids)))
    assert {ti["state"] for ti in tis} == {"success"}
    assert {ti["try_number"] for ti in tis} == {1}
    hosts = Counter(ti["hostname"] for ti in tis)
    print(f"mapped tasks per worker host: {dict(hosts)}")
    assert set(hosts) == set(WORKERS.values()), f"mapped tasks per worker host: {dict(hosts)}"

    total = deployment.summary(MAPPED_DAG, run_id, "add_up")["total"]
    rows = sum(expected.values())
    assert (total["rows"], total["sent"], total["invalid"], total["rejected"], total["failed"]) == (
        rows,
        rows,
        0,
        0,
        0,
    )
    # Exactly once at Segment, by the stand-in's own record: one messageId per row, none twice.
    message_ids = deployment.segment.message_ids()
    assert len(message_ids) == rows and len(set(message_ids)) == rows
    stats = deployment.segment.stats()
    assert (stats["events"], stats["duplicate_message_ids"], stats["rejected_events"]) == (rows, 0, 0)
    assert deployment.identities() == expected


def test_changed_sync_keeps_its_state_on_s3(deployment: Deployment):
    look_id = "1001000"
    rows = _look_rows(look_id)
    response = deployment.airflow.api(
        "POST", "/api/v2/variables", json={"key": STATE_PATH_VARIABLE, "value": _state_url("from-variable/")}
    )
    assert response.status_code in (200, 201), response.text
    try:
        deployment.segment.reset()
        conf = {"look_id": look_id, "sync_mode": "changed"}
        first = deployment.summary(COHORT_DAG, deployment.run(COHORT_DAG, conf))
        assert (first["sync_mode"], first["new"], first["sent"]) == ("changed", len(rows), len(rows))
        header, entries = deployment.read_state("from-variable/")
        assert header.count == len(entries) == len(rows)
        assert {entry.identity for entry in entries} == set(rows)

        second = deployment.summary(COHORT_DAG, deployment.run(COHORT_DAG, conf))
        assert (second["new"], second["changed"], second["unchanged"], second["sent"]) == (0, 0, len(rows), 0)
        assert deployment.identities() == Counter(rows)  # everything once, then nothing
        # Nothing changed: the state on S3 is not rewritten.
        assert second["state_saved"] is False
        assert deployment.read_state("from-variable/")[0] == header

        # The trigger form's state_path wins over the Variable: a new state there, everything sent again.
        third = deployment.summary(
            COHORT_DAG, deployment.run(COHORT_DAG, {**conf, "state_path": _state_url("from-form/")})
        )
        assert (third["new"], third["sent"]) == (len(rows), len(rows))
        assert deployment.read_state("from-form/")[0].count == len(rows)
    finally:
        deployment.airflow.api("DELETE", f"/api/v2/variables/{STATE_PATH_VARIABLE}")


def test_two_runs_of_one_sync_at_once_leave_a_consistent_state(deployment: Deployment):
    look_id, prefix = "1004000", "concurrent/"
    rows = _look_rows(look_id)
    conf = {"look_id": look_id, "state_path": _state_url(prefix)}
    deployment.segment.reset()
    deployment.segment.set_faults(delay=1.0)  # several seconds of sending: the two runs overlap
    try:
        run_ids = [deployment.trigger(DEPLOY_DAG, conf), deployment.trigger(DEPLOY_DAG, conf)]
        for run_id in run_ids:
            deployment.finish(DEPLOY_DAG, run_id, fail_fast=False)  # a run refused by the lock retries
    finally:
        deployment.segment.set_faults()

    refused = []
    for run_id in run_ids:
        ti = deployment.task_instance(DEPLOY_DAG, run_id)
        for try_number in range(1, ti["try_number"]):
            log = deployment.airflow.task_log(DEPLOY_DAG, run_id, TASK_ID, try_number)
            assert LOCKED in log, f"try {try_number} of {run_id} failed, not because of the lock:\n{log}"
            refused.append((run_id, try_number))
    print(f"concurrent runs: tries refused by the lock: {refused or 'none (the runs serialized)'}")
    # One run sent everything, the other (refused, then retried; or after the first) nothing: every
    # identity reached Segment exactly once.
    sent = sorted(deployment.summary(DEPLOY_DAG, run_id)["sent"] for run_id in run_ids)
    assert sent == [0, len(rows)]
    assert deployment.identities() == Counter(rows)

    third = deployment.summary(DEPLOY_DAG, deployment.run(DEPLOY_DAG, conf))
    assert (third["new"], third["changed"], third["unchanged"], third["sent"]) == (0, 0, len(rows), 0)
    header, entries = deployment.read_state(prefix)
    assert header.count == len(entries) == len(rows)
    assert {entry.identity for entry in entries} == set(rows)


def test_a_worker_killed_mid_run_loses_nothing(deployment: Deployment):
    """A machine crash: SIGKILL of the worker's process group and of its task processes, all at once."""
    look_id, prefix = "1012000", "killed-worker/"
    rows = _look_rows(look_id)
    conf = {"look_id": look_id, "state_path": _state_url(prefix)}
    deployment.segment.reset()
    deployment.segment.set_faults(delay=1.5)  # 12,000 rows, one request in flight: tens of seconds
    try:
        run_id = deployment.trigger(DEPLOY_DAG, conf)
        ti = deployment.airflow.wait_for_task(DEPLOY_DAG, run_id, TASK_ID, ("running",), timeout=180)
        deadline = time.monotonic() + 120
        while deployment.segment.stats()["events"] == 0:  # mid-run: sending has begun
            assert time.monotonic() < deadline, deployment.explain(DEPLOY_DAG, run_id)
            time.sleep(0.2)
        ti = deployment.task_instance(DEPLOY_DAG, run_id)
        assert ti["state"] == "running" and ti["try_number"] == 1, ti
        victim = deployment.airflow.worker_of(ti["hostname"])
        deployment.airflow.kill_worker(victim)  # the worker, its pool and the task process: SIGKILL
        received_before = deployment.segment.stats()["events"]
        print(f"killed {victim} ({ti['hostname']}) after {received_before} of {len(rows)} events arrived")
        assert 0 < received_before < len(rows), received_before
    finally:
        deployment.segment.set_faults()

    # The scheduler finds the task without heartbeat, fails the try, and the retry runs on the survivor;
    # the lock the killed try left is taken over.
    deployment.finish(DEPLOY_DAG, run_id, fail_fast=False)
    ti = deployment.task_instance(DEPLOY_DAG, run_id)
    survivor = next(host for name, host in WORKERS.items() if name != victim)
    assert ti["try_number"] >= 2 and ti["hostname"] == survivor, ti
    print(f"the run succeeded at try {ti['try_number']} on {ti['hostname']}")
    # The killed try's lock did not block the retry: it was taken over (left by an earlier try of the run,
    # and its holder's process is gone).
    log = deployment.wait_for_log(DEPLOY_DAG, run_id, TAKE_OVER, ti["try_number"])
    assert TAKE_OVER in log, log
    summary = deployment.summary(DEPLOY_DAG, run_id)
    assert (summary["new"], summary["sent"], summary["failed"]) == (len(rows), len(rows), 0)
    # Nothing lost: every row reached Segment; the retry re-sent the same messageIds (Segment drops them).
    assert set(deployment.identities()) == set(rows)
    assert len(set(deployment.segment.message_ids())) == len(rows)

    after = deployment.summary(DEPLOY_DAG, deployment.run(DEPLOY_DAG, conf))
    assert (after["new"], after["changed"], after["unchanged"], after["sent"]) == (0, 0, len(rows), 0)
    header, entries = deployment.read_state(prefix)
    assert header.count == len(entries) == len(rows)


def test_a_worker_killed_without_its_task_processes_loses_nothing(deployment: Deployment):
    """
    SIGKILL of the worker's process group only: the task process (a process group of its own) lives on as
    an orphan until it notices that its supervisor is gone, possibly while Airflow's retry runs.
    """
    for name, hostname in WORKERS.items():  # bring the killed worker back, as a service manager would
        if name not in deployment.airflow.processes:
            deployment.airflow.start_worker(name, hostname, concurrency=2)
    deployment.airflow.wait_for_workers()
    look_id, prefix = "1012000", "killed-worker-group/"
    rows = _look_rows(look_id)
    conf = {"look_id": look_id, "state_path": _state_url(prefix)}
    deployment.segment.reset()
    deployment.segment.set_faults(delay=1.5)
    try:
        run_id = deployment.trigger(DEPLOY_DAG, conf)
        deployment.airflow.wait_for_task(DEPLOY_DAG, run_id, TASK_ID, ("running",), timeout=180)
        deadline = time.monotonic() + 120
        while deployment.segment.stats()["events"] == 0:
            assert time.monotonic() < deadline, deployment.explain(DEPLOY_DAG, run_id)
            time.sleep(0.2)
        ti = deployment.task_instance(DEPLOY_DAG, run_id)
        assert ti["state"] == "running" and ti["try_number"] == 1, ti
        victim = deployment.airflow.worker_of(ti["hostname"])
        orphans = deployment.airflow.kill_worker(victim, with_tasks=False)
        assert orphans, "the task process should have a process group of its own"
        print(f"killed the process group of {victim}; its task process groups {sorted(orphans)} live on")
    finally:
        deployment.segment.set_faults()

    deployment.finish(DEPLOY_DAG, run_id, fail_fast=False)
    ti = deployment.task_instance(DEPLOY_DAG, run_id)
    survivor = next(host for name, host in WORKERS.items() if name != victim)
    assert ti["try_number"] >= 2 and ti["hostname"] == survivor, ti
    summary = deployment.summary(DEPLOY_DAG, run_id)
    taken_over = TAKE_OVER in deployment.wait_for_log(DEPLOY_DAG, run_id, TAKE_OVER, ti["try_number"], 5)
    print(
        f"the retry (try {ti['try_number']}) sent {summary['sent']}, found {summary['unchanged']} unchanged, "
        f"{'took over the lock' if taken_over else 'found no lock'}"
    )
    assert set(deployment.identities()) == set(rows)  # nothing lost
    assert len(set(deployment.segment.message_ids())) == len(rows)  # both tries sent the same messageIds
    assert live_group_members(orphans) == {}, "the orphaned task process did not end by itself"

    after = deployment.summary(DEPLOY_DAG, deployment.run(DEPLOY_DAG, conf))
    assert (after["new"], after["changed"], after["unchanged"], after["sent"]) == (0, 0, len(rows), 0)
    header, entries = deployment.read_state(prefix)
    assert header.count == len(entries) == len(rows)
