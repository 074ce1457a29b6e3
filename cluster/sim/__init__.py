"""Cluster simulator and planner: the real cluster- and machine-level schedulers, timed by models.

No Ray and no torch: designs, traces and performance tables in; latencies, SLO attainment,
throughput, cost and power out.
"""
