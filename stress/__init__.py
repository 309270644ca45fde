"""Benchmarks and stress tools for mppools: ``python -m stress bench|chaos ...``."""

from __future__ import annotations
