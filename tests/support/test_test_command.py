"""The README's test command is what CI runs, and it cannot pass without running tests."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMAND = "bash scripts/test"


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MPPOOLS_TEST_INSTALL="0", MPPOOLS_TEST_STATIC="0",
               MPPOOLS_TEST_NO_DECOYS="1")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "test"), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    if "not installed:" in done.stderr:
        pytest.skip(f"scripts/test would install first: {done.stderr.strip()[-300:]}")
    return done


@pytest.mark.timeout(30)
def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running the tests", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert blocks and blocks[0].strip() == COMMAND, blocks
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.lstrip().startswith("#")]
    assert ci[-1] == f'exec {COMMAND} "$@"', ci


@pytest.mark.timeout(130)
def test_no_tests_collected_fails(tmp_path: Path) -> None:
    (tmp_path / "test_nothing.py").write_text("")
    done = _run([str(tmp_path)], tmp_path)
    assert done.returncode == 5, (done.stdout, done.stderr)
    assert "collected no tests" in done.stderr
    assert "to install" not in done.stderr  # everything here is installed: it only checked


@pytest.mark.timeout(130)
def test_passes_pytest_arguments_and_exit_code(tmp_path: Path) -> None:
    (tmp_path / "test_two.py").write_text("def test_ok():\n    pass\n\n"
                                          "def test_bad():\n    assert False\n")
    ok = _run([str(tmp_path), "-k", "ok"], tmp_path)
    assert ok.returncode == 0 and "1 passed" in ok.stdout, (ok.stdout, ok.stderr)
    bad = _run([str(tmp_path)], tmp_path)
    assert bad.returncode == 1 and "1 failed, 1 passed" in bad.stdout, (bad.stdout, bad.stderr)
