"""Benchmark suites: contenders side by side, MLPerf-style logs, scores and reports."""
