"""The documentation builds with Sphinx, offline, with every warning treated as an error."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.timeout(300)
@pytest.mark.skipif(
    importlib.util.find_spec("sphinx") is None,
    reason="sphinx is not installed (pip install sphinx furo myst-parser) - CI installs it",
)
def test_docs_build_without_warnings(tmp_path: Path) -> None:
    # -W: warnings are errors; -n is set by conf.py (nitpicky); -E: no cached environment.
    # intersphinx reads docs/_inventories/*.inv, so the build needs no network.
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")],
        capture_output=True, text=True, timeout=280, check=False,
    )
    assert result.returncode == 0, (
        f"sphinx-build failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
        f"{result.stderr[-8000:]}"
    )
    assert (tmp_path / "html" / "index.html").is_file()
