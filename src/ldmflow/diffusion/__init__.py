"""Noise schedules, samplers, guidance and the one sample-then-decode loop. Imports no model."""
