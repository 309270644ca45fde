"""Write the small, local intersphinx inventories that ``docs/conf.py`` reads.

The documentation is built offline (CI has no internet), so instead of downloading
``objects.inv`` from docs.python.org and docs.celeryq.dev, ``conf.py`` reads the inventories
in this folder while the links still point to the real sites. Each inventory lists only the
objects these docs reference. Regenerate them after adding a reference::

    python docs/_inventories/make_inventories.py

Sources of the entries:

* python: lines copied verbatim from CPython 3.11's ``objects.inv`` (Debian package
  ``python3.11-doc``, ``/usr/share/doc/python3.11/html/objects.inv``).
* kombu / celery: the object names and pages of the kombu 5.7 and celery 5.7 reference docs
  (``docs/reference/*.rst`` of their sdists: ``reference/kombu.pools.rst`` documents
  ``kombu.pools`` and so on). ``setting`` and ``signal`` are the cross-reference types that
  celery's docs add through ``sphinx_celery`` (``std:setting`` / ``std:signal``, anchors
  ``std-setting-NAME`` / ``std-signal-NAME``); ``docs/conf.py`` registers the same roles.

Line format (Sphinx inventory v2): ``name domain:role priority uri dispname``; a ``$`` at
the end of ``uri`` stands for ``name``, a ``-`` dispname for ``name``.
"""

from __future__ import annotations

import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent

PYTHON = """\
BaseException py:exception 1 library/exceptions.html#$ -
BrokenPipeError py:exception 1 library/exceptions.html#$ -
Exception py:exception 1 library/exceptions.html#$ -
False py:data 1 library/constants.html#$ -
FileNotFoundError py:exception 1 library/exceptions.html#$ -
KeyboardInterrupt py:exception 1 library/exceptions.html#$ -
LookupError py:exception 1 library/exceptions.html#$ -
None py:data 1 library/constants.html#$ -
OSError py:exception 1 library/exceptions.html#$ -
PermissionError py:exception 1 library/exceptions.html#$ -
RuntimeError py:exception 1 library/exceptions.html#$ -
SystemExit py:exception 1 library/exceptions.html#$ -
TimeoutError py:exception 1 library/exceptions.html#$ -
True py:data 1 library/constants.html#$ -
TypeError py:exception 1 library/exceptions.html#$ -
ValueError py:exception 1 library/exceptions.html#$ -
abc.ABC py:class 1 library/abc.html#$ -
argparse py:module 0 library/argparse.html#module-$ -
argparse.ArgumentParser py:class 1 library/argparse.html#$ -
atexit py:module 0 library/atexit.html#module-$ -
bool py:class 1 library/functions.html#$ -
bytes py:class 1 library/stdtypes.html#$ -
collections.abc.Callable py:class 1 library/collections.abc.html#$ -
collections.abc.Iterable py:class 1 library/collections.abc.html#$ -
collections.abc.Iterator py:class 1 library/collections.abc.html#$ -
collections.abc.Sequence py:class 1 library/collections.abc.html#$ -
dataclasses.dataclass py:function 1 library/dataclasses.html#$ -
dict py:class 1 library/stdtypes.html#$ -
fcntl.lockf py:function 1 library/fcntl.html#$ -
float py:class 1 library/functions.html#$ -
int py:class 1 library/functions.html#$ -
list py:class 1 library/stdtypes.html#$ -
multiprocessing py:module 0 library/multiprocessing.html#module-$ -
multiprocessing.Process py:class 1 library/multiprocessing.html#$ -
object py:class 1 library/functions.html#$ -
os._exit py:function 1 library/os.html#$ -
os.close py:function 1 library/os.html#$ -
os.environ py:data 1 library/os.html#$ -
os.fork py:function 1 library/os.html#$ -
os.getpid py:function 1 library/os.html#$ -
os.kill py:function 1 library/os.html#$ -
os.pidfd_open py:function 1 library/os.html#$ -
os.register_at_fork py:function 1 library/os.html#$ -
queue.LifoQueue py:class 1 library/queue.html#$ -
select.poll py:function 1 library/select.html#$ -
signal py:module 0 library/signal.html#module-$ -
signal.SIGKILL py:data 1 library/signal.html#$ -
socket.socket.close py:method 1 library/socket.html#$ -
socket.socket.detach py:method 1 library/socket.html#$ -
socket.socket.shutdown py:method 1 library/socket.html#$ -
ssl.SSLSocket.unwrap py:method 1 library/ssl.html#$ -
str py:class 1 library/stdtypes.html#$ -
sys.exit py:function 1 library/sys.html#$ -
threading.Lock py:class 1 library/threading.html#$ -
threading.Thread py:class 1 library/threading.html#$ -
time.monotonic py:function 1 library/time.html#$ -
time.time py:function 1 library/time.html#$ -
tuple py:class 1 library/stdtypes.html#$ -
typing.Any py:data 1 library/typing.html#$ -
weakref.WeakSet py:class 1 library/weakref.html#$ -
weakref.finalize py:class 1 library/weakref.html#$ -
"""

