"""
A real multi-worker Airflow deployment on 127.0.0.1, from packages only, for the deployment test.

PostgreSQL (Debian's binaries: ``initdb``, ``postgres``) holds the metadata database and the Celery results,
Redis (Debian's ``redis-server``) is the Celery broker, moto's server (``moto_server``, PyPI ``moto[server]``)
is the S3 of the sync state, and the Looker and Segment stand-ins run as their command-line programs. The
Airflow services are the documented ones: ``airflow api-server``, ``airflow scheduler --skip-serve-logs``,
``airflow dag-processor`` (see :class:`airflow_services.AirflowServices`) and two
``airflow celery worker`` with their own Celery host names, the CeleryExecutor sending tasks to both.

Every process is started in a process group of its own and stopped by its PID, with the process groups of
its descendants (SIGTERM, then SIGKILL), also when a test fails; :meth:`Daemons.leftovers` and
:meth:`CeleryAirflow.leftovers` tell what is still alive.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import requests
from airflow_services import (
    AIRFLOW,
    AirflowServices,
    free_port,
    live_group_members,
    process_groups,
    quote,
    signal_groups,
)

HERE = Path(__file__).resolve().parent
#: The module giving each worker its own host name (``[core] hostname_callable``): two workers on one
#: machine then show as two hosts in the task instances' ``hostname``, as two machines would.
HOSTNAME_CALLABLE = "lsg_deploy_hostname.hostname"
WORKER_HOSTNAME_ENV = "LSG_DEPLOY_WORKER_HOSTNAME"
DB_USER = "airflow"
DB_NAME = "airflow"


# ------------------------------------------------------------------------------------------ processes


@dataclass
class Daemon:
    """A started server process (the leader of its own process group)."""

    name: str
    process: subprocess.Popen
    log: Path
    stop_signal: signal.Signals = signal.SIGTERM


@dataclass
class Daemons:
    """The servers around Airflow, started in order and stopped in reverse order by PID."""

    logs: Path
    started: list[Daemon] = field(default_factory=list)
    stopped_groups: set[int] = field(default_factory=set)

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        user: str | None = None,
        cwd: Path | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> Daemon:
        log = self.logs / f"{name}.log"
        with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
            process = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **_as_user(user),
            )
        daemon = Daemon(name, process, log, stop_signal)
        self.started.append(daemon)
        return daemon

    def check_alive(self) -> None:
        for daemon in self.started:
            if daemon.process.poll() is not None:
                raise RuntimeError(
                    f"{daemon.name} exited with {daemon.process.returncode}:\n{log_tail(daemon.log)}"
                )

    def wait_until(self, what: str, ready: Callable[[], bool], timeout: float, log: Path) -> None:
        """Poll ``ready()`` until it is true; fail with the log's tail when a server died or time ran out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if ready():
                    return
            except Exception:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{what} not ready after {timeout}s:\n{log_tail(log)}")

    def stop(self, timeout: float = 20) -> None:
        """Stop every server, last started first: its stop signal, then SIGKILL after ``timeout`` s."""
        for daemon in reversed(self.started):
            groups = process_groups([daemon.process.pid])
            signal_groups(groups, daemon.stop_signal)
            if not _wait_for(partial(_gone, daemon, groups), timeout):
                signal_groups(groups, signal.SIGKILL)
                _wait_for(partial(_gone, daemon, groups), 10)
            self.stopped_groups |= groups
        self.started.clear()

    def leftovers(self) -> dict[int, list[int]]:
        return live_group_members(self.stopped_groups)


def _gone(daemon: Daemon, groups: set[int]) -> bool:
    """The server exited (and was reaped) and nothing is left in its process groups."""
    return daemon.process.poll() is not None and not live_group_members(groups)


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _as_user(user: str | None) -> dict[str, Any]:
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def log_tail(path: Path, chars: int = 4000) -> str:
    text = path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"
    return f"--- tail of {path} ---\n{text}"


def _get(url: str, timeout: float = 2) -> requests.Response:
    with requests.Session() as session:
        session.trust_env = False  # loopback, never through a proxy
        return session.get(url, timeout=timeout)


# ----------------------------------------------------------------------------------------- PostgreSQL


