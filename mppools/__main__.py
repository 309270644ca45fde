"""``python -m mppools``: the ``mppools`` command (see :mod:`mppools.cli`)."""

from __future__ import annotations

from mppools.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
