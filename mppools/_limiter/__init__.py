"""Limiters: one interface, several backends (POSIX shared memory today)."""

from __future__ import annotations

from mppools._limiter._base import AuditReport, BudgetStats, HolderStats, Limiter, Slot

__all__ = ["AuditReport", "BudgetStats", "HolderStats", "Limiter", "Slot"]
