"""Engines that join or leave a run while it trains (elastic inference).

An engine joins when a node offering the ``inference_node`` resource joins the Ray cluster
(on SLURM, a preempted inference node that comes back), or when the engine count is raised
through the run's API. It is started like the others (``EngineSpawner.add``: the next ids,
placed by the resource), gets the weights the others serve (``EngineRouter.add`` calls
``Parts.restore_engine``) and takes work from the next rollout; the next push forms the
weight-push group again with it (``membership`` changed). A drained engine gets no new
requests, finishes those it holds, is killed and leaves for good; the run goes on.

``Scaler.step`` does all of it at the one point of a step where nothing is in flight
(``Parts.scale``, called by the loop), with one GCS call (``ray.nodes``) when nothing
changes. The run aims at ``target`` engines: at first the engines it started; a change in
the number of inference nodes moves it by ``engines_per_node`` per node; the API sets it
(at most what the inference nodes hold) or lowers it by draining a named engine. Engines
are started only when the nodes or the API changed something, up to the target and the
nodes' room (``nodes x engines_per_node``, counting serving and restarting engines), so a
node that comes back gives room to its restarting engines first. Engines are drained only
when the API asks: restarting ones first, then the newest.

With ``env_api.enabled`` the run's API (orchestrator/live.py) also serves ``/v1/engines``
(``router`` below) under the env API's bearer token. Its handlers only record a request
in an ``EngineRequests`` (thread-safe) and answer 202 with what the next step will do;
``GET`` shows the engines as the last step saw them.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from reward_envs.api.deps import AUTH_RESPONSES, Authorized

if TYPE_CHECKING:
    from inference_server.actors import EngineSpawner
    from inference_server.router import EngineRouter

EngineState = Literal["serving", "draining", "restarting", "left", "dead"]


class EngineOut(BaseModel):
    """One engine of the run."""

    id: str
    state: EngineState
    """``serving``; ``draining`` (no new requests, leaves once it holds none);
    ``restarting`` (its actor died or hung); ``left`` (drained); ``dead`` (restarts spent)."""
    version: int | None
    """Weight version it serves; None when it serves nothing."""


class EngineList(BaseModel):
    """The run's engines as its last step saw them."""

    step: int | None = None
    """The step they were seen at; None before the first step."""
    engines: list[EngineOut] = []
    target: int = 0
    """Engines the run aims at."""
    capacity: int = 0
    """Engines the inference nodes hold (nodes x ``engines_per_node``)."""
    asked_target: int | None = None
    """A new target asked for, applied at the next step."""
    asked_drains: list[str] = []
    """Engines asked to drain, at the next step."""


class TargetRequest(BaseModel):
    """``PUT /v1/engines``."""

    engines: int = Field(ge=1, description="Engines the run should have (at least 1).")


class Accepted(BaseModel):
    """What the next step will do with a request."""

    detail: str


class UnknownEngine(LookupError):
    """No engine of that id."""


class EngineGone(ValueError):
    """The engine cannot be drained (it left, or it is the last one serving)."""


