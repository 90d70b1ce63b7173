"""Benchmarks behind `make bench`: each suite measures flows against a raw-Python baseline.

Run `python -m bench [SUITE...]`; rows are printed as a table and written to bench/results.json.
"""
