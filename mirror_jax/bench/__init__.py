"""Benchmark support: SpecBench questions and result reports (machine, versions, JSON/markdown)."""
