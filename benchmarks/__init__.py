"""Benchmarks: speed and quality scripts with their pass/fail targets (not installed)."""
