"""Envs that join or leave a run while it trains, through the env registration API.

With ``env_api.enabled`` the driver (on the head node) serves the env API
(``reward_envs/api``: bearer token, build + canary admission) for the run's whole life.
An env registered with a ``mixture`` (dataset + weight) joins the prompt mixture at the
next step once the API has admitted it (status ``ready``): its pool actors start on the
trainer nodes and its dataset is drawn from with its weight. Deleting it drains it: no
new prompt of it is drawn, the prompts already drawn are generated, scored and trained
on as usual, and then its pool actors stop. No restart either way.

``sync`` runs at the one point of a step where no rollout is in flight (the step's
rollout is scored, the next one not yet drawn), so a leaving env has nothing left to
score when its pools stop. The joined envs are part of the driver's checkpoint; a
resumed run re-joins them before the sampler's state is restored.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from orchestrator.config import DatasetSpec, RunConfig
from orchestrator.protocol import LiveEnv
from reward_envs.config import EnvSpec
from reward_envs.manifest import load_manifest


class LiveEnvs:
    """The env API server of a run, and the envs it added to the run's mixture."""

    def __init__(self, cfg: RunConfig, scorer: Any, sampler: Any, log: Any = print) -> None:
        import uvicorn

        from reward_envs.api.main import create_app
        from reward_envs.api.settings import ApiSettings

        api = cfg.env_api
        self.cfg, self.scorer, self.sampler, self.log = cfg, scorer, sampler, log
        self.state_dir = api.state_dir or Path(cfg.output_dir) / "env-api"
        app = create_app(ApiSettings(state_dir=self.state_dir))
        self.registry = app.state.registry
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
        log(
            f"env API on http://{api.host}:{api.port} (bearer token in "
            f"{self.state_dir / 'api-token'}): envs registered with a mixture join this run"
        )

    def sync(self, step: int) -> dict[str, float]:
        """Apply registrations and deletions made since the last step; returns metrics."""
        records = {r.name: r for r in self.registry.records()}
        fixed = {e.name for e in self.cfg.envs}
        left = joined = 0
        for name, j in list(self.joined.items()):
            rec = records.get(name)
            if rec is None or rec.registration != j.registration:
                self._leave(name)
                left += 1
                self.log(f"step {step}: env {name!r} left the mixture (drained)")
        for name, rec in records.items():
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
        }

    def _join(self, name: str, entry: LiveEnv) -> None:
        api = self.cfg.env_api
        spec = EnvSpec.model_validate(
            {
                "name": name,
                "path": entry.path,
                "isolation": {"type": entry.isolation},
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
