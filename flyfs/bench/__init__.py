"""Benchmarks (`flyfs bench NAME` or `python -m flyfs.bench NAME`).

Each prints its parameters, then a table of item / value / baseline / ratio,
where the baseline is measured in the same run on the same machine. They
never fail for being slow.
"""
