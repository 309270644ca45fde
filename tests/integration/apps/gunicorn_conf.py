"""gunicorn.conf.py of the integration tests: the documented three-line setup."""

from mppools.integrations.gunicorn import child_exit, on_exit, on_starting  # noqa: F401

worker_class = "sync"
timeout = 30
graceful_timeout = 5
