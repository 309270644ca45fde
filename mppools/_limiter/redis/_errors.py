"""Errors of the cross-host lease client; defined in :mod:`mppools._errors` (exported by
:mod:`mppools`), re-exported here for the lease modules."""

from __future__ import annotations

from mppools._errors import CoordinationError, LeaseLostError

__all__ = ["CoordinationError", "LeaseLostError"]
