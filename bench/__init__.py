"""Benchmarks that print figures as ratios against a baseline measured in the same run.

Run one with ``python -m bench.<name> --help`` (``api_latency``, ``upload_stream``, ``job_overhead``)
or all three at modest sizes with ``python -m bench``. Each prints a one-line summary and a JSON line
(prefixed ``BENCH_JSON``) with every figure.
"""
