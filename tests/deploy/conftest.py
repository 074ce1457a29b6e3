"""Fixtures for the chart tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from chart_helpers import SCENARIOS, Docs, parse, template

_cache: dict[str, Docs] = {}


@pytest.fixture(scope="session")
def rendered() -> Callable[[str], Docs]:
    """Rendered documents of a named scenario, rendered once per session."""

    def get(scenario: str) -> Docs:
        if scenario not in _cache:
            r = template(SCENARIOS[scenario])
            assert r.returncode == 0, r.stderr
            _cache[scenario] = parse(r.stdout)
        return _cache[scenario]

    return get
