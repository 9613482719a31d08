"""Cases tried by tests/test_hostile.py, per property; conftest's terminal summary prints them."""

from __future__ import annotations

from collections import Counter

COUNTS: Counter[str] = Counter()
