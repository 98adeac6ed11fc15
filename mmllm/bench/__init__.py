"""`mmllm bench ...`: wall-clock comparisons against a named baseline, in one run, as ratios."""
