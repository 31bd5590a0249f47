"""One router per resource: ``envs`` (registration and scoring), ``health``, ``metrics``."""
