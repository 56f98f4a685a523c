"""The training engine: the trainer, its tasks, callbacks, loggers, distributed set-up and the checkpoint format."""
