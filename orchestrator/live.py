"""Envs that join or leave a run while it trains, through the env registration API.

With ``env_api.enabled`` the driver (on the head node) serves the env API
(``reward_envs/api``: bearer token, build + canary admission) for the run's whole life.
An env registered with a ``mixture`` (dataset + weight) joins the prompt mixture at the
next step once the API has admitted it (status ``ready``): its pools start in the trainer
nodes' pool hosts and its dataset is drawn from with its weight. Deleting it drains it: no
new prompt of it is drawn, the prompts already drawn are generated, scored and trained
on as usual, and then its pools stop. No restart either way.

Venv-isolated envs are built on the head node into the run's env store, offline from its
wheelhouse when it has one (``live_builds``): the head node has no internet. One that cannot
be built so ends ``failed``, with the reason in its API record, the run's log and the
``live_envs_failed`` metric.

``sync`` runs at the one point of a step where no rollout is in flight (the step's
rollout is scored, the next one not yet drawn), so a leaving env has nothing left to
score when its pools stop. The joined envs are part of the driver's checkpoint; a
resumed run re-joins them before the sampler's state is restored.

The same app, under the same token, serves ``/v1/engines``: the run's inference engines,
which join or leave at the next step (``orchestrator.elastic``).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from orchestrator.config import DatasetSpec, RunConfig
from orchestrator.protocol import LiveEnv
from reward_envs.builder import default_store
from reward_envs.config import EnvSpec, VenvIsolation
from reward_envs.manifest import load_manifest


def live_builds(cfg: RunConfig) -> VenvIsolation:
    """How the run builds venv-isolated envs that register: ``env_api.store``,
    ``wheelhouse`` and ``offline`` where set, else those of the run's own venv envs. The store
    is resolved here, on the head node, so every part of the run uses the same one."""
    api = cfg.env_api
    own = [i for i in (e.resolved_isolation() for e in cfg.envs) if isinstance(i, VenvIsolation)]
    wheelhouse = api.wheelhouse or next((v.wheelhouse for v in own if v.wheelhouse), None)
    return VenvIsolation(
        store=api.store or next((v.store for v in own if v.store), None) or default_store(),
        wheelhouse=wheelhouse,
        offline=api.offline or wheelhouse is not None or any(v.offline for v in own),
    )


class LiveEnvs:
    """The env API server of a run, and the envs it added to the run's mixture."""

    def __init__(self, cfg: RunConfig, scorer: Any, sampler: Any, log: Any = print) -> None:
        import uvicorn

        from orchestrator.elastic import EngineRequests
        from orchestrator.elastic import router as engine_routes
        from reward_envs.api.main import create_app
        from reward_envs.api.settings import ApiSettings

        api = cfg.env_api
        self.cfg, self.scorer, self.sampler, self.log = cfg, scorer, sampler, log
        self.state_dir = api.state_dir or Path(cfg.output_dir) / "env-api"
        self.venv = live_builds(cfg)
        app = create_app(
            ApiSettings(
                state_dir=self.state_dir,
                store=self.venv.store,
                offline=self.venv.offline,
                wheelhouse=self.venv.wheelhouse,
            )
        )
        self.registry = app.state.registry
        self.engine_requests = app.state.engine_requests = EngineRequests()
        """Engine count and drains asked through ``/v1/engines`` (``orchestrator.elastic``),
        applied by ``Parts.scale`` at the next step."""
        app.include_router(engine_routes)
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=api.host, port=api.port, log_level="warning")
        )
        self._thread = threading.Thread(target=self.server.run, name="env-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the env API did not start on {api.host}:{api.port} (port in use? set "
                    "env_api.port); see the log above"
                )
            time.sleep(0.05)
        self.joined: dict[str, LiveEnv] = {}
        """Env name -> what joined: registration id, env dir, isolation, dataset, weight."""
        self.refused: dict[str, str] = {}
        """Env name -> registration id that could not join (not retried until replaced)."""
        self.not_admitted: dict[str, str] = {}
        """Env name -> registration id whose failed build or canary was reported."""
        how = "offline" if self.venv.offline else "with network"
        if self.venv.wheelhouse:
            how = f"from the wheelhouse {self.venv.wheelhouse}, no index"
        log(
            f"env API on http://{api.host}:{api.port} (bearer token in "
            f"{self.state_dir / 'api-token'}): envs registered with a mixture join this run "
            f"(venvs built into {self.venv.store}, {how}); /v1/engines lists, adds and drains "
            "its engines"
        )

    def sync(self, step: int) -> dict[str, float]:
        """Apply registrations and deletions made since the last step; returns metrics."""
        records = {r.name: r for r in self.registry.records()}
        fixed = {e.name for e in self.cfg.envs}
        left = joined = failed = 0
        for name, j in list(self.joined.items()):
            rec = records.get(name)
            if rec is None or rec.registration != j.registration:
                self._leave(name)
                left += 1
                self.log(f"step {step}: env {name!r} left the mixture (drained)")
        for name, rec in records.items():
            if rec.status in ("failed", "rejected") and self.not_admitted.get(name) != (
                rec.registration
            ):
                self.not_admitted[name] = rec.registration
                failed += 1
                self.log(f"step {step}: env {name!r} was not admitted ({rec.status}): {rec.error}")
                continue
            if (
                rec.status != "ready"
                or rec.mixture is None
                or name in self.joined
                or self.refused.get(name) == rec.registration
            ):
                continue
            if name in fixed:
                self.refused[name] = rec.registration
                self.log(f"env {name!r} is one of the run's configured envs; not joined twice")
                continue
            entry = LiveEnv(
                registration=rec.registration,
                path=rec.path,
                isolation=rec.isolation,
                dataset=rec.mixture.dataset,
                weight=rec.mixture.weight,
            )
            try:
                self._join(name, entry)
            except Exception as e:  # a dataset that does not parse, a pool that does not start
                self.refused[name] = rec.registration
                self.log(f"step {step}: env {name!r} could not join: {e}")
                continue
            joined += 1
            self.log(
                f"step {step}: env {name!r} joined the mixture with weight {rec.mixture.weight}"
            )
        return {
            "live_envs": float(len(self.joined)),
            "live_envs_joined": float(joined),
            "live_envs_left": float(left),
            "live_envs_failed": float(failed),
        }

    def _join(self, name: str, entry: LiveEnv) -> None:
        api = self.cfg.env_api
        isolation = self.venv if entry.isolation == "venv" else {"type": entry.isolation}
        spec = EnvSpec.model_validate(
            {
                "name": name,
                "path": entry.path,
                "isolation": isolation,
                "workers": api.workers,
                "replicas": api.replicas,
            }
        )
        dataset = DatasetSpec(path=entry.dataset, env=name, weight=entry.weight)
        self.scorer.add(spec)
        try:
            self.sampler.add(dataset, load_manifest(spec.path).required_fields)
        except BaseException:
            self.scorer.remove(name)
            raise
        self.joined[name] = entry

    def _leave(self, name: str) -> None:
        self.sampler.remove(name)
        self.scorer.remove(name)
        del self.joined[name]

    def state(self) -> dict[str, LiveEnv]:
        """The joined envs, for the driver's checkpoint."""
        return dict(self.joined)

    def restore(self, joined: dict[str, LiveEnv]) -> None:
        """Re-join the envs a checkpoint had (before the sampler's state is restored)."""
        for name, entry in joined.items():
            self._join(name, entry)

    def close(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
