"""Helpers for the metrics tests: read a Metrics registry back through the exposition parser."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from batonserve.cluster.metrics import Metrics


class Scrape:
    """One parsed `/metrics` text: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.families = list(text_string_to_metric_families(text))
        self.samples = [s for f in self.families for s in f.samples]

    def value(self, name: str, **labels: str) -> float | None:
        """The value of the one sample with this name and exactly these labels (None if absent)."""
        hits = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(hits) <= 1, f"{name}{labels} appears {len(hits)} times"
        return hits[0] if hits else None

    def labelsets(self, name: str) -> list[dict[str, str]]:
        """Every label set exported under sample `name`."""
        return [dict(s.labels) for s in self.samples if s.name == name]


@pytest.fixture
def scrape() -> Callable[[Metrics], Scrape]:
    """Parse a Metrics registry as Prometheus would read it."""
    return lambda m: Scrape(m.exposition().decode())
