"""Prompts longer than the context leaves room for (prompt tokens + ``rollout.max_new_tokens``
> the model's ``max_position_embeddings``) are never handed to the loop: skipped where they
are drawn, counted per dataset in ``metrics()``, logged once each; the stream, and a resume
from any ``state()``, stay exact."""

from __future__ import annotations

import json
from collections import Counter
from functools import partial
from pathlib import Path

import pytest

from common import paths
from orchestrator.config import DatasetSpec, load_config
from orchestrator.data import context_limit
from orchestrator.prepare import PreparedStore, prepare
from orchestrator.sampler import Prefetcher, PromptSampler

MAX_NEW_TOKENS = 40
LONG = "Q: " + "1+" * 60 + "1 A: "  # 124 tokens with the tiny tokenizer's BOS


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows(n: int, tag: str, long: tuple[int, ...] = ()) -> list[dict]:
    return [
        {"id": f"{tag}{i}", "prompt": LONG if i in long else f"Q: {i}+{i % 7} A: ", "answer": "0"}
        for i in range(n)
    ]


def roundtrip(state: dict) -> dict:
    return json.loads(json.dumps(state))


@pytest.fixture(scope="module")
def encode():
    from transformers import AutoTokenizer

    from inference_server.tokens import encode_prompts

    return partial(encode_prompts, AutoTokenizer.from_pretrained(paths.TINY_MODEL))


@pytest.fixture(scope="module")
def limit() -> int:
    context = context_limit(paths.TINY_MODEL)
    assert context == 128
    return context - MAX_NEW_TOKENS


def test_context_limit_reads_the_models_config(tmp_path):
    assert context_limit(paths.TINY_MODEL) == 128
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 1024}))
    assert context_limit(tmp_path) == 1024
    (tmp_path / "config.json").write_text(
        json.dumps({"text_config": {"max_position_embeddings": 32768}})
    )
    assert context_limit(tmp_path) == 32768
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    assert context_limit(tmp_path) is None
    assert context_limit(tmp_path / "nowhere") is None


def test_an_over_long_prompt_is_never_drawn_but_counted_and_logged_once(tmp_path, encode, limit):
    spec = DatasetSpec(path=write_jsonl(tmp_path / "a.jsonl", rows(7, "a", long=(4,))), env="x")
    lines: list[str] = []
    sampler = PromptSampler(
        [spec], seed=3, max_prompt_tokens=limit, encode=encode, log=lines.append
    )
    drawn = [p for _ in range(8) for p in sampler.sample(3)]  # 24 = 4 epochs of 6 prompts
    assert "a4" not in {p.id for p in drawn}
    assert Counter(p.id for p in drawn) == {f"a{i}": 4 for i in range(7) if i != 4}
    assert all(p.prompt_ids == tuple(encode([p.text])[0]) for p in drawn)  # tokenized once
    assert sampler.metrics() == {"prompts_too_long/a": 1.0}
    assert lines == [
        f"{spec.path}: prompt 'a4' has 124 tokens, more than max_prompt_tokens = {limit} "
        "(the model's context minus rollout.max_new_tokens); skipped in every epoch, "
        "counted in prompts_too_long/a"
    ]


def test_no_limit_no_metric_and_the_same_stream_as_before(tmp_path):
    spec = DatasetSpec(path=write_jsonl(tmp_path / "a.jsonl", rows(7, "a", long=(4,))), env="x")
    plain, same = PromptSampler([spec], seed=3), PromptSampler([spec], seed=3)
    assert [p.id for p in plain.sample(20)] == [p.id for p in same.sample(20)]
    assert plain.metrics() == {}


def test_resume_continues_the_exact_filtered_stream(tmp_path, encode, limit):
    a = DatasetSpec(path=write_jsonl(tmp_path / "a.jsonl", rows(9, "a", long=(2, 5))), env="x")
    b = DatasetSpec(path=write_jsonl(tmp_path / "b.jsonl", rows(5, "b", long=(0,))), env="y")
    make = partial(PromptSampler, [a, b], max_prompt_tokens=limit, encode=encode)
    ref = make(seed=11, log=lambda _: None)
    stream = [[p.id for p in ref.sample(4)] for _ in range(12)]
    assert not {"a2", "a5", "b0"} & {i for batch in stream for i in batch}
    assert ref.metrics() == {"prompts_too_long/a": 2.0, "prompts_too_long/b": 1.0}

    def logged(lines: list[str]) -> list[str]:
        return [line.split("'")[1] for line in lines]

    for cut in (1, 3, 7):
        before: list[str] = []
        head = make(seed=11, log=before.append)
        for _ in range(cut):
            head.sample(4)
        state = roundtrip(head.state())
        after: list[str] = []
        resumed = make(seed=0, log=after.append)
        resumed.restore(state)
        assert resumed.metrics() == head.metrics()  # run totals survive the resume
        assert [[p.id for p in resumed.sample(4)] for _ in range(12 - cut)] == stream[cut:]
        assert resumed.metrics() == ref.metrics()
        # each over-long prompt logged once per run, the resumed part included
        assert sorted(logged(before) + logged(after)) == ["a2", "a5", "b0"]


