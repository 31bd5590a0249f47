"""Caravela inference_server package."""
