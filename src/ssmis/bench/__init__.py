"""`ssmis bench`: suites of runs (methods x labelled counts x seeds x any config key) -> tables and plots."""

from ssmis.bench.grid import run_suite

__all__ = ["run_suite"]