def test_the_prefetcher_filters_the_same_stream_and_counts_only_what_it_handed_out(
    tmp_path, encode, limit
):
    a = DatasetSpec(path=write_jsonl(tmp_path / "a.jsonl", rows(9, "a", long=(2, 5))), env="x")
    b = DatasetSpec(path=write_jsonl(tmp_path / "b.jsonl", rows(5, "b", long=(0,))), env="y")
    quiet = {"log": lambda _: None}
    ref = PromptSampler([a, b], seed=5, max_prompt_tokens=limit, encode=encode, **quiet)
    lines: list[str] = []
    pre = Prefetcher(
        PromptSampler([a, b], seed=5, log=lines.append),
        batch_size=4,
        depth=3,
        encode=encode,
        max_prompt_tokens=limit,
    )
    with pre:
        for n in [4] * 5 + [3] + [4] * 5:
            assert [p.id for p in pre.sample(n)] == [p.id for p in ref.sample(n)]
            assert pre.metrics() == ref.metrics()  # batches drawn ahead do not count yet
        state = roundtrip(pre.state())
        expected = [[p.id for p in ref.sample(4)] for _ in range(4)]
    assert sorted(line.split("'")[1] for line in lines) == ["a2", "a5", "b0"]

    with Prefetcher(
        PromptSampler([a, b], seed=0, **quiet), batch_size=4, encode=encode, max_prompt_tokens=limit
    ) as resumed:
        resumed.restore(state)
        assert [[p.id for p in resumed.sample(4)] for _ in range(4)] == expected
        assert resumed.metrics() == ref.metrics()


def test_prepared_ids_are_measured_without_tokenizing(tmp_path, limit):
    train = write_jsonl(tmp_path / "t.jsonl", rows(30, "t", long=(7, 8, 20)))
    cfg = load_config(
        overrides=[
            f"output_dir='{tmp_path / 'run'}'",
            f"datasets=[{{path='{train}', env='arith'}}]",
        ]
    )
    prepare(cfg, workers=1, log=lambda _: None)
    store = PreparedStore.for_run(cfg, log=lambda _: None)
    sampler = PromptSampler(cfg.datasets, seed=0, store=store, max_prompt_tokens=limit)
    drawn = {p.id for _ in range(10) for p in sampler.sample(9)}  # 3 epochs of 27
    assert drawn == {f"t{i}" for i in range(30)} - {"t7", "t8", "t20"}
    assert sampler.metrics() == {"prompts_too_long/t": 3.0}


def test_a_dataset_where_nothing_fits_leaves_the_mixture_and_nothing_at_all_is_an_error(
    tmp_path, encode, limit
):
    a = DatasetSpec(path=write_jsonl(tmp_path / "a.jsonl", rows(4, "a")), env="x")
    huge = DatasetSpec(path=write_jsonl(tmp_path / "h.jsonl", rows(3, "h", (0, 1, 2))), env="y")
    sampler = PromptSampler(
        [a, huge], seed=1, max_prompt_tokens=limit, encode=encode, log=lambda _: None
    )
    assert {p.env for _ in range(5) for p in sampler.sample(4)} == {"x"}
    assert sampler.metrics() == {"prompts_too_long/a": 0.0, "prompts_too_long/h": 3.0}
    sampler.remove("x")
    with pytest.raises(ValueError, match=r"no prompt of the sampled datasets fits .*h\.jsonl"):
        sampler.sample(2)


def test_unmeasurable_prompts_and_a_limit_below_one_are_clear_errors(tmp_path):
    spec = DatasetSpec(path=write_jsonl(tmp_path / "a.jsonl", rows(3, "a")), env="x")
    with pytest.raises(ValueError, match=r"max_prompt_tokens = -12 .*max_new_tokens"):
        PromptSampler([spec], max_prompt_tokens=-12)
    sampler = PromptSampler([spec], max_prompt_tokens=50)
    with pytest.raises(ValueError, match=r"a\.jsonl: .*no prepared token ids.*encode"):
        sampler.sample(1)
