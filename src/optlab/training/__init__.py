"""Training: models, optimizers and schedules by name, the engine (pure step functions), the one
epoch driver and its callbacks, the resume backup and the run's record."""
