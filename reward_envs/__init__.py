"""Caravela reward_envs package."""
