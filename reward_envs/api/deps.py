"""FastAPI dependencies: bearer-token auth, the registry, the metrics, a valid env name."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from reward_envs.config import ENV_NAME

from .metrics import ApiMetrics
from .registry import Registry
from .security import token_matches

bearer = HTTPBearer(
    auto_error=False,
    description="The token the server wrote to `<state_dir>/api-token` at start.",
)


def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """401 unless the request carries ``Authorization: Bearer <the server's token>``."""
    expected: str = request.app.state.token
    if credentials is None or not token_matches(credentials.credentials, expected):
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing or wrong bearer token: send the one in the server's api-token file",
            headers={"WWW-Authenticate": "Bearer"},
        )


def get_registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


def get_metrics(request: Request) -> ApiMetrics:
    metrics: ApiMetrics = request.app.state.metrics
    return metrics


Authorized = Depends(require_token)
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or wrong bearer token"}
}
BODY_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {"description": "Request body over the server's size limit"}
}
RegistryDep = Annotated[Registry, Depends(get_registry)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]
EnvName = Annotated[
    str,
    Path(
        pattern=ENV_NAME.pattern,
        description="Env name: lower-case letters, digits, '-' or '_', starting with a letter.",
        examples=["arith"],
    ),
]
