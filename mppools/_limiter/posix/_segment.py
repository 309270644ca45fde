"""Opening a budget's shared objects safely: owner checks, layout checks, the directory.

Nothing of another user is ever used: the segment, the semaphore and the rendezvous
directory must belong to this user (``/dev/shm`` is sticky, so once checked they cannot be
swapped by anyone else). A segment of a foreign magic or layout version is refused, never
misread.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import Any

import posix_ipc

from mppools._errors import (
    BudgetNotFoundError,
    DamagedSegmentError,
    IncompatibleSegmentError,
    PermissionDeniedError,
)
from mppools._slots import HEADER_SIZE, LAYOUT_VERSION, MAGIC, SLOT_SIZE, WAITER_SIZE, Header, Table

from ._names import rendezvous_dir, sem_name, sem_path, shm_name, shm_path, tokens_path

__all__ = [
    "check_owner",
    "dir_mode",
    "ensure_dir",
    "open_semaphore",
    "open_shm",
    "open_tokens",
    "read_header",
    "remove_objects",
]


def _foreign(name: str, path: str, uid: int) -> PermissionDeniedError:
    return PermissionDeniedError(
        f"{path} belongs to uid {uid}, not to this user (uid {os.geteuid()}): another user "
        f"holds the name of budget {name!r}; use another name"
    )


def check_owner(name: str, path: str, st: os.stat_result) -> None:
    """Refuse an object of ``name`` that belongs to another user."""
    if st.st_uid != os.geteuid():
        raise _foreign(name, path, st.st_uid)


def dir_mode(mode: int) -> int:
    """The rendezvous directory's mode for objects of ``mode``: owner-only unless the
    budget is shared with the group."""
    return 0o700 | (0o070 if mode & 0o060 == 0o060 else 0)


def ensure_dir(name: str, mode: int) -> None:
    """Create (or check) the budget's rendezvous directory: ours, a real directory, and
    closed to everybody outside the budget's mode.

    Raises:
        PermissionDeniedError: it exists and belongs to another user, or is not a directory.
    """
    path = rendezvous_dir(name)
    wanted = dir_mode(mode)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, wanted)
        os.chmod(path, wanted)  # mkdir's mode went through the umask
    st = os.lstat(path)
    check_owner(name, path, st)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionDeniedError(f"{path} is not a directory; remove it")
    if stat.S_IMODE(st.st_mode) & ~wanted:
        os.chmod(path, wanted)  # ours but too open (made by hand): close it


def open_tokens(name: str, *, create: bool) -> int:
    """Open the budget's token file (never mapped: only its OFD locks matter, and a mapping
    would keep this process's open file description, and so its tokens, alive in forked
    children).

    Raises:
        BudgetNotFoundError: it does not exist and not ``create``.
        PermissionDeniedError: it belongs to another user or is not a regular file.
    """
    path = tokens_path(name)
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        raise BudgetNotFoundError(
            f"budget {name!r} has no token file ({path}); it was made by another mppools "
            f"version or is being removed"
        ) from None
    except OSError as exc:
        raise PermissionDeniedError(f"cannot open {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        check_owner(name, path, st)
        if not stat.S_ISREG(st.st_mode):  # pragma: no cover - O_NOFOLLOW, our directory
            raise PermissionDeniedError(f"{path} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_shm(name: str, *, create: bool, size: int, mode: int) -> tuple[Any, bool]:
    """Open (with ``create``, create) the segment; ``(shm, created)``.

    Raises:
        BudgetNotFoundError: no such budget and not ``create``.
        PermissionDeniedError: it cannot be opened or belongs to another user.
    """
    created = False
    try:
        if create:
            try:
                shm = posix_ipc.SharedMemory(shm_name(name), posix_ipc.O_CREX, mode=mode,
                                             size=size)
                created = True
            except posix_ipc.ExistentialError:
                shm = posix_ipc.SharedMemory(shm_name(name), 0)
        else:
            shm = posix_ipc.SharedMemory(shm_name(name), 0)
    except posix_ipc.ExistentialError:
        raise BudgetNotFoundError(f"no mppools budget named {name!r} on this host") from None
    except posix_ipc.PermissionsError:
        raise PermissionDeniedError(
            f"permission denied opening budget {name!r} ({shm_path(name)})"
        ) from None
    except (OSError, ValueError, MemoryError) as exc:
        raise PermissionDeniedError(
            f"cannot create the segment of budget {name!r} ({shm_path(name)}, {size} bytes): "
            f"{exc}"
        ) from None
    try:
        check_owner(name, shm_path(name), os.fstat(shm.fd))
    except BaseException:
        shm.close_fd()
        raise
    return shm, created


def open_semaphore(name: str, mode: int, *, create: bool = True) -> Any:
    """Open the budget's semaphore (creating it, count 0, with ``create``: the joiner's
    audit then settles its count) and check that it is this user's.

    Raises:
        PermissionDeniedError: it cannot be opened, or another user made it.
        DamagedSegmentError: without ``create``, there is none (an attach changes nothing,
            so it does not make one).
    """
    try:
        if create:
            sem = posix_ipc.Semaphore(sem_name(name), posix_ipc.O_CREAT, mode, 0)
        else:
            sem = posix_ipc.Semaphore(sem_name(name))
    except posix_ipc.ExistentialError:
        raise DamagedSegmentError(
            f"budget {name!r} has lost its semaphore ({sem_path(name)} is missing): a "
            "process that configures the budget re-creates it and settles its count, or "
            f"remove the budget with `mppools unlink {name} --force`"
        ) from None
    except posix_ipc.PermissionsError:
        raise PermissionDeniedError(
            f"permission denied opening the semaphore of budget {name!r} ({sem_path(name)}); "
            "another user may hold that name: use another name"
        ) from None
    try:
        st = os.lstat(sem_path(name))
        check_owner(name, sem_path(name), st)
        if not stat.S_ISREG(st.st_mode):  # pragma: no cover - sem_open made it
            raise PermissionDeniedError(f"{sem_path(name)} is not a semaphore")
    except BaseException:
        sem.close()
        raise
    return sem


def read_header(name: str, fd: int, size: int) -> Header | None:
    """The header of an initialized segment, None for an empty (uninitialized) one.

    Raises:
        IncompatibleSegmentError: not an mppools segment of this layout, or truncated.
    """
    where = shm_path(name)
    # pread on the one fd this process keeps of the segment: opening and closing another
    # (a temporary mmap dups the fd and closes the dup) would drop the budget mutex (a
    # process-owned lockf) that the caller holds
    if size < HEADER_SIZE:
        if size and os.pread(fd, size, 0).strip(b"\0"):
            raise IncompatibleSegmentError(
                f"{where} is not an mppools segment ({size} bytes); remove it with "
                f"`mppools unlink {name} --force`"
            )
        return None
    head = bytearray(os.pread(fd, HEADER_SIZE, 0))
    if len(head) < HEADER_SIZE:  # truncated meanwhile
        raise IncompatibleSegmentError(
            f"{where} is not an mppools segment ({len(head)} bytes); remove it with "
            f"`mppools unlink {name} --force`"
        )
    magic = bytes(head[: len(MAGIC)])
    if magic != MAGIC:
        if magic.strip(b"\0"):
            raise IncompatibleSegmentError(
                f"{where} is not an mppools segment (magic {magic!r}); remove it with "
                f"`mppools unlink {name} --force`"
            )
        return None
    header = Table(memoryview(head), 0, 0).read_header()
    if header.version != LAYOUT_VERSION or header.slot_size != SLOT_SIZE or (
        header.waiter_size != WAITER_SIZE or header.header_size != HEADER_SIZE
    ):
        raise IncompatibleSegmentError(
            f"budget {name!r} has layout version {header.version}, this mppools reads "
            f"version {LAYOUT_VERSION}; stop its users and run `mppools unlink {name} --force`"
        )
    return header


def remove_objects(name: str) -> None:
    """Unlink the segment, the semaphore and the rendezvous directory (and its sockets)."""
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory(shm_name(name))
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_semaphore(sem_name(name))
    path = rendezvous_dir(name)
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
            for entry in os.listdir(path):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(path, entry))
            os.rmdir(path)
