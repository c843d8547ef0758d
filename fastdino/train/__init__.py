"""Training loop, schedules, checkpoints and the collapse monitor."""
