"""Scoring a trained model: validation loss and bits per byte, baselines, reports, loss curves, training-step timing."""
