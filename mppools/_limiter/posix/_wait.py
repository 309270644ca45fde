"""Waiting for a slot: wake-up sockets, the process's holder watcher, sleeping in slices.

A waiting thread sleeps on (a) its own datagram socket, bound to a path in the budget's
owner-only directory, which a releasing process writes to when it hands the thread a slot,
and (b) pidfds of the slot holders it can see (same PID namespace), which become readable
the moment a holder's process has exited; then it audits. Everything else (holders in other
namespaces, holders beyond what the watcher may open) is audited when a slice ends: of
:data:`SLICE` seconds for the head of the queue, :data:`BEHIND_SLICES` times that for the
others (one audit serves the whole budget; each costs the CPU of a few publishes, and a host
with many waiters behind a few slots would otherwise spend it many times over).

The pidfds are owned by ONE watcher per process and shared by all its waiting threads, with a
cap of :data:`MAX_WATCHED` for the process: waiting costs a bounded number of fds however many
threads wait, and running out of fds (EMFILE) only means more holders are left to the slices.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import socket
import struct
from collections.abc import Iterable

from mppools import _green
from mppools._liveness import is_alive

from ._names import waiter_path

__all__ = ["BEHIND_SLICES", "MAX_WATCHED", "SLICE", "Watcher", "bind_waiter", "close_waiter",
           "notify", "offer", "sleep"]

#: seconds the head of the queue (the oldest waiter) sleeps at most before it audits and
#: re-sends its idle-yield requests
SLICE = 0.1
#: ... and every other waiter, this many slices: an audit is for the whole budget, and the
#: head's serves all (a grant or an offer wakes a waiter at once whatever its slice; a
#: holder's death too, where its pidfd can be watched)
BEHIND_SLICES = 4
#: pidfds of holders one process keeps open at most, for all its waiting threads together
MAX_WATCHED = 64
#: a loan offer's datagram (lending): b"o", then the lender's owner and the offer's ticket
_OFFER = struct.Struct(">cQQ")


class Watcher:
    """pidfds of slot holders, shared by every waiting thread of this process."""

    def __init__(self) -> None:
        self._lock = _green.Lock()
        self._fds: dict[tuple[int, int], list[int]] = {}  # ident -> [fd, users]

    def watch(
        self, idents: Iterable[tuple[int, int]]
    ) -> tuple[dict[tuple[int, int], int], set[tuple[int, int]]]:
        """Take a reference on a pidfd for each of ``idents`` (pid, start ticks) it can.

        Returns the fds taken and the holders already gone or not the recorded process any
        more (worth an audit now). Holders left out otherwise (cap reached, out of fds, no
        pidfd support, /proc unreadable) are left to the slices: a failed look-up never
        counts as a death, the tokens decide that.
        """
        taken: dict[tuple[int, int], int] = {}
        gone: set[tuple[int, int]] = set()
        with self._lock:
            for ident in idents:
                entry = self._fds.get(ident)
                if entry is not None:
                    entry[1] += 1
                    taken[ident] = entry[0]
                    continue
                if len(self._fds) >= MAX_WATCHED:
                    continue
                try:
                    fd = os.pidfd_open(ident[0])
                except ProcessLookupError:
                    gone.add(ident)
                    continue
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                        break  # out of fds: the rest wait for the slices
                    continue  # no pidfd here (old kernel, seccomp): slices
                try:
                    same = is_alive(*ident)
                except Exception:  # /proc unreadable now (out of fds): no judgement
                    os.close(fd)
                    continue
                if not same:  # the pid was reused, or it is exiting
                    os.close(fd)
                    gone.add(ident)
                    continue
                self._fds[ident] = [fd, 1]
                taken[ident] = fd
        return taken, gone

    def unwatch(self, idents: Iterable[tuple[int, int]]) -> None:
        """Drop references taken by :meth:`watch`; the last one closes the pidfd."""
        with self._lock:
            for ident in idents:
                entry = self._fds.get(ident)
                if entry is None:
                    continue
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._fds[ident]
                    os.close(entry[0])

    def open_count(self) -> int:
        return len(self._fds)

    def after_fork_in_child(self) -> None:
        # the parent's waiting threads do not exist here; our fd copies are only fds
        fds, self._fds = self._fds, {}
        self._lock = _green.Lock()
        for fd, _ in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)


def bind_waiter(name: str) -> tuple[int, socket.socket]:
    """A fresh wake-up socket bound in the budget's directory: ``(nonce, socket)``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        for _ in range(8):
            nonce = secrets.randbits(63) or 1
            try:
                sock.bind(waiter_path(name, nonce))
            except FileExistsError:  # pragma: no cover - 63 random bits
                continue
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:  # pragma: no cover - 63 random bits
                    continue
                raise
            return nonce, sock
        raise RuntimeError("could not bind a wake-up socket")  # pragma: no cover
    except BaseException:
        sock.close()
        raise


def close_waiter(name: str, nonce: int, sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        os.unlink(waiter_path(name, nonce))
    sock.close()


def sleep(sock: socket.socket, fds: Iterable[int], timeout: float,
          ) -> tuple[bool, bool, list[tuple[int, int]]]:
    """Sleep until woken through ``sock``, a pidfd in ``fds`` is readable, or ``timeout``.

    Returns ``(woken, holder died, offers)``: the loan offers among the wake-ups (see
    :func:`offer`), as ``(lender's owner, ticket)``. Wake-up datagrams are drained.
    """
    sfd = sock.fileno()
    ready = _green.wait_readable([sfd, *fds], max(timeout, 0.0))
    woken = sfd in ready
    died = any(fd != sfd for fd in ready)
    offers: list[tuple[int, int]] = []
    if woken:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while True:
                data = sock.recv(64)
                if len(data) == _OFFER.size and data[:1] == b"o":
                    _, owner, ticket = _OFFER.unpack(data)
                    offers.append((owner, ticket))
    return woken, died, offers


def notify(paths: Iterable[str]) -> None:
    """Wake the waiters bound at ``paths`` (one that just left or died is covered by audits)."""
    paths = list(paths)
    if not paths:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        for path in paths:
            with contextlib.suppress(OSError):
                s.sendto(b"g", path)


def offer(path: str, owner: int, ticket: int) -> bool:
    """Offer the waiter bound at ``path`` the loan ``ticket`` of the lender ``owner``; False
    if it could not be told (it left, or died)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        try:
            s.sendto(_OFFER.pack(b"o", owner, ticket), path)
        except OSError:
            return False
    return True
