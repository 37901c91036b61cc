"""Training library shared by training stages: optimizer and schedules (optim), resumable
checkpoints (checkpoint), multi-process setup and torchrun relaunch (distributed), metrics (metrics)."""
