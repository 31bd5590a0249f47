"""Caravela orchestrator package."""
