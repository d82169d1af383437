"""The engine: the training loop, pretraining, sampling, schedules, checkpoints, DDP, configs and
evaluation."""
