"""/metrics of a router attached to a cluster actor: its own series merged with the cluster's.

Each side feeds only its own inputs (the router: requests; the cluster: workers, handoffs,
pools), and both build every series from the same table. So a series both export is a sum: a
counter or histogram counts on one side only, a gauge is zero on the side that does not own it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

log = logging.getLogger("batonserve.router")


def merge_families(local: Iterable[Metric], remote: Iterable[Metric]) -> list[Metric]:
    """One family per name; samples with the same name and labels are added up."""
    out: dict[str, Metric] = {}
    for fam in local:
        out[fam.name] = copy.copy(fam)
        out[fam.name].samples = list(fam.samples)
    for fam in remote:
        mine = out.get(fam.name)
        if mine is None:
            out[fam.name] = fam
            continue
        index = {(s.name, tuple(sorted(s.labels.items()))): i for i, s in enumerate(mine.samples)}
        for s in fam.samples:
            i = index.get((s.name, tuple(sorted(s.labels.items()))))
            if i is None:
                mine.samples.append(s)
            else:
                mine.samples[i] = mine.samples[i]._replace(value=mine.samples[i].value + s.value)
    return list(out.values())


class _Merged:
    """A collector yielding the merged families (the cluster's fetched at each scrape)."""

    def __init__(self, local: CollectorRegistry, fetch: Callable[[], list[Metric]]) -> None:
        self.local = local
        self.fetch = fetch

    def collect(self) -> Iterable[Metric]:
        try:
            remote = self.fetch()
        except Exception as e:  # the router's own series still come out
            log.warning("cluster metrics unavailable: %s", type(e).__name__)
            remote = []
        return merge_families(self.local.collect(), remote)


def serve_merged(
    local: CollectorRegistry, fetch: Callable[[], list[Metric]], host: str, port: int
) -> tuple[Any, int]:
    """Start the /metrics HTTP server over the merged view; (server, bound port)."""
    view = CollectorRegistry(auto_describe=False)
    view.register(_Merged(local, fetch))  # type: ignore[arg-type]
    server, _thread = prometheus_client.start_http_server(port, addr=host, registry=view)
    return server, int(server.server_port)
