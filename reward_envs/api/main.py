"""Assembles the env API: settings, state, token, middleware and routers. Nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from common.http import SafeJSONResponse, install

from .limits import BodySizeLimit
from .metrics import ApiMetrics
from .registry import Registry
from .routes import envs, health, metrics
from .security import write_token
from .settings import ApiSettings


def create_app(settings: ApiSettings) -> FastAPI:
    """The API app over ``settings.state_dir``. Building it touches no file: at startup the
    registry takes the state dir and a new token is written there."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.registry.start()
        app.state.token = write_token(settings.token_file)
        try:
            yield
        finally:
            app.state.registry.close()

    app = FastAPI(
        title="Caravela env registry",
        summary="Register reward envs, admit them with a canary, score items through them.",
        version="1",
        lifespan=lifespan,
        default_response_class=SafeJSONResponse,
    )
    app.state.settings = settings
    app.state.metrics = ApiMetrics()
    app.state.registry = Registry(settings, app.state.metrics)
    app.state.token_file = settings.token_file
    install(app)  # JSON body guard and error handlers, inside the size limit
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.include_router(health.router)
    app.include_router(envs.router)
    app.include_router(metrics.router)
    return app
