"""
Real Airflow services for end-to-end tests: api-server, scheduler and dag-processor, bound to 127.0.0.1.

Not ``airflow standalone``: it always listens on all interfaces for its log servers. Each process is started
in its own process group and stopped by its PID (the whole group) in :meth:`AirflowServices.stop`, also
when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import requests

AIRFLOW = str(Path(sys.executable).with_name("airflow"))
ADMIN_USER = "admin"
ADMIN_PASSWORD = "e2e-admin-password"  # a throw-away user of a throw-away AIRFLOW_HOME


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AirflowServices:
    """
    Start and stop Airflow 3 services on loopback, with their own AIRFLOW_HOME and SQLite database.

    :param home: an empty folder for AIRFLOW_HOME (database, logs).
    :param dags_folder: the DAGs to serve.
    :param extra_env: more environment, e.g. ``AIRFLOW_CONN_*`` connections.
    """

    def __init__(self, home: Path, dags_folder: Path, extra_env: dict[str, str] | None = None) -> None:
        self.home = home
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = self._environment(dags_folder, extra_env or {})
        self.processes: dict[str, subprocess.Popen] = {}
        self._token: str | None = None

    def _environment(self, dags_folder: Path, extra_env: dict[str, str]) -> dict[str, str]:
        passwords = self.home / "passwords.json"
        passwords.write_text(json.dumps({ADMIN_USER: ADMIN_PASSWORD}))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LOOKERSDK_"))}
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__PARALLELISM": "4",
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__API__BASE_URL": self.base_url,
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "3",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
                "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            }
        )
        env.update(extra_env)
        return env

    # -- life cycle -------------------------------------------------------------------------------------

    def start(self) -> AirflowServices:
        """Migrate the database, start the three services and wait until the API answers."""
        subprocess.run([AIRFLOW, "db", "migrate"], env=self.env, check=True, capture_output=True, timeout=300)
        self._spawn("api-server", [AIRFLOW, "api-server", "--workers", "1"])
        self._spawn("scheduler", [AIRFLOW, "scheduler", "--skip-serve-logs"])
        self._spawn("dag-processor", [AIRFLOW, "dag-processor"])
        self._wait_for_api(timeout=180)
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.home / f"{name}.log", "wb")
        self.processes[name] = subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def _wait_for_api(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if requests.get(f"{self.base_url}/api/v2/version", timeout=2).status_code < 500:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"api-server did not answer within {timeout}s:\n{self.log_tail('api-server')}")

    def check_alive(self) -> None:
        """Raise with the log's tail if a service died."""
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"airflow {name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def log_tail(self, name: str, chars: int = 4000) -> str:
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self) -> None:
        """Stop every started process (and its children) by PID: SIGTERM, then SIGKILL."""
        for proc in self.processes.values():
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.processes.clear()

    def __enter__(self) -> AirflowServices:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- REST API, as the UI uses it ----------------------------------------------------------------------

    def token(self) -> str:
        """Get a JWT as the UI's login does (``POST /auth/token``)."""
        if self._token is None:
            response = requests.post(
                f"{self.base_url}/auth/token",
                json={"username": ADMIN_USER, "password": ADMIN_PASSWORD},
                timeout=30,
            )
            response.raise_for_status()
            self._token = response.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token()}", **kwargs.pop("headers", {})}
        return requests.request(method, f"{self.base_url}{path}", headers=headers, timeout=60, **kwargs)

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> dict[str, Any]:
        """Wait until the dag-processor has parsed ``dag_id``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            response = self.api("GET", f"/api/v2/dags/{dag_id}")
            if response.status_code == 200:
                return response.json()
            time.sleep(1)
        raise TimeoutError(f"DAG {dag_id} not parsed in {timeout}s:\n{self.log_tail('dag-processor')}")

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 240) -> dict[str, Any]:
        """Poll a DAG run until it has finished; return it."""
        deadline = time.monotonic() + timeout
        path = f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id)}"
        while time.monotonic() < deadline:
            self.check_alive()
            run = self.api("GET", path).json()
            if run.get("state") in ("success", "failed"):
                return run
            time.sleep(1)
        raise TimeoutError(f"run {run_id} did not finish in {timeout}s:\n{self.log_tail('scheduler')}")

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        """Return a task's log as text (one line per structured event)."""
        response = self.api(
            "GET",
            f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id)}/taskInstances/{task_id}/logs/{try_number}",
            params={"full_content": "true"},
        )
        response.raise_for_status()
        content = response.json()["content"]
        if isinstance(content, str):
            return content
        return "\n".join(
            " ".join(str(event.get(key, "")) for key in ("level", "event", "error_detail"))
            for event in content
        )


def quote(run_id: str) -> str:
    """URL-quote a run id (it contains ``:`` and ``+``)."""
    return urllib.parse.quote(run_id, safe="")


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
