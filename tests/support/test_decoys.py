"""The decoy budgets of the session (support/decoys.py) are what they claim to be, and leave
nothing behind."""

from __future__ import annotations

import os
import pwd
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from .decoys import DECOY_USER, SHM, Decoys, DecoySet, is_decoy, remove_stale


def _entries(prefix: str) -> list[str]:
    return sorted(e for e in os.listdir(SHM) if prefix in e)


def _check(made: Decoys) -> None:
    from mppools._limiter.posix import list_budgets
    from mppools._slots import LAYOUT_VERSION, MAGIC

    budgets = list_budgets()
    assert set(made.names) <= set(budgets), (made, budgets)
    assert all(is_decoy(n) and n.startswith(made.prefix) for n in made.names)
    assert made.healthy is not None and made.garbage is not None
    assert made.bad_version is not None
    with open(f"{SHM}/mppools.{made.garbage}", "rb") as f:
        assert f.read(8) != MAGIC
    with open(f"{SHM}/mppools.{made.bad_version}", "rb") as f:
        head = f.read(12)
    assert head[:8] == MAGIC and struct.unpack("<I", head[8:])[0] != LAYOUT_VERSION
    done = subprocess.run([sys.executable, "-m", "mppools", "status", made.healthy],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    if os.geteuid() == 0 and made.other_user is None:
        pytest.fail(f"as root there must be a decoy of another user: {made.notes}")
    if made.other_user is not None:
        st = os.stat(f"{SHM}/mppools.{made.other_user}")
        assert st.st_uid == pwd.getpwnam(DECOY_USER).pw_uid != 0


@pytest.mark.timeout(60)
def test_session_decoys_exist(decoy_budgets: Decoys) -> None:
    if os.environ.get("MPPOOLS_TEST_NO_DECOYS") == "1":
        assert decoy_budgets.names == []
        pytest.skip("decoys are off (MPPOOLS_TEST_NO_DECOYS=1)")
    _check(decoy_budgets)


@pytest.mark.timeout(120)
def test_decoys_leave_nothing_behind(tmp_path: Path) -> None:
    prefix = f"decoy-{os.getpid()}-t{uuid.uuid4().hex[:6]}-"
    decoys = DecoySet(tmp_path, prefix=prefix)
    try:
        made = decoys.start()
        holders = [h.holder_pid for h in decoys._holders]
        assert holders and all(psutil.pid_exists(p) for p in holders)
        _check(made)
        share = decoys._share
    finally:
        decoys.stop()
    assert _entries(prefix) == []
    assert not any(psutil.pid_exists(p) for p in holders)
    assert share is None or not os.path.exists(share)
    decoys.stop()  # idempotent


@pytest.mark.timeout(30)
def test_stale_decoys_of_a_dead_session_are_removed() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=20)
    name = f"decoy-{dead.pid}-garbage"
    path = f"{SHM}/mppools.{name}"
    alive = f"{SHM}/mppools.decoy-{os.getpid()}-t{uuid.uuid4().hex[:6]}"
    for p in (path, alive):
        with open(p, "wb") as f:
            f.write(b"x" * 64)
    try:
        if psutil.pid_exists(dead.pid):  # reused already: nothing to prove this time
            pytest.skip(f"pid {dead.pid} was reused")
        assert f"mppools.{name}" in remove_stale()
        assert not os.path.exists(path) and os.path.exists(alive)
    finally:
        for p in (path, alive):
            if os.path.exists(p):
                os.unlink(p)
