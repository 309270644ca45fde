"""Names and paths of a budget's shared objects, and listing the budgets of this host.

A budget called ``NAME`` is made of:

* ``/dev/shm/mppools.NAME``: the segment (header, slot and waiter tables, token bytes);
* ``/dev/shm/sem.mppools.NAME.free``: the semaphore counting free slots;
* ``/dev/shm/mppools.NAME.d/``: an owner-only directory (0700) holding the token file
  (``tokens``, see :mod:`._tokens`) and the path sockets that wake waiters (``w-<nonce>``)
  and receive idle-yield requests (``k-<owner>``). Path sockets,
  unlike abstract ones, exist in every network namespace that shares the filesystem and obey
  file permissions: no other user can connect to, or squat, an address in there.
"""

from __future__ import annotations

import os
import re
import secrets
import stat

from mppools._errors import ConfigurationError

__all__ = [
    "NAME_PATTERN",
    "SHM_DIR",
    "default_name",
    "exists",
    "keeper_path",
    "lend_path",
    "list_budgets",
    "rendezvous_dir",
    "sem_name",
    "sem_path",
    "shm_name",
    "shm_path",
    "tokens_path",
    "validate_name",
    "waiter_path",
]

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}\Z")
SHM_DIR = "/dev/shm"
_MAX_NAME = 48


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid budget name, else raise ConfigurationError."""
    if not isinstance(name, str):
        raise ConfigurationError(f"budget name must be a str, not {type(name).__name__}")
    if not NAME_PATTERN.match(name) or name.endswith(".d"):
        # "NAME.d" would be the rendezvous directory of budget NAME
        raise ConfigurationError(
            f"invalid budget name {name!r}: use 1 to {_MAX_NAME} characters of letters, "
            "digits, '.', '_' or '-', starting with a letter or digit, not ending in '.d'"
        )
    return name


def default_name() -> str:
    """A fresh name nobody can predict (so no other user can squat it before we create it)."""
    return f"pid{os.getpid()}-{secrets.token_hex(6)}"


def shm_name(name: str) -> str:
    return f"/mppools.{name}"


def sem_name(name: str) -> str:
    return f"/mppools.{name}.free"


def shm_path(name: str) -> str:
    return f"{SHM_DIR}/mppools.{name}"


def sem_path(name: str) -> str:
    return f"{SHM_DIR}/sem.mppools.{name}.free"


def rendezvous_dir(name: str) -> str:
    return f"{SHM_DIR}/mppools.{name}.d"


def tokens_path(name: str) -> str:
    """The file whose byte locks (OFD locks) prove the holders of slots and waiters alive."""
    return f"{rendezvous_dir(name)}/tokens"


def waiter_path(name: str, nonce: int) -> str:
    """Where a waiting thread is woken by a hand-off."""
    return f"{rendezvous_dir(name)}/w-{nonce:016x}"


def keeper_path(name: str, owner: int) -> str:
    """Where the keeper of the process image ``owner`` receives idle-yield requests."""
    return f"{rendezvous_dir(name)}/k-{owner:016x}"


def lend_path(name: str, owner: int) -> str:
    """Where the process image ``owner`` lends its idle connections (a stream socket)."""
    return f"{rendezvous_dir(name)}/l-{owner:016x}"


def exists(name: str) -> bool:
    """True if a budget (segment) of that name exists on this host."""
    validate_name(name)
    return os.path.exists(shm_path(name))


def list_budgets() -> list[str]:
    """Names of the mppools budgets whose segments exist in /dev/shm (anyone's)."""
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return []
    names = []
    for entry in entries:
        if not entry.startswith("mppools."):
            continue
        name = entry[len("mppools."):]
        try:
            regular = stat.S_ISREG(os.lstat(os.path.join(SHM_DIR, entry)).st_mode)
        except FileNotFoundError:  # removed since listdir()
            continue
        if regular and NAME_PATTERN.match(name):
            names.append(name)
    return sorted(names)
