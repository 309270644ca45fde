"""The README's test command is what CI runs, and CI cannot pass without running tests."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMAND = "bash scripts/install-test-deps && python3 -m pytest -q"


def _ci_lines() -> list[str]:
    return [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


@pytest.mark.timeout(30)
def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running the tests", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert blocks and blocks[0].strip() == COMMAND, blocks
    lines = _ci_lines()
    assert lines[-1] == COMMAND, lines
    # errexit: pytest's exit 5 (no test collected) or any failure fails CI
    assert "set -euo pipefail" in lines


@pytest.mark.timeout(60)
def test_the_install_step_only_checks_when_everything_is_there() -> None:
    done = subprocess.run(["bash", str(ROOT / "scripts" / "install-test-deps")], cwd=ROOT,
                          env=dict(os.environ, MPPOOLS_TEST_INSTALL="0"),
                          capture_output=True, text=True, timeout=50, check=False)
    if "not installed:" in done.stderr:
        pytest.skip(f"this machine misses test dependencies: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stderr
    assert "to install" not in done.stderr and "apt-get" not in done.stderr


@pytest.mark.timeout(60)
def test_ci_fails_when_pytest_collects_nothing(tmp_path: Path) -> None:
    """The last line of .ci/run under its own shell options, on a directory without tests."""
    (tmp_path / "test_nothing.py").write_text("")
    script = "set -euo pipefail\n" + _ci_lines()[-1] + f" {tmp_path}\necho reached\n"
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, MPPOOLS_TEST_INSTALL="0",
                                   MPPOOLS_TEST_NO_DECOYS="1"),
                          timeout=50, check=False)
    assert done.returncode == 5, (done.stdout, done.stderr)
    assert "reached" not in done.stdout
