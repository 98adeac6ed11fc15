"""Datasets: the embedded toy world, readers of other formats, pretokenization and packing."""
