"""Evaluation: re-identification and utility metrics, image baselines, privacy–utility plots."""
