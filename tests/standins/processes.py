"""
The one way to run a stand-in: in this process on a thread (:class:`ServerThread`), or in a child process
started from its command line (:class:`StandInProcess`). The tests, the demo and the benchmark use these.
"""

from __future__ import annotations

import os
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from typing_extensions import Self

#: The folder that holds the ``standins`` package: child processes need it on their ``PYTHONPATH``.
TESTS_DIR = Path(__file__).resolve().parents[1]


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) with the ``standins`` package importable."""
    env = dict(os.environ if env is None else env)
    paths = [str(TESTS_DIR), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a child process: SIGTERM, then SIGKILL when it is still running after ``timeout`` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class ServerThread:
    """
    Serve a ``socketserver`` server on a background thread; :meth:`stop` shuts it down and closes it.

    :param server: the bound server.
    :param name: the thread's name.
    """

    def __init__(self, server: socketserver.BaseServer, name: str) -> None:
        self.server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return self.server.server_address[1]

    def stop(self, before_close: Callable[[], None] | None = None) -> None:
        """Stop serving, call ``before_close`` (e.g. to drop open connections), close the socket, join."""
        self.server.shutdown()
        if before_close is not None:
            before_close()
        self.server.server_close()
        self._thread.join(timeout=5)


class ThreadedStandIn:
    """
    The life cycle of a stand-in served by this process on a background thread: :meth:`start`, :meth:`stop`,
    ``with``. A subclass builds its bound server in :meth:`_make_server` and may drop open connections in
    :meth:`_before_close`; its handlers wait on :attr:`_stopping`, which :meth:`stop` sets.
    """

    _thread_name = "standin"

    def __init__(self) -> None:
        self._stopping = threading.Event()
        self._serving: ServerThread | None = None

    @property
    def running(self) -> bool:
        """Whether it is serving."""
        return self._serving is not None

    @property
    def base_url(self) -> str:
        """``scheme://host:port`` of the running server."""
        raise NotImplementedError

    def _make_server(self) -> socketserver.BaseServer:
        raise NotImplementedError

    def _before_close(self, server: socketserver.BaseServer) -> None:
        """Called once the server stopped serving, before its socket is closed."""

    def start(self) -> str:
        """Start serving in a background thread (if not already) and return :attr:`base_url`."""
        if self._serving is None:
            self._stopping.clear()
            self._serving = ServerThread(self._make_server(), self._thread_name)
        return self.base_url

    def stop(self) -> None:
        """Stop serving, release waiting handlers and close the socket (idempotent)."""
        serving, self._serving = self._serving, None
        if serving is None:
            return
        self._stopping.set()
        serving.stop(before_close=lambda: self._before_close(serving.server))

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class StandInProcess:
    """
    A stand-in started from its command line (``python -m standins.<module> ...``); its base URL is read
    from the first line of its output that contains ``url_marker``.

    :param name: a name for messages and the log file.
    :param command: the command line.
    :param url_marker: the text after which the line it prints gives its URL.
    :param log_dir: folder of its output file (default: a temporary folder).
    """

    def __init__(self, name: str, command: list[str], url_marker: str, log_dir: Path | None = None) -> None:
        self.name = name
        self.command = command
        self.url_marker = url_marker
        self.log_path = Path(log_dir or tempfile.mkdtemp(prefix="lsg-standin-")) / f"{name}.log"
        self.base_url = ""
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def module(
        cls, name: str, module: str, args: list[str], url_marker: str, **kwargs: object
    ) -> StandInProcess:
        """A stand-in run as ``python -m standins.<module> <args>`` by this interpreter."""
        return cls(name, [sys.executable, "-m", f"standins.{module}", *args], url_marker, **kwargs)

    @property
    def pid(self) -> int:
        """The process id."""
        if self._process is None:
            raise RuntimeError(f"the {self.name} stand-in is not running")
        return self._process.pid

    def start(self, timeout: float = 60.0) -> str:
        """Start it and wait until it prints its URL; return the URL."""
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=child_env()
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
                if self.url_marker in line:
                    self.base_url = line.partition(self.url_marker)[2].strip()
                    return self.base_url
            if self._process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the {self.name} stand-in did not start; see {self.log_path}")

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL after 10 s); idempotent."""
        process, self._process = self._process, None
        if process is not None:
            stop_process(process)

    def __enter__(self) -> StandInProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
