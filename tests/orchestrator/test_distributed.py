"""The distributed run's parts on a real multi-node Ray cluster (``cluster_utils.Cluster``:
2 inference + 2 trainer raylets on this machine, token auth on): placement by role, two gloo
trainer ranks, two engines, and after every push each engine serves the trainer's weights."""

import pytest

from orchestrator.config import load_config
from orchestrator.loop import load_policy
from orchestrator.rollout import build_batch, rollout, sampling_params
from orchestrator.sampler import PromptSampler

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(ray_token):
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    roles = [{"inference_node": 1}] * 2 + [{"trainer_node": 1}] * 2
    nodes = [c.add_node(num_cpus=4, resources=r) for r in roles]
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="warning")
    yield nodes
    ray.shutdown()
    c.shutdown()


@pytest.mark.parametrize(
    ("weight_sync", "sharding"),
    [
        pytest.param("collective", "replicate", marks=pytest.mark.long),
        ("collective", "fsdp2"),
        ("object_store", "replicate"),
    ],
)
def test_roles_ranks_and_weight_pushes(cluster, tmp_path, weight_sync, sharding):
    """Both weight paths; the collective one also from FSDP2 ranks (each tensor gathered in
    turn while rank 0 broadcasts)."""
    import ray

    from inference_server.weights import served_shapes
    from orchestrator.parts import ray_parts

    cfg = load_config(
        overrides=[
            f"output_dir='{tmp_path}'",
            "rollout.prompts_per_step=8",
            "inference.backend={type='transformers', cpus_per_engine=1}",
            "trainer.cpus_per_rank=1",
            f"trainer.sharding='{sharding}'",
            f"inference.weight_sync='{weight_sync}'",
            "inference.transfer_bucket_mb=1",  # several buckets even for the tiny model
        ]
    )
    model, tok = load_policy(cfg)
    run = ray_parts(cfg, tok)
    try:
        inference = {n.node_id for n in cluster[:2]}
        trainer = {n.node_id for n in cluster[2:]}
        engine_nodes = ray.get(
            [
                h.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
                for h in run.engines.engines.values()
            ]
        )
        assert set(engine_nodes) == inference and len(engine_nodes) == 2
        assert set(run.trainers.nodes()) == trainer and run.trainers.world == 2
        names = sorted(served_shapes(cfg.model))
        sampler = PromptSampler(cfg.datasets, cfg.seed)
        for step in range(3):
            prompts = sampler.sample(cfg.rollout.prompts_per_step)
            r = rollout(run.engines, run.scorer, sampling_params(cfg), prompts, tok, {})
            engine_ids = {c.engine_id for res in r.results for c in res.completions}
            assert engine_ids == set(run.engines.engines)
            batch, _ = build_batch(step, r, cfg)
            assert batch is not None
            run.trainers.train_step(batch)
            metrics = run.push(step + 1)
            assert (run.meta is not None) == (weight_sync == "collective")
            if weight_sync == "collective":
                assert metrics["weight_sync/buckets"] > 1
            assert metrics["weight_sync/probe_mean_diff"] < 1e-4
            assert run.engines.versions() == dict.fromkeys(run.engines.engines, step + 1)
            ranks = run.trainers.checksums()
            engines = ray.get([h.checksum.remote() for h in run.engines.engines.values()])
            trained = ray.get(run.trainers.host_state(names)).tensors()
            assert len(set(ranks)) == 1  # the two ranks stayed identical
            assert len(set(engines)) == 1  # ... and every engine serves the same weights
            import hashlib

            h = hashlib.sha256()
            for n in names:
                h.update(n.encode() + trained[n].contiguous().numpy().tobytes())
            assert engines[0] == h.hexdigest()[:16]  # namely the trainer's
    finally:
        run.close()
