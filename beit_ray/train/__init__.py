"""Training: the DeepSpeed config, the per-worker loop, tasks, checkpoints (Ray Train driver side in trainer.py)."""