def postgres_bin() -> Path:
    """The folder of PostgreSQL's server programs (Debian: /usr/lib/postgresql/<version>/bin)."""
    initdb = shutil.which("initdb")
    if initdb:
        return Path(os.path.realpath(initdb)).parent
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3].split(".")[0])
    )
    if not found:
        raise RuntimeError("PostgreSQL is not installed: run tests/deploy/system-packages.sh (apt-get)")
    return Path(found[-1]).parent


def start_postgres(daemons: Daemons, folder: Path) -> str:
    """
    Initialise a throw-away cluster in ``folder`` and start it on a free loopback port; return the
    SQLAlchemy URL of its database ``airflow`` (user ``airflow``, trust authentication on loopback).

    PostgreSQL refuses to run as root: as root, the cluster belongs to the ``postgres`` user.
    """
    import psycopg2

    binaries = postgres_bin()
    user = "postgres" if os.geteuid() == 0 else None
    data = folder / "data"
    if user:
        entry = pwd.getpwnam(user)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    folder.chmod(0o700)
    with open(daemons.logs / "initdb.log", "wb") as log:
        subprocess.run(
            [str(binaries / "initdb"), "-D", str(data), "-U", DB_USER, "--auth=trust", "-E", "UTF8",
             "--locale=C", "--no-sync"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=folder, check=True,
            timeout=180, **_as_user(user),
        )  # fmt: skip
    port = free_port()
    settings = {
        "listen_addresses": "127.0.0.1",
        "port": str(port),
        "unix_socket_directories": str(folder),
        "max_connections": "200",
        "fsync": "off",  # a throw-away database: speed over durability
        "synchronous_commit": "off",
        "full_page_writes": "off",
    }
    argv = [str(binaries / "postgres"), "-D", str(data)]
    for name, value in settings.items():
        argv += ["-c", f"{name}={value}"]
    daemon = daemons.start("postgres", argv, user=user, cwd=folder, stop_signal=signal.SIGINT)  # fast stop

    def connect() -> Any:
        return psycopg2.connect(
            host="127.0.0.1", port=port, user=DB_USER, dbname="postgres", connect_timeout=2
        )

    daemons.wait_until("PostgreSQL", lambda: connect().close() is None, 60, daemon.log)
    connection = connect()
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {DB_NAME}")
    finally:
        connection.close()
    return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{port}/{DB_NAME}"


# ----------------------------------------------------------------------------- Redis, moto, stand-ins


def start_redis(daemons: Daemons, folder: Path) -> str:
    """A Redis server on a free loopback port, nothing persisted; return its URL (database 0)."""
    import redis

    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        raise RuntimeError("redis-server is not installed: run tests/deploy/system-packages.sh (apt-get)")
    port = free_port()
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
            "--dir", str(folder), "--daemonize", "no", "--protected-mode", "yes"]  # fmt: skip
    daemon = daemons.start("redis", argv, cwd=folder)
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=2)
    daemons.wait_until("Redis", client.ping, 30, daemon.log)
    client.close()
    return f"redis://127.0.0.1:{port}/0"


def start_moto(daemons: Daemons) -> str:
    """moto's S3-compatible server on a free loopback port; return its endpoint URL."""
    port = free_port()
    binary = str(Path(sys.executable).with_name("moto_server"))
    daemon = daemons.start("moto", [binary, "-H", "127.0.0.1", "-p", str(port)])
    url = f"http://127.0.0.1:{port}"
    daemons.wait_until("moto_server", lambda: _get(f"{url}/moto-api/").status_code == 200, 60, daemon.log)
    return url


