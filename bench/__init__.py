"""A benchmark of the relay beside Debian's Postfix: `python bench/run.py`.

See README.md, section "Benchmark", for what it measures and how.
"""
