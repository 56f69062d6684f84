"""Parts of the benchmark that scripts/benchmark.py runs."""
