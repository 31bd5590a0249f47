"""Env registration REST API: register, admit (build + canary), score and watch reward envs.

``main.create_app(settings)`` assembles the FastAPI app; ``server.serve`` runs it with uvicorn.
"""
