"""Experiment configs: typed dataclasses (the single source of truth), their JSON schemas, loading and validation."""
