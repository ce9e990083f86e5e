"""Metrics, offline sample quality and the memorization search (features, search, image sets, report)."""