KOMBU = """\
kombu py:module 0 reference/kombu.html#module-$ -
kombu.Connection py:class 1 reference/kombu.html#$ -
kombu.Connection.connect py:method 1 reference/kombu.html#$ -
kombu.Connection.Pool py:method 1 reference/kombu.html#$ -
kombu.Producer py:class 1 reference/kombu.html#$ -
kombu.Producer.publish py:method 1 reference/kombu.html#$ -
kombu.connection py:module 0 reference/kombu.connection.html#module-$ -
kombu.connection.Connection py:class 1 reference/kombu.connection.html#$ -
kombu.connection.ConnectionPool py:class 1 reference/kombu.connection.html#$ -
kombu.connection.ConnectionPool.acquire py:method 1 reference/kombu.connection.html#$ -
kombu.connection.ConnectionPool.release py:method 1 reference/kombu.connection.html#$ -
kombu.connection.ConnectionPool.force_close_all py:method 1 reference/kombu.connection.html#$ -
kombu.exceptions py:module 0 reference/kombu.exceptions.html#module-$ -
kombu.exceptions.LimitExceeded py:exception 1 reference/kombu.exceptions.html#$ -
kombu.exceptions.ConnectionLimitExceeded py:exception 1 reference/kombu.exceptions.html#$ -
kombu.pools py:module 0 reference/kombu.pools.html#module-$ -
kombu.pools.PoolGroup py:class 1 reference/kombu.pools.html#$ -
kombu.pools.ProducerPool py:class 1 reference/kombu.pools.html#$ -
kombu.pools.get_limit py:function 1 reference/kombu.pools.html#$ -
kombu.pools.register_group py:function 1 reference/kombu.pools.html#$ -
kombu.pools.reset py:function 1 reference/kombu.pools.html#$ -
kombu.pools.set_limit py:function 1 reference/kombu.pools.html#$ -
kombu.resource py:module 0 reference/kombu.resource.html#module-$ -
kombu.resource.Resource py:class 1 reference/kombu.resource.html#$ -
kombu.utils.collections py:module 0 reference/kombu.utils.collections.html#module-$ -
kombu.utils.collections.EqualityDict py:class 1 reference/kombu.utils.collections.html#$ -
"""

CELERY = """\
celery py:module 0 reference/celery.html#module-$ -
celery.Celery py:class 1 reference/celery.html#$ -
celery.Celery.pool py:attribute 1 reference/celery.html#$ -
celery.Celery.producer_pool py:attribute 1 reference/celery.html#$ -
celery.Celery.connection_for_write py:method 1 reference/celery.html#$ -
celery.Celery.connection_for_read py:method 1 reference/celery.html#$ -
celery.Celery.on_after_configure py:data 1 reference/celery.html#$ -
celery.Celery.on_after_fork py:data 1 reference/celery.html#$ -
celery.bootsteps py:module 0 reference/celery.bootsteps.html#module-$ -
celery.bootsteps.StartStopStep py:class 1 reference/celery.bootsteps.html#$ -
broker_pool_limit std:setting -1 userguide/configuration.html#std-setting-$ -
broker_read_url std:setting -1 userguide/configuration.html#std-setting-$ -
worker_init std:signal -1 userguide/signals.html#std-signal-$ -
worker_process_init std:signal -1 userguide/signals.html#std-signal-$ -
worker_process_shutdown std:signal -1 userguide/signals.html#std-signal-$ -
"""

INVENTORIES = {
    "python.inv": ("Python", "3.11", PYTHON),
    "kombu.inv": ("Kombu", "5.7", KOMBU),
    "celery.inv": ("Celery", "5.7", CELERY),
}


def render(project: str, version: str, entries: str) -> bytes:
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        f"# Version: {version}\n"
        "# The remainder of this file is compressed using zlib.\n"
    ).encode()
    lines = sorted(line for line in entries.splitlines() if line.strip())
    return header + zlib.compress(("\n".join(lines) + "\n").encode())


def main() -> None:
    for filename, (project, version, entries) in INVENTORIES.items():
        (HERE / filename).write_bytes(render(project, version, entries))
        print(f"wrote {HERE / filename}")


if __name__ == "__main__":
    main()
