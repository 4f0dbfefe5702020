"""The daemon: an asyncio host of one or many nodes (timers, workers, transports), run-directory
files, checkpoints and logs."""
