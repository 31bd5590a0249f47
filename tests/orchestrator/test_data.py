"""Prompt sources: JSONL/JSON/Parquet reading, pre-tokenized ids (``caravela data prepare``),
the prefetcher's stream and live mixture changes, each through a state()/restore() round
trip (a resume must continue the exact same prompt stream)."""

from __future__ import annotations

import json
import random
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common import paths
from orchestrator.config import ConfigError, DatasetSpec, load_config
from orchestrator.data import read_jsonl, read_prompts
from orchestrator.prepare import PreparedStore, prepare, prepared_ids
from orchestrator.sampler import Prefetcher, PromptSampler


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def arith_rows(n: int, tag: str = "a") -> list[dict]:
    return [
        {"id": f"{tag}{i}", "prompt": f"Q: {i}+{i % 7} A: ", "answer": str(i + i % 7)}
        for i in range(n)
    ]


@pytest.fixture
def two_sets(tmp_path) -> tuple[DatasetSpec, DatasetSpec]:
    a = write_jsonl(tmp_path / "a.jsonl", arith_rows(7, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", arith_rows(5, "b"))
    return DatasetSpec(path=a, env="arith", weight=2.0), DatasetSpec(path=b, env="math")


def ids(batches: list[list]) -> list[list[str]]:
    return [[p.id for p in b] for b in batches]


def roundtrip(state: dict) -> dict:
    return json.loads(json.dumps(state))


# -- reading -------------------------------------------------------------------------------


def test_parquet_json_and_jsonl_read_the_same_rows(tmp_path):
    rows = [json.loads(x) for x in paths.TINY_TRAIN.read_text().splitlines()[:300]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    (tmp_path / "t.json").write_text(json.dumps(rows))
    jsonl = read_prompts(paths.TINY_TRAIN, "arith")[:300]
    assert read_prompts(tmp_path / "t.parquet", "arith") == jsonl
    assert read_prompts(tmp_path / "t.json", "arith") == jsonl
    assert jsonl[0].fields == {"answer": rows[0]["answer"]} and jsonl[0].env == "arith"
    assert read_jsonl(paths.TINY_HELDOUT)[0].env == "arith"  # the row's own env column


def test_other_column_names_and_row_number_ids(tmp_path):
    rows = [{"question": "Q: 1+1 A: ", "answer": "2"}, {"question": "Q: 2+2 A: ", "answer": "4"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gsm.parquet")
    spec = DatasetSpec(path=tmp_path / "gsm.parquet", env="math", prompt_field="question")
    with pytest.raises(ValueError, match=r"no column 'id' .*id_field = \"\""):
        read_prompts(spec.path, spec.env, spec.prompt_field, spec.id_field)
    got = read_prompts(spec.path, "math", prompt_field="question", id_field="")
    assert [(p.id, p.text, p.fields) for p in got] == [
        ("gsm-0", "Q: 1+1 A: ", {"answer": "2"}),
        ("gsm-1", "Q: 2+2 A: ", {"answer": "4"}),
    ]


@pytest.mark.parametrize(
    "content, error",
    [
        ('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": \n', r"bad\.jsonl:2: not a JSON"),
        ('{"id": "a", "question": "x"}\n', r"bad\.jsonl:1: 'prompt' .*missing.*prompt_field"),
        ('{"id": "a", "prompt": 3}\n', r"bad\.jsonl:1: 'prompt' must be the prompt text \(got 3"),
        (
            '{"prompt": "x"}\n',
            r"bad\.jsonl:1: 'id' must be the row's id.*\(missing; fields: prompt",
        ),
        ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', r":2: id 'a' repeats .*:1"),
        ("[1, 2]\n", r"bad\.jsonl:1: each row must be an object, got \[1, 2\]"),
        ("\n\n", r"bad\.jsonl holds no prompts"),
    ],
)
def test_bad_rows_are_errors_naming_file_row_and_column(tmp_path, content, error):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ValueError, match=error):
        read_prompts(tmp_path / "bad.jsonl")


def test_bad_files_are_clear_errors(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"t\.parquet: no column 'prompt' \(columns: id, text\)"):
        read_prompts(tmp_path / "t.parquet")
    pq.write_table(pa.table({"id": [1, 2], "prompt": ["x", None]}), tmp_path / "n.parquet")
    with pytest.raises(ValueError, match=r"n\.parquet: row 2: 'prompt' must be .* \(got None;"):
        read_prompts(tmp_path / "n.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="junk.parquet is not a readable parquet file"):
        read_prompts(tmp_path / "junk.parquet")
    with pytest.raises(FileNotFoundError, match="nope.jsonl not found"):
        read_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match=r"datasets\.0\.path: unsupported dataset format '\.csv'"):
        load_config(overrides=["datasets=[{path='x.csv', env='arith'}]"])


# -- sampling ------------------------------------------------------------------------------


def test_one_dataset_draws_exactly_as_before(tmp_path):
    """The pre-mixture sampler's stream (the resume tests compare prompt ids across runs)."""
    rows = arith_rows(11)
    spec = DatasetSpec(path=write_jsonl(tmp_path / "a.jsonl", rows), env="arith")
    rng, order, expected = random.Random(3), [], []
    for _ in range(30):
        picks = rng.choices(range(1), weights=[1.0], k=4)
        batch: list[int] = []
        for _ in picks:
            if not order:  # a new epoch: this batch's rows are drawn last
                order = list(range(len(rows)))
                rng.shuffle(order)
                order = [r for r in order if r in batch] + [r for r in order if r not in batch]
            batch.append(order.pop())
        expected += [rows[r]["id"] for r in batch]
    sampler = PromptSampler([spec], seed=3)
    assert [p.id for _ in range(30) for p in sampler.sample(4)] == expected


def test_a_batch_across_an_epoch_boundary_repeats_no_prompt(tmp_path):
    """5 rows, batches of 4: most batches cross an epoch boundary, none repeats a prompt
    (a step would train two groups of one prompt); every epoch still draws every row once."""
    spec = DatasetSpec(path=write_jsonl(tmp_path / "a.jsonl", arith_rows(5)), env="arith")
    sampler = PromptSampler([spec], seed=0)
    drawn = [[p.id for p in sampler.sample(4)] for _ in range(25)]
    assert all(len(set(b)) == 4 for b in drawn)
    flat = [i for b in drawn for i in b]
    assert all(sorted(flat[e : e + 5]) == [f"a{i}" for i in range(5)] for e in range(0, 100, 5))


def test_state_from_before_mixtures_restores(two_sets):
    a, _ = two_sets
    ref = PromptSampler([a], seed=1)
    ref.sample(5)
    old = {k: v for k, v in ref.state().items() if k != "datasets"}  # an older checkpoint
    resumed = PromptSampler([a], seed=99)
    resumed.restore(roundtrip(old), inflight=["a3"])
    assert ids([resumed.sample(4)]) == [["a3", *ids([ref.sample(3)])[0]]]


def test_ids_must_be_unique_across_datasets(tmp_path, two_sets):
    a, _ = two_sets
    other = DatasetSpec(path=write_jsonl(tmp_path / "c.jsonl", arith_rows(3, "a")), env="x")
    with pytest.raises(ValueError, match=r"'a0' is in both .*a\.jsonl and .*c\.jsonl"):
        PromptSampler([a, other])


def test_add_and_remove_survive_a_state_round_trip(two_sets):
    a, b = two_sets
    ref = PromptSampler([a], seed=5)
    ref.sample(6)
    ref.add(b)
    mixed = ref.sample(40)
    assert {p.env for p in mixed} == {"arith", "math"}
    with pytest.raises(ValueError, match="already sampled"):
        ref.add(b)
    saved = roundtrip(ref.state())
    ref.remove("arith")
    with pytest.raises(ValueError, match=r"no dataset tagged 'arith' is sampled .*\['math'\]"):
        ref.remove("arith")
    only_b = ref.sample(12)
    assert {p.env for p in only_b} == {"math"}
    after_remove = roundtrip(ref.state())
    ref.add(a.model_copy(update={"weight": 0.5}))  # back where its epoch stopped, new weight
    back = ref.sample(30)

    resumed = PromptSampler([a], seed=0)  # the run's config: only the first dataset
    resumed.restore(saved)
    assert {p.env for p in resumed.sample(12)} == {"arith", "math"}  # before the remove
    resumed.restore(after_remove)
    assert {p.env for p in resumed.sample(30)} == {"math"}  # arith out until added back
    resumed.restore(after_remove)
    resumed.add(a.model_copy(update={"weight": 0.5}))
    assert ids([resumed.sample(30)]) == ids([back])
    resumed.restore(saved)
    resumed.remove("arith")
    assert ids([resumed.sample(12)]) == ids([only_b])


def test_removing_every_dataset_stops_sampling_until_one_is_added(two_sets):
    a, b = two_sets
    sampler = PromptSampler([a, b], seed=0)
    sampler.remove("arith")
    sampler.remove("math")
    with pytest.raises(ValueError, match="every dataset was removed"):
        sampler.sample(1)
    sampler.add(b)
    assert {p.env for p in sampler.sample(8)} == {"math"}


def test_a_changed_dataset_is_refused_on_resume(tmp_path, two_sets):
    a, _ = two_sets
    sampler = PromptSampler([a], seed=0)
    sampler.sample(3)
    state = roundtrip(sampler.state())
    write_jsonl(a.path, arith_rows(9, "a"))
    with pytest.raises(ValueError, match=r"a\.jsonl has 9 rows, the checkpoint's had 7"):
        PromptSampler([a], seed=0).restore(state)


# -- prefetching ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(paths.TINY_MODEL)


def test_prefetcher_gives_the_same_stream_and_resumes_exactly(two_sets, tok):
    from inference_server.tokens import encode_prompts

    a, b = two_sets
    encode = partial(encode_prompts, tok)
    ref = PromptSampler([a, b], seed=7)
    expected = [ref.sample(n) for n in [4] * 6 + [3] + [4] * 6]  # a refill-sized batch too

    pre = Prefetcher(PromptSampler([a, b], seed=7), batch_size=4, depth=3, encode=encode)
    with pre:
        got = [pre.sample(4) for _ in range(6)]
        got += [pre.sample(3), pre.sample(4)]
        state = roundtrip(pre.state())  # the batches drawn ahead are not in it
        got += [pre.sample(4) for _ in range(5)]
    assert ids(got) == ids(expected)
    assert all(p.prompt_ids == tuple(encode([p.text])[0]) for batch in got for p in batch)

    inflight = [p.id for p in got[7]]  # drawn, not trained on when the checkpoint was taken
    with Prefetcher(PromptSampler([a, b], seed=0), batch_size=4, encode=encode) as resumed:
        resumed.sample(4)  # draws ahead before the restore: they must not count
        resumed.restore(state, inflight)
        again = [resumed.sample(4) for _ in range(6)]
    assert ids(again) == ids(got[7:])


def test_prefetcher_mixture_changes_match_the_plain_sampler(two_sets):
    a, b = two_sets

    def script(s):
        out = [s.sample(5) for _ in range(3)]
        s.remove("math")
        out += [s.sample(5) for _ in range(3)]
        s.add(b)
        out += [s.sample(5) for _ in range(3)]
        return ids(out), roundtrip(s.state())

    with Prefetcher(PromptSampler([a, b], seed=2), batch_size=5, depth=2) as pre:
        assert script(pre) == script(PromptSampler([a, b], seed=2))
        pre.remove("math")
        pre.remove("arith")
        with pytest.raises(ValueError, match="every dataset was removed"):
            pre.sample(5)
        pre.add(a)
        assert len(pre.sample(5)) == 5
    assert len(pre.sample(5)) == 5  # closed: draws without the thread


# -- prepared token ids --------------------------------------------------------------------


@pytest.fixture
def small_run(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(paths.TINY_TRAIN.read_text().splitlines(True)[:500]))
    return load_config(
        overrides=[
            f"output_dir='{tmp_path / 'run'}'",
            f"datasets=[{{path='{train}', env='arith'}}]",
        ]
    )


def test_prepare_gives_the_loops_ids_is_reused_and_invalidated(small_run, tok, monkeypatch):
    from orchestrator import prepare as prep
    from orchestrator.rollout import tokenize

    cfg, lines = small_run, []
    files = prepare(cfg, workers=2, log=lines.append)
    assert [f.parent for f in files] == [cfg.output_dir / "prepared"] * 2
    cache: dict[str, list[int]] = {}
    heldout = read_prompts(cfg.eval.heldout)
    train = read_prompts(cfg.datasets[0].path, "arith")
    expected = {p.id: tokenize(tok, p, cache) for p in [*train, *heldout]}
    assert prepared_ids(cfg) == expected

    sampler = PromptSampler(cfg.datasets, seed=0, store=PreparedStore.for_run(cfg, lines.append))
    drawn = sampler.sample(64)
    assert all(list(p.prompt_ids or ()) == expected[p.id] for p in drawn)
    state = roundtrip(sampler.state())
    resumed = PromptSampler(cfg.datasets, seed=1, store=PreparedStore.for_run(cfg))
    resumed.restore(state, [p.id for p in drawn[-3:]])
    assert all(p.prompt_ids is not None for p in resumed.sample(8))

    def no_tokenizing(texts):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(prep, "_encode", no_tokenizing)
    lines.clear()
    assert prepare(cfg, workers=1, log=lines.append) == files
    assert all("up to date" in line for line in lines)

    with open(cfg.datasets[0].path, "a") as f:  # the dataset changes: its ids are stale
        f.write(json.dumps({"id": "new", "prompt": "Q: 1+2 A: ", "answer": "3"}) + "\n")
    lines.clear()
    stale = PromptSampler(cfg.datasets, seed=0, store=PreparedStore.for_run(cfg, lines.append))
    assert all(p.prompt_ids is None for p in stale.sample(8))
    assert [line for line in lines if "tokenizing on the fly" in line] == [
        f"{cfg.datasets[0].path}: no prepared token ids in {cfg.output_dir / 'prepared'} "
        "(`caravela data prepare` makes them); tokenizing on the fly"
    ]
    monkeypatch.undo()
    again = prepare(cfg, workers=1, log=lines.append)
    assert again[0] != files[0] and again[1] == files[1]
    assert prepared_ids(cfg)["new"] == tokenize(tok, stale.sources[0].prompts[-1], {})


def test_caravela_data_prepare_cli(small_run, capsys):
    from orchestrator.cli import main

    out = small_run.output_dir
    args = ["data", "prepare", "--set", f"output_dir='{out}'", "--workers", "1"]
    args += ["--set", f"datasets=[{{path='{small_run.datasets[0].path}', env='arith'}}]"]
    assert main(args) == 0
    assert "2 datasets prepared" in capsys.readouterr().out
    assert len(list((out / "prepared").glob("*.parquet"))) == 2
    bad = ["data", "prepare", "--set", "datasets=[{path='/nope.jsonl', env='arith'}]"]
    assert main(bad) == 1
    assert "nope.jsonl not found" in capsys.readouterr().err


def test_a_prompt_drawn_twice_for_one_step_is_two_groups(tmp_path):
    """A dataset smaller than its share of a step gives a prompt twice: the engines get two
    distinct requests (``<id>`` and ``<id>#2``) and the batch two groups whose samples have
    distinct ids (the run used to fail: request ids must be unique)."""
    from orchestrator.loop import load_policy
    from orchestrator.parts import local_parts
    from orchestrator.rollout import build_batch, rollout, sampling_params

    cfg = load_config(
        overrides=[
            f"output_dir='{tmp_path}'",
            "cluster.mode='local'",
            "inference.backend={type='transformers'}",
            "inference.weight_sync='object_store'",
            "rollout.group_size=4",
            "rollout.max_new_tokens=8",
            "advantage.drop_zero_variance=false",
        ]
    )
    _, tok = load_policy(cfg)
    p, q = PromptSampler(cfg.datasets, cfg.seed).sample(2)
    parts = local_parts(cfg, tok)
    try:
        r = rollout(parts.engines, parts.scorer, sampling_params(cfg), [p, q, p], tok, {})
    finally:
        parts.close()
    assert [res.request_id for res in r.results] == [p.id, q.id, f"{p.id}#2"]
    assert all(len(g) == 4 and all(s.error is None for s in g) for g in r.scores)
    batch, stats = build_batch(0, r, cfg)
    assert stats["items_scored"] == 12
    assert batch is not None
    ids = [s.sample_id for s in batch.samples]
    assert len(ids) == len(set(ids)) == 12
