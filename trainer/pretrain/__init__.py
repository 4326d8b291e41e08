"""Pretraining the tiny FLUX on a synthetic world, so its samples are pictures."""
