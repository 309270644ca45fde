"""A configured master that forks one green celery worker (patched after configure()).

    python green_launch.py LIMIT NAME -- celery worker arguments...

The master configures the budget (unpatched), forks, and the child runs ``celery``'s own
entry point, which monkey-patches for ``-P gevent`` / ``-P eventlet`` before it imports the
app: the child inherits a budget whose locks were made before patching. SIGTERM is passed
on to the child; the master closes the budget once the child has exited.
"""

from __future__ import annotations

import os
import signal
import sys

import mppools


def main() -> int:
    limit, name = int(sys.argv[1]), sys.argv[2]
    args = sys.argv[sys.argv.index("--") + 1:]
    mppools.configure(limit, name, acquire_timeout=25)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            sys.argv = ["celery", *args]
            from celery.__main__ import main as celery_main

            celery_main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            os._exit(code)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGTERM))
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            status = 1
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            continue
    mppools.close()
    return os.waitstatus_to_exitcode(status) if status else 0


if __name__ == "__main__":
    sys.exit(main())
