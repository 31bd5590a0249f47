"""Health: the server's (``/health``, no auth, for load balancers) and each env's."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from ..deps import AUTH_RESPONSES, Authorized, EnvName, RegistryDep
from ..models import EnvHealth, PoolState, ServerHealth
from ..registry import UnknownEnv

router = APIRouter(tags=["health"])


@router.get("/health", response_model=ServerHealth)
def server_health() -> ServerHealth:
    """The server is up (no token needed)."""
    return ServerHealth()


@router.get(
    "/v1/envs/{name}/health",
    response_model=EnvHealth,
    dependencies=[Authorized],
    responses={**AUTH_RESPONSES, 404: {"description": "No env of that name"}},
)
def env_health(name: EnvName, registry: RegistryDep) -> EnvHealth:
    """The env's status and its warm pool's counters (items, scored, errors, restarts)."""
    try:
        rec, started, workers, counters = registry.pool_state(name)
    except UnknownEnv:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no env named {name!r}") from None
    return EnvHealth(
        name=name,
        status=rec.status,
        pool=PoolState(started=started, workers=workers, counters=counters),
    )
