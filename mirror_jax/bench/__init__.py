"""Benchmarks in the package: the SpecBench method ladder (`mirror-jax bench`).

`questions` (the shipped SpecBench prompts), `models` (what the ladder decodes with), `runner`
(configuration and the timed and profiled passes), `aggregate`, `report` (machine info, tables,
artifacts), `plots`, `cli`.
"""
