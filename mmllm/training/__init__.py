"""Pretraining on the DeepSpeed engine: run config, DeepSpeed JSON, objectives, loop, checkpoints."""