def start_looker_standin(daemons: Daemons) -> str:
    """The Looker API stand-in (its command-line program) on a free loopback port; return its URL."""
    port = free_port()
    module = "standins.looker_standin"
    daemon = daemons.start("looker-standin", [sys.executable, "-m", module, "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    daemons.wait_until(
        "Looker stand-in", lambda: _get(f"{url}/api/versions").status_code == 200, 60, daemon.log
    )
    return url


def start_segment_standin(daemons: Daemons, folder: Path) -> str:
    """The Segment stand-in (its command-line program, recording every event); return its URL."""
    url_file = folder / "segment-standin.url"
    module = "standins.segment_standin"
    argv = [sys.executable, "-m", module, "--port", "0", "--record", "full", "--url-file", str(url_file)]
    daemon = daemons.start("segment-standin", argv)
    daemons.wait_until("Segment stand-in", lambda: url_file.read_text().strip() != "", 60, daemon.log)
    url = url_file.read_text().strip()
    daemons.wait_until(
        "Segment stand-in", lambda: _get(f"{url}/_standin/stats").status_code == 200, 60, daemon.log
    )
    return url


def aws_connection(endpoint_url: str) -> str:
    """``aws_default`` pointing at moto's server, with dummy keys."""
    return json.dumps(
        {
            "conn_type": "aws",
            "login": "lsg-deploy-access-key",
            "password": "lsg-deploy-secret-key",
            "extra": {"endpoint_url": endpoint_url, "region_name": "us-east-1"},
        }
    )


# -------------------------------------------------------------------------------------------- Airflow


class CeleryAirflow(AirflowServices):
    """
    :class:`AirflowServices` with the CeleryExecutor and Celery workers, each with its own host name.

    ``extra_env`` must name the metadata database, the broker and the result backend.
    """

    def __init__(self, home: Path, dags_folder: Path, extra_env: dict[str, str]) -> None:
        super().__init__(home, dags_folder, extra_env)
        self.worker_hostnames: dict[str, str] = {}
        self.orphan_groups: set[int] = set()  # task processes of workers killed without them

    def start_worker(self, name: str, hostname: str, concurrency: int = 2) -> None:
        """``airflow celery worker`` on the queue ``default``, its tasks reporting ``hostname``."""
        env = dict(self.env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        env["AIRFLOW__CORE__HOSTNAME_CALLABLE"] = HOSTNAME_CALLABLE
        env[WORKER_HOSTNAME_ENV] = hostname
        argv = [
            AIRFLOW, "celery", "worker",
            "--celery-hostname", f"{name}@{hostname}",
            "--queues", "default",
            "--concurrency", str(concurrency),
            "--skip-serve-logs",
            "--pid", str(self.home / f"{name}.pid"),
        ]  # fmt: skip
        with open(self.home / f"{name}.log", "wb") as log:
            self.processes[name] = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.worker_hostnames[name] = hostname

    def wait_for_workers(self, timeout: float = 180) -> None:
        """Wait until every running worker told Celery it is ready."""
        deadline = time.monotonic() + timeout
        waiting = set(self.worker_hostnames) & set(self.processes)
        while waiting and time.monotonic() < deadline:
            self.check_alive()
            waiting = {
                name
                for name in waiting
                if " ready." not in (self.home / f"{name}.log").read_text(errors="replace")
            }
            time.sleep(0.5)
        if waiting:
            raise TimeoutError(
                f"workers {sorted(waiting)} not ready in {timeout}s:\n"
                + "\n".join(self.log_tail(name) for name in sorted(waiting))
            )

    def worker_of(self, hostname: str) -> str:
        return next(name for name, host in self.worker_hostnames.items() if host == hostname)

    def kill_worker(self, name: str, *, with_tasks: bool = True) -> set[int]:
        """
        SIGKILL a worker's process group (its main process, its pool and the task supervisors) and wait
        for it; return the process groups of its task processes.

        :param with_tasks: kill the task processes too, all at once, as a crashing machine would. Without,
            they live on as orphans (each task process leads a group of its own), until they notice that
            their supervisor is gone; :meth:`stop` kills any still alive.
        """
        process = self.processes.pop(name)
        task_groups = process_groups([process.pid]) - {process.pid}
        killed = {process.pid, *task_groups} if with_tasks else {process.pid}
        signal_groups(killed, signal.SIGKILL)
        process.wait(timeout=30)
        if not _wait_for(lambda: not live_group_members(killed), 30):
            raise RuntimeError(f"worker {name}: still alive after SIGKILL: {live_group_members(killed)}")
        self.stopped_groups |= {process.pid} | task_groups
        self.orphan_groups |= task_groups - killed
        return task_groups

    def stop(self) -> None:
        """Stop the services (:meth:`AirflowServices.stop`), then any orphaned task process left alive."""
        try:
            super().stop()
        finally:
            signal_groups(self.orphan_groups, signal.SIGKILL)
            _wait_for(lambda: not live_group_members(self.orphan_groups), 10)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Every task instance of a run (mapped ones included), as the UI's grid reads them."""
        response = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id)}/taskInstances")
        response.raise_for_status()
        return response.json()["task_instances"]
