"""Training with the official recipe: the loss and its target assignment, the epoch loop, distributed setup,
resumable state, monitors, the learning-rate schedule and the EMA. `python -m asff_viz.train` is the command."""
