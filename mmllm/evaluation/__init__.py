"""Evaluation: task definitions with exact scorers, metrics, and result reports.

`tasks` holds the task contract and registry, `toy` the toy-world tasks scored by the oracles
of `mmllm.data.oracles`, `metrics` word error rate and aggregation, `report` the markdown table
and the image grid of a results file.
"""
