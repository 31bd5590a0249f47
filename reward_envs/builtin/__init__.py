"""Reward environments that ship inside the Caravela repo (no download needed)."""