class EngineRequests:
    """What the API asked for (a target count, engines to drain) and the engines as the last
    step saw them; shared by the API's threads and the driver."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._target: int | None = None
        self._drains: list[str] = []
        self._seen = EngineList()

    def ask_target(self, n: int) -> str:
        """Record a target of ``n`` engines (a later one replaces it); what will happen."""
        with self._lock:
            self._target = n
            seen = self._seen
        active = sum(e.state in ("serving", "restarting") for e in seen.engines)
        if seen.step is None or n == active:
            return f"at the next step the run aims at {n} engines"
        if n < active:
            return f"at the next step {active - n} engines are drained ({active} -> {n})"
        room = "" if n <= seen.capacity else f"; only {seen.capacity} fit on the inference nodes"
        return f"at the next step {n - active} engines start ({active} -> {n}){room}"

    def ask_drain(self, engine_id: str) -> str:
        """Record that ``engine_id`` is to drain; what will happen. Raises ``UnknownEngine``
        or ``EngineGone``."""
        with self._lock:
            seen = self._seen
            states = {e.id: e.state for e in seen.engines}
            if engine_id not in states:
                when = "" if seen.step is not None else " (the list is filled at the first step)"
                raise UnknownEngine(f"no engine {engine_id!r}; the run's: {list(states)}{when}")
            if states[engine_id] in ("left", "dead"):
                raise EngineGone(f"engine {engine_id!r} has already left ({states[engine_id]})")
            others = [e for e, s in states.items() if s == "serving" and e != engine_id]
            if not others:
                raise EngineGone(
                    f"engine {engine_id!r} is the last engine serving; a run needs one: "
                    "raise the engine count first (PUT /v1/engines)"
                )
            if engine_id not in self._drains:
                self._drains.append(engine_id)
        return (
            f"at the next step engine {engine_id!r} gets no new requests, finishes those it "
            "holds and leaves"
        )

    def take(self) -> tuple[int | None, list[str]]:
        """The target and drains asked since the last call (cleared)."""
        with self._lock:
            asked = self._target, self._drains
            self._target, self._drains = None, []
        return asked

    def publish(self, seen: EngineList) -> None:
        with self._lock:
            self._seen = seen

    def seen(self) -> EngineList:
        """The engines as the last step saw them, with the requests not applied yet."""
        with self._lock:
            return self._seen.model_copy(
                update={"asked_target": self._target, "asked_drains": list(self._drains)}
            )


class Scaler:
    """Starts engines that join the run and drains those that leave (``step``)."""

    def __init__(self, router: EngineRouter, spawner: EngineSpawner) -> None:
        self.router, self.spawner = router, spawner
        self.nodes = spawner.nodes
        """Inference nodes at the last step."""
        self.target = len(router.engines)
        """Engines the run aims at."""

    def capacity(self) -> int:
        return self.nodes * self.spawner.per_node

    def placed(self) -> list[str]:
        """Engines holding a place on the inference nodes, in the order they are drained:
        restarting ones first, then the serving ones, newest first (draining ones are on
        their way out)."""
        states = list(self.router.states().items())
        restarting = [e for e, s in states if s == "restarting"]
        return restarting + [e for e, s in reversed(states) if s == "serving"]

    def step(
        self, step: int, version: int, requests: EngineRequests | None, log: Any = print
    ) -> dict[str, float]:
        """Apply node changes and the API's requests (nothing may be in flight); publish
        the engines to ``requests``."""
        from inference_server.actors import inference_nodes

        self.router.poll()  # drained engines whose work is done leave, replacements enter
        changed = False
        nodes = len(inference_nodes())
        if nodes != self.nodes:
            was, self.nodes = self.nodes, nodes
            self.target = max(1, self.target + (nodes - was) * self.spawner.per_node)
            changed = nodes > was
            log(f"step {step}: {nodes} inference nodes (were {was}): {self.target} engines wanted")
        asked, drains = requests.take() if requests is not None else (None, [])
        for eid in drains:
            try:
                self.router.drain(eid)
            except ValueError as e:
                log(f"step {step}: not drained: {e}")
                continue
            self.target = max(1, min(self.target, len(self.placed())))
            log(f"step {step}: engine {eid!r} drains (asked through the API)")
        if asked is not None:
            self.target, changed = min(asked, self.capacity()), True
            room = ""
            if asked > self.target:
                room = f" (only {self.target} fit on the {self.nodes} inference nodes)"
            log(f"step {step}: {asked} engines asked through the API{room}")
        placed = self.placed()
        if changed and self.target > len(placed):
            self._start(step, min(self.target, self.capacity()) - len(placed), version, log)
        elif asked is not None and self.target < len(placed):
            for eid in placed[: len(placed) - self.target]:
                try:
                    self.router.drain(eid)
                except ValueError as e:
                    log(f"step {step}: not drained: {e}")
                    break
                log(f"step {step}: engine {eid!r} drains (the API asked for {asked} engines)")
        if requests is not None:
            requests.publish(self._seen(step, version))
        return {"engines/target": float(self.target)}

    def _start(self, step: int, n: int, version: int, log: Any) -> None:
        """Start ``n`` engines, wait until they are ready (``spawner.timeout_s``), and put
        them in service with the weights of ``version``."""
        from ray.exceptions import RayError

        from inference_server.actors import PlacementError

        ids = self.spawner.add(n)
        log(f"step {step}: starting engines {ids}")
        try:
            handles = self.spawner.start(ids)
        except (PlacementError, RayError) as e:
            log(f"step {step}: engines {ids} did not start: {e}")
            return
        for eid, handle in handles.items():
            try:
                self.router.add(eid, handle)
            except RayError as e:
                import ray

                ray.kill(handle, no_restart=True)
                log(f"step {step}: engine {eid!r} did not take the weights: {e}")
                continue
            log(f"step {step}: engine {eid!r} joined, serving version {version}")

    def _seen(self, step: int, version: int) -> EngineList:
        states = self.router.states()
        return EngineList(
            step=step,
            engines=[
                EngineOut(
                    id=e,
                    state=cast(EngineState, s),
                    version=version if s in ("serving", "draining") else None,
                )
                for e, s in states.items()
            ],
            target=self.target,
            capacity=self.capacity(),
        )


def get_requests(request: Request) -> EngineRequests:
    box: EngineRequests = request.app.state.engine_requests
    return box


RequestsDep = Annotated[EngineRequests, Depends(get_requests)]
EngineId = Annotated[
    str, PathParam(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Engine id", examples=["hf-1"])
]

router = APIRouter(
    prefix="/v1/engines", tags=["engines"], dependencies=[Authorized], responses=AUTH_RESPONSES
)


@router.get("", response_model=EngineList)
def list_engines(box: RequestsDep) -> EngineList:
    """The run's engines (ids, state, weight version) as its last step saw them, and the
    requests the next step applies."""
    return box.seen()


@router.put("", response_model=Accepted, status_code=status.HTTP_202_ACCEPTED)
def set_engine_count(body: TargetRequest, box: RequestsDep) -> Accepted:
    """Ask for ``engines`` engines: at the next step more start (as far as the inference
    nodes have room) or the newest are drained."""
    return Accepted(detail=box.ask_target(body.engines))


@router.post(
    "/{engine_id}/drain",
    response_model=Accepted,
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        404: {"description": "No engine of that id"},
        409: {"description": "The engine left already, or is the last one serving"},
    },
)
def drain_engine(engine_id: EngineId, box: RequestsDep) -> Accepted:
    """Drain an engine at the next step: no new requests, it finishes those it holds and
    leaves the run for good."""
    try:
        return Accepted(detail=box.ask_drain(engine_id))
    except UnknownEngine as e:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(e)) from e
    except EngineGone as e:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(e)) from e
