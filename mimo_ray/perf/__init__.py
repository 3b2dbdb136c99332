"""Benchmark helpers behind ``jobs/bench.py``.

Analytic FLOPs (``flops``), timing statistics (``timing``), host probes (``host``), result tables (``report``) and
the measurement suites (``*_bench``). Ray placement lives only in the suites that start actors.
"""
