"""Caravela trainer package."""
