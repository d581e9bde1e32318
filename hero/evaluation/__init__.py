"""Scoring world models against the procedural world's rendered truth: held-out tables, drift, sampling sensitivity."""
