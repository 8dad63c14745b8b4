"""The load-testing harness: Matrix-like workloads, a bare-PostgreSQL ceiling,
closed- and open-loop drivers, and the report (table, JSON, PNG).

`persister bench` and `bench/run.py` both end in `harness.main`.
"""
