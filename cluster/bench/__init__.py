"""`batonserve bench`: a gRPC load generator (Poisson, closed loop, trace replay) and its report."""

from batonserve.cluster.bench.report import BenchReport, summarize
from batonserve.cluster.bench.runner import BenchConfig, run_bench
from batonserve.cluster.bench.workload import BenchRequest, LengthSpec

__all__ = ["BenchConfig", "BenchReport", "BenchRequest", "LengthSpec", "run_bench", "summarize"]
