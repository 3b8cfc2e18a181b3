"""
Real Airflow services for end-to-end tests: api-server, scheduler, dag-processor and triggerer, bound to
127.0.0.1.

Not ``airflow standalone``: it always listens on all interfaces for its log servers. Each process is started
in its own process group and stopped by its PID (the whole group) in :meth:`AirflowServices.stop`, also
when a test fails.
"""

from __future__ import annotations

import json
import os
import secrets
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
#: Ambient settings that must not reach the services: Airflow's own, the Looker SDK's, the example DAG's.
_DROPPED_ENV_PREFIXES = ("AIRFLOW", "LOOKERSDK_", "LOOKER_SEGMENT_")
_LOOPBACK = "127.0.0.1,localhost,::1"


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
        self.argv: dict[str, list[str]] = {}
        self.stopped_groups: set[int] = set()
        self._token: str | None = None
        # Requests to the API go straight to loopback, whatever proxy the environment names.
        self.session = requests.Session()
        self.session.trust_env = False

    def _environment(self, dags_folder: Path, extra_env: dict[str, str]) -> dict[str, str]:
        passwords = self.home / "passwords.json"
        passwords.write_text(json.dumps({ADMIN_USER: ADMIN_PASSWORD}))
        env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED_ENV_PREFIXES)}
        env.update(
            {
                # The task reaches the stand-ins and the Execution API on loopback: never through a proxy.
                "NO_PROXY": _LOOPBACK,
                "no_proxy": _LOOPBACK,
                "PYTHONDONTWRITEBYTECODE": "1",  # keep the project's dags/ free of __pycache__
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__PARALLELISM": "4",
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__API__BASE_URL": self.base_url,
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
                # Every service must sign and check the Execution API's tokens with the same secret.
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
                "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
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
        """Migrate the database, start the four services and wait until the API answers."""
        self._migrate(timeout=300)
        self._spawn(
            "api-server",
            [AIRFLOW, "api-server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
        )
        self._spawn("scheduler", [AIRFLOW, "scheduler", "--skip-serve-logs"])
        self._spawn("dag-processor", [AIRFLOW, "dag-processor"])
        self._spawn("triggerer", [AIRFLOW, "triggerer", "--skip-serve-logs"])  # runs deferred tasks' triggers
        self._wait_for_api(timeout=180)
        return self

    def _migrate(self, timeout: float) -> None:
        """``airflow db migrate``; a failure reports the tail of its output."""
        argv = [AIRFLOW, "db", "migrate"]
        with open(self.home / "db-migrate.log", "wb") as log:
            try:
                result = subprocess.run(
                    argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
                )
            except subprocess.TimeoutExpired:
                raise TimeoutError(
                    f"airflow db migrate took more than {timeout}s:\n{self.log_tail('db-migrate')}"
                ) from None
        if result.returncode != 0:
            raise RuntimeError(
                f"airflow db migrate exited with {result.returncode}:\n{self.log_tail('db-migrate')}"
            )

    def _spawn(self, name: str, argv: list[str], mode: str = "wb") -> None:
        self.argv[name] = argv
        with open(self.home / f"{name}.log", mode) as log:  # the child keeps its own copy of the descriptor
            self.processes[name] = subprocess.Popen(
                argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def restart(self, name: str) -> None:
        """
        Stop one service (its process group, by PID: SIGTERM, then SIGKILL after 20 s) and start it again,
        appending to its log: a triggerer restarted by an upgrade or a crash.
        """
        proc = self.processes.pop(name)
        groups = {proc.pid, *(_process_group(pid) for pid in _descendants([proc.pid]))} - {os.getpgrp(), 0}
        for pgid in _live_members(groups):
            _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while _live_members(groups) and time.monotonic() < deadline:
            proc.poll()
            time.sleep(0.1)
        for pgid in _live_members(groups):
            _signal_group(pgid, signal.SIGKILL)
        proc.wait(timeout=10)
        self.stopped_groups |= groups
        self._spawn(name, self.argv[name], mode="ab")

    def _wait_for_api(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if self.session.get(f"{self.base_url}/api/v2/monitor/health", timeout=2).status_code == 200:
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
        """The end of a service's log (``api-server``, ``scheduler``, ``dag-processor``, ``db-migrate``)."""
        path = self.home / f"{name}.log"
        text = path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"
        return f"--- tail of {path} ---\n{text}"

    def log_tails(self) -> str:
        """The end of every service's log."""
        return "\n".join(self.log_tail(name, 2000) for name in self.processes)

    def stop(self) -> None:
        """
        Stop every started process and its process group, by PID: SIGTERM, wait up to 20 s for the whole
        group to exit, then SIGKILL what is left and wait for it.

        Task processes put themselves in process groups of their own: the groups of the services'
        descendants are stopped the same way.
        """
        self.session.close()
        leaders = [proc.pid for proc in self.processes.values()]  # each service leads its own group
        groups = set(leaders)
        groups.update(_process_group(pid) for pid in _descendants(leaders))
        groups.discard(os.getpgrp())  # never the test's own group
        groups.discard(0)
        for pgid in _live_members(groups):  # only groups that still exist: a stale number could be reused
            _signal_group(pgid, signal.SIGTERM)
        self._wait_for_groups(groups, timeout=20)
        for pgid in _live_members(groups):
            _signal_group(pgid, signal.SIGKILL)
        self._wait_for_groups(groups, timeout=10)
        self.stopped_groups |= groups
        self.processes.clear()

    def _wait_for_groups(self, groups: set[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for proc in self.processes.values():
                proc.poll()  # reap the leaders
            if not _live_members(groups) or time.monotonic() >= deadline:
                return
            time.sleep(0.1)

    def leftovers(self) -> dict[int, list[int]]:
        """Processes still alive in the process groups of the stopped services: group -> PIDs."""
        return _live_members(self.stopped_groups)

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
            response = self.session.post(
                f"{self.base_url}/auth/token",
                json={"username": ADMIN_USER, "password": ADMIN_PASSWORD},
                timeout=30,
            )
            response.raise_for_status()
            self._token = response.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token()}", **kwargs.pop("headers", {})}
        return self.session.request(method, f"{self.base_url}{path}", headers=headers, timeout=60, **kwargs)

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> dict[str, Any]:
        """Wait until the dag-processor has parsed ``dag_id``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            response = self.api("GET", f"/api/v2/dags/{dag_id}")
            if response.status_code == 200:
                return response.json()
            time.sleep(1)
        errors = self.api("GET", "/api/v2/importErrors").text
        raise TimeoutError(
            f"DAG {dag_id} not parsed in {timeout}s; import errors: {errors}\n"
            f"{self.log_tail('dag-processor')}"
        )

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 240) -> dict[str, Any]:
        """Poll a DAG run until it has finished; return it."""
        path = f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id)}"
        return self._poll(path, ("success", "failed"), timeout, f"run {run_id}")

    def wait_for_task(
        self, dag_id: str, run_id: str, task_id: str, states: tuple[str, ...], timeout: float = 240
    ) -> dict[str, Any]:
        """Poll a task instance until its state is one of ``states``; return it."""
        path = f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id)}/taskInstances/{task_id}"
        return self._poll(path, states, timeout, f"task {task_id} of run {run_id}")

    def _poll(self, path: str, states: tuple[str, ...], timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            self.check_alive()
            response = self.api("GET", path)
            if response.status_code == 200:
                last = response.json()
                if last.get("state") in states:
                    return last
            else:
                last = f"HTTP {response.status_code}: {response.text}"
            time.sleep(1)
        raise TimeoutError(
            f"{what} not in {states} after {timeout}s (last seen: {last}):\n{self.log_tails()}"
        )

    def task_log_events(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> list[Any]:
        """Return a task's log as the API gives it: a list of structured events."""
        response = self.api(
            "GET",
            f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id)}/taskInstances/{task_id}/logs/{try_number}",
            params={"full_content": "true"},
        )
        response.raise_for_status()
        content = response.json()["content"]
        return [{"event": content}] if isinstance(content, str) else content

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        """Return a task's log as text: one line per event, one more per exception (type: message)."""
        return render_log(self.task_log_events(dag_id, run_id, task_id, try_number))


def render_log(events: list[Any]) -> str:
    """Render structured log events as text, as the UI shows them."""
    lines = []
    for event in events:
        if not isinstance(event, dict):
            lines.append(str(event))
            continue
        lines.append(f"{event.get('level', '')} {event.get('event', '')}".strip())
        for error in event.get("error_detail") or ():
            if isinstance(error, dict):
                lines.append(f"    {error.get('exc_type')}: {error.get('exc_value')}")
            else:
                lines.append(f"    {error}")
    return "\n".join(lines)


def quote(run_id: str) -> str:
    """URL-quote a run id (it contains ``:`` and ``+``)."""
    return urllib.parse.quote(run_id, safe="")


def _proc_stat(pid: int | str) -> tuple[str, int, int] | None:
    """(state, parent PID, process group) of a process, from /proc; ``None`` when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may contain spaces and parentheses.
    state, ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
    return state, int(ppid), int(pgrp)


def _all_processes() -> dict[int, tuple[str, int, int]]:
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(entry.name)) is not None:
            table[int(entry.name)] = stat
    return table


def _process_group(pid: int) -> int:
    stat = _proc_stat(pid)
    return stat[2] if stat else 0


def _descendants(pids: list[int]) -> set[int]:
    """Every live descendant of the given processes."""
    children: dict[int, list[int]] = {}
    for pid, (_state, ppid, _pgrp) in _all_processes().items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(pids)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _live_members(groups: set[int]) -> dict[int, list[int]]:
    """The processes (zombies excepted) of the given process groups: group -> PIDs."""
    members: dict[int, list[int]] = {}
    for pid, (state, _ppid, pgrp) in _all_processes().items():
        if pgrp in groups and state not in ("Z", "X"):
            members.setdefault(pgrp, []).append(pid)
    return members


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


# -- process groups of other services (used by the deployment test, tests/deploy) --------------------------


def process_groups(pids: list[int]) -> set[int]:
    """
    The process groups of the given processes and of all their live descendants (task processes put
    themselves in groups of their own), never this process's own group.
    """
    groups = set(pids)
    groups.update(_process_group(pid) for pid in _descendants(pids))
    groups.discard(os.getpgrp())
    groups.discard(0)
    return groups


def live_group_members(groups: set[int]) -> dict[int, list[int]]:
    """The live processes (zombies excepted) of the given process groups: group -> PIDs."""
    return _live_members(groups)


def signal_groups(groups: set[int], sig: signal.Signals) -> None:
    """Send ``sig`` to every given process group that still has a live member."""
    for pgid in _live_members(groups):
        _signal_group(pgid, sig)
