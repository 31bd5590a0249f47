"""What two or more of Caravela's components share, in one neutral place.

``trainer``, ``inference_server``, ``reward_envs`` and ``slurm`` never import each other
or ``orchestrator``; what they have in common lives here, and this package imports none of
them (``tests/test_imports.py`` checks both).
"""
