"""Scoring: the coco-caption toolkit metrics and the synthetic semantic check (no Ray)."""
