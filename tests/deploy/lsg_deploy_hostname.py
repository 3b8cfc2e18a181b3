"""
``[core] hostname_callable`` of the deployment test's Celery workers: the host name a worker's task
instances report, from ``LSG_DEPLOY_WORKER_HOSTNAME``, so that two workers on one machine show as two hosts
(as two machines would). Without the variable: the machine's name, as Airflow's default.
"""

from __future__ import annotations

import os
import socket


def hostname() -> str:
    """The worker's host name."""
    return os.environ.get("LSG_DEPLOY_WORKER_HOSTNAME") or socket.getfqdn()
