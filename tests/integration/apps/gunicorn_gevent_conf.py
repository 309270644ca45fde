"""gunicorn.conf.py for the gevent integration test: the documented setup, gevent workers.

The budget is configured in the arbiter (``on_starting``), before gunicorn forks the workers
and each of them monkey-patches: mppools' locks exist before patching.
"""

from mppools.integrations.gunicorn import child_exit, on_exit, on_starting  # noqa: F401

worker_class = "gevent"
worker_connections = 100
timeout = 30
graceful_timeout = 5
