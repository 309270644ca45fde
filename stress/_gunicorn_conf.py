"""gunicorn.conf.py of the ``gunicorn`` bench figure: 8 sync workers; for ``BENCH_G_MODE=
mppools`` the budget (``MPPOOLS_LIMIT``, ``MPPOOLS_NAME`` in the environment) is configured
in the master's ``on_starting`` by mppools' documented hooks, before any worker forks."""

from __future__ import annotations

import os

from mppools.integrations.gunicorn import hooks

worker_class = "sync"
workers = int(os.environ.get("BENCH_G_WORKERS", "8"))
timeout = 60
graceful_timeout = 5
backlog = 2048
loglevel = "warning"
accesslog = None

if os.environ.get("BENCH_G_MODE") == "mppools":
    on_starting, child_exit, on_exit = hooks()
