"""Benchmarks: each prints ratios measured in one run (`python bench/NAME.py --help`)."""
