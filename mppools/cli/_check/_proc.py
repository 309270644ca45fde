"""What ``/proc`` tells about this host: TCP sockets and their processes, namespaces, fd limits.

Everything here only reads, and every look-up that fails (a process that exited meanwhile,
another user's ``/proc/PID/fd``) is skipped, never raised.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import resource
import sys
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "TcpSocket",
    "fd_soft_limit",
    "innermost_pid",
    "namespace_inode",
    "pids_of_inodes",
    "proc_fd_soft_limit",
    "tcp_sockets",
]

#: TCP states that hold a connection at the broker (or are about to): ESTABLISHED, SYN_SENT
_OPEN_STATES = frozenset({0x01, 0x02})


@dataclass(frozen=True, slots=True)
class TcpSocket:
    """One TCP socket of this network namespace (``/proc/net/tcp`` or ``tcp6``)."""

    local: tuple[str, int]
    remote: tuple[str, int]
    state: int
    uid: int
    inode: int


def _address(text: str) -> tuple[str, int]:
    """``0100007F:1F90`` (host byte order words, as the kernel prints them) -> (ip, port)."""
    hexaddr, hexport = text.split(":")
    raw = bytes.fromhex(hexaddr)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(hexport, 16)


def tcp_sockets(proc: str = "/proc/self/net") -> list[TcpSocket]:
    """The open (established or connecting) TCP sockets of ``proc``'s network namespace."""
    found: list[TcpSocket] = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"{proc}/{table}", encoding="ascii", errors="replace") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 10:
                continue
            try:
                state = int(parts[3], 16)
                if state not in _OPEN_STATES:
                    continue
                found.append(TcpSocket(_address(parts[1]), _address(parts[2]), state,
                                       int(parts[7]), int(parts[9])))
            except ValueError:
                continue
    return found


def _pids() -> list[int]:
    try:
        return sorted(int(e) for e in os.listdir("/proc") if e.isdigit())
    except OSError:
        return []


def pids_of_inodes(inodes: Iterable[int], uid: int) -> dict[int, int]:
    """socket inode -> pid, for the sockets among ``inodes`` that processes of ``uid`` have
    open (through ``/proc/PID/fd``; the first pid found when a socket is shared)."""
    wanted = {f"socket:[{i}]": i for i in inodes}
    found: dict[int, int] = {}
    if not wanted:
        return found
    for pid in _pids():
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            entries = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for entry in entries:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{entry}")
            except OSError:
                continue
            inode = wanted.get(target)
            if inode is not None and inode not in found:
                found[inode] = pid
        if len(found) == len(wanted):
            break
    return found


def namespace_inode(pid: int | str, kind: str) -> int | None:
    """The inode of ``pid``'s namespace ``kind`` (``pid``, ``net``), None if unreadable."""
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


def innermost_pid(pid: int) -> int | None:
    """The pid that process ``pid`` (of this PID namespace) has in its own, innermost PID
    namespace (the last ``NSpid`` of ``/proc/PID/status``); None if unreadable."""
    with contextlib.suppress(OSError, ValueError), open(
        f"/proc/{pid}/status", encoding="ascii", errors="replace"
    ) as f:
        for line in f:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    return None


def fd_soft_limit() -> int | None:
    """This process's soft RLIMIT_NOFILE (None: unlimited)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def proc_fd_soft_limit(pid: int) -> int | None:
    """The soft open-file limit of ``pid`` from ``/proc/PID/limits``; None if unreadable or
    unlimited."""
    with contextlib.suppress(OSError, ValueError), open(
        f"/proc/{pid}/limits", encoding="ascii", errors="replace"
    ) as f:
        for line in f:
            if line.startswith("Max open files"):
                soft = line[len("Max open files"):].split()[0]
                return None if soft == "unlimited" else int(soft)
    return None
