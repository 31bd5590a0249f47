"""``/v1/envs``: register (build + admission canary in the background), list, inspect,
delete and score envs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Response, status

from reward_envs.pool import EnvStartError
from reward_envs.protocol import Item

from ..deps import AUTH_RESPONSES, BODY_RESPONSES, Authorized, EnvName, RegistryDep
from ..models import (
    Deleted,
    EnvList,
    EnvOut,
    RegisterRequest,
    ScoreRequest,
    ScoreResponse,
    ScoreResult,
)
from ..records import EnvRecord
from ..registry import EnvExists, EnvNotReady, UnknownEnv
from ..warm_pool import PoolClosed

router = APIRouter(
    prefix="/v1/envs", tags=["envs"], dependencies=[Authorized], responses=AUTH_RESPONSES
)

_UNKNOWN: dict[int | str, dict[str, Any]] = {404: {"description": "No env of that name"}}


def env_out(rec: EnvRecord) -> EnvOut:
    return EnvOut.model_validate(rec.model_dump(exclude={"registration"}))


def _unknown(name: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no env named {name!r}")


@router.post(
    "",
    response_model=EnvOut,
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        **BODY_RESPONSES,
        409: {"description": "An env of that name exists and replace is false"},
    },
)
def register_env(
    body: RegisterRequest, registry: RegistryDep, response: Response, replace: bool = False
) -> EnvOut:
    """Register an env and start admitting it: the record comes back ``building``; poll
    ``GET /v1/envs/{name}`` until it is ``ready``, ``rejected`` or ``failed``."""
    try:
        if body.path is not None:
            rec = registry.register_path(Path(body.path), body.isolation, replace, body.mixture)
        else:
            assert body.manifest is not None
            rec = registry.register_inline(
                body.manifest, body.files or {}, body.isolation, replace, body.mixture
            )
    except EnvExists as e:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"env {e.args[0]!r} is already registered; add ?replace=true to replace it",
        ) from None
    except ValueError as e:  # the manifest on disk, or inline files that cannot be written
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(e)) from None
    response.headers["Location"] = f"/v1/envs/{rec.name}"
    return env_out(rec)


@router.get("", response_model=EnvList)
def list_envs(registry: RegistryDep) -> EnvList:
    envs = [env_out(r) for r in registry.records()]
    return EnvList(envs=envs, count=len(envs))


@router.get("/{name}", response_model=EnvOut, responses=_UNKNOWN)
def get_env(name: EnvName, registry: RegistryDep) -> EnvOut:
    try:
        return env_out(registry.get(name))
    except UnknownEnv:
        raise _unknown(name) from None


@router.delete("/{name}", response_model=Deleted, responses=_UNKNOWN)
def delete_env(name: EnvName, registry: RegistryDep) -> Deleted:
    """Forget the env and stop its pool (a build in progress finishes and is dropped)."""
    try:
        registry.delete(name)
    except UnknownEnv:
        raise _unknown(name) from None
    return Deleted(name=name)


@router.post(
    "/{name}/score",
    response_model=ScoreResponse,
    responses={
        **_UNKNOWN,
        **BODY_RESPONSES,
        409: {"description": "The env is not ready"},
        503: {"description": "The env's workers cannot start"},
    },
)
def score(name: EnvName, body: ScoreRequest, registry: RegistryDep) -> ScoreResponse:
    """One result per item, in order: a score, or an error with its kind (never a silent 0)."""
    items = [Item(i.prompt, i.completion, i.fields) for i in body.items]
    try:
        build_hash, results = registry.score(name, items)
    except UnknownEnv:
        raise _unknown(name) from None
    except (EnvNotReady, PoolClosed) as e:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(e)) from None
    except EnvStartError as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(e)) from None
    return ScoreResponse(
        env=name,
        build_hash=build_hash,
        results=[
            ScoreResult(
                score=r.score, error=r.error, error_kind=r.error_kind, worker=r.worker, info=r.info
            )
            for r in results
        ],
    )
