"""Child processes of the stand-ins (the demo, the tests and the benchmark start them)."""

from __future__ import annotations

import subprocess


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a child process: SIGTERM, then SIGKILL when it is still running after ``timeout`` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
