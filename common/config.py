"""The base of every config section: strict pydantic models, and tagged-union defaults.

Pydantic only (no torch), so every component's ``config.py`` builds on it and still
validates in milliseconds (STYLE.md, point 1).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


def default_type(v: object, default: str) -> object:
    """A tagged-union section given as a dict without ``type`` gets the default one, so
    ``--set section.field=x`` alone means the default choice with that field set."""
    return {"type": default, **v} if isinstance(v, dict) and "type" not in v else v


class StrictModel(BaseModel):
    """Base for every Caravela config section: unknown keys are errors, docstrings document."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)
