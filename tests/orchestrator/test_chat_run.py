"""Chat-format prompts in training: the pre-tokenized store keys its files by prompt format,
the loop's prompts reach the engines as chat-template ids, a chat format on a tokenizer
without a template stops the run at start-up, and ``truncated`` counts cut completions.

The chat model is a copy of the shipped tiny model whose tokenizer carries a chat template
(``tests/inference_server/test_chat_format.py``); runs are single-process
(``cluster.mode = "local"``, transformers engine), no Ray.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from common import paths
from inference_server.protocol import Completion, GenerateRequest, GenerateResult
from inference_server.tokens import encode_prompts
from orchestrator.config import load_config
from orchestrator.data import Prompt, read_jsonl
from orchestrator.prepare import PreparedStore, prepare, prepared_ids
from orchestrator.rollout import Rollout, build_batch
from reward_envs.protocol import RewardResult
from tests.inference_server.test_chat_format import chat_model

SYSTEM = "1+1"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return chat_model(tmp_path_factory.mktemp("model") / "chat")


@pytest.fixture
def train(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(paths.TINY_TRAIN.read_text().splitlines(True)[:200]))
    return path


def config(tmp_path, model, train, *extra: str):
    return load_config(
        overrides=[
            f"model='{model}'",
            f"output_dir='{tmp_path / 'run'}'",
            f"datasets=[{{path='{train}', env='arith'}}]",
            *extra,
        ]
    )


def test_prepared_ids_are_keyed_by_format_and_system(tmp_path, model, train):
    """Plain, chat, and chat with a system prompt get three files; each holds its own
    format's ids, so changing the format re-tokenizes instead of reading plain ids."""
    tok = AutoTokenizer.from_pretrained(model)
    prompts = read_jsonl(train)
    texts = [p.text for p in prompts]
    plain = config(tmp_path, model, train)
    chat = config(tmp_path, model, train, "prompt.format='chat'")
    system = config(tmp_path, model, train, "prompt.format='chat'", f"prompt.system='{SYSTEM}'")
    files = [prepare(c, workers=2, log=lambda *_: None)[0] for c in (plain, chat, system)]
    assert len(set(files)) == 3 and all(f.exists() for f in files)
    for cfg, fmt, sys_ in ((plain, "plain", None), (chat, "chat", None), (system, "chat", SYSTEM)):
        expected = encode_prompts(tok, texts, fmt, sys_)
        got = prepared_ids(cfg)
        assert [got[p.id] for p in prompts] == expected
    assert prepared_ids(plain)[prompts[0].id] != prepared_ids(chat)[prompts[0].id]


@pytest.mark.slow
def test_chat_run_trains_on_chat_template_ids(tmp_path, model, train):
    """Two steps of a local run in chat format with a system prompt and a stop string: the
    prompts come from the chat-keyed prepared file (whose ids are the chat template's), the
    on-the-fly path (the prefetcher) encodes the same way, and the metrics count truncated
    completions."""
    from orchestrator.loop import prompt_stream, run

    cfg = config(
        tmp_path,
        model,
        train,
        "prompt.format='chat'",
        f"prompt.system='{SYSTEM}'",
        "rollout.stop=['. The answer']",
        "steps=2",
        "cluster.mode='local'",
        "inference.backend={type='transformers'}",
        "inference.weight_sync='object_store'",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
        "rollout.max_new_tokens=18",  # some completions run longer
        "eval.num_prompts=4",
        "eval.k=2",
        "checkpoint.every_steps=0",
    )
    tok = AutoTokenizer.from_pretrained(model)
    lines: list[str] = []
    prepare(cfg, workers=1, log=lines.append)
    chat_file = PreparedStore.for_run(cfg).path(cfg.datasets[0])
    plain_file = PreparedStore(cfg.output_dir / "prepared", model).path(cfg.datasets[0])
    assert chat_file != plain_file and not plain_file.exists()

    # the on-the-fly path: the prefetcher's own tokenizer, in the run's format
    no_store = cfg.model_copy(update={"prepared_dir": tmp_path / "empty"})
    with prompt_stream(no_store, lines.append) as stream:
        drawn = stream.sample(4)
    assert [list(p.prompt_ids or ()) for p in drawn] == encode_prompts(
        tok, [p.text for p in drawn], "chat", SYSTEM
    )

    lines.clear()
    summary = run(cfg, log=lines.append)
    assert f"{train}: prepared token ids from {chat_file}" in lines
    assert len(summary.history) == 2
    for m in summary.history:
        completions = 4 * 4  # prompts_per_step x group_size (no refill)
        assert m["truncated"] == pytest.approx(m["truncation_rate"] * completions)
    samples = [json.loads(x) for x in (cfg.output_dir / "samples" / "samples.jsonl").open()]
    assert sum(m["truncated"] for m in summary.history) == sum(
        s["finish"] == "length" for s in samples
    )
    # the tiny model ends nearly every answer with ". The answer is N.": the stop string cuts
    # the texts before it (finish "stop"); completions longer than 18 tokens are truncated
    assert {s["finish"] for s in samples} == {"stop", "length"}
    assert not any(". The answer" in s["text"] for s in samples)


def test_chat_format_without_a_template_stops_the_run_at_start(tmp_path, train, capsys):
    from orchestrator.cli import main

    out = tmp_path / "run"
    args = ["run", "--set", f"output_dir='{out}'", "--set", "prompt.format='chat'"]
    args += ["--set", "cluster.mode='local'", "--set", "inference.backend={type='transformers'}"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"the tokenizer of {paths.TINY_MODEL} has none" in err
    assert "set prompt.format = 'plain'" in err and "chat_template" in err
    assert not (out / "metrics.jsonl").exists()  # no step ran, no engine was started


def test_truncated_counts_completions_cut_by_max_new_tokens():
    cfg = load_config(overrides=["rollout.group_size=4"])

    def completion(reason: str, n: int) -> Completion:
        return Completion(
            token_ids=[5] * n,
            text="5" * n,
            logprobs=[-1.0] * n,
            finish_reason=reason,
            policy_version=0,
            engine_id="t",
        )

    reasons = [["length", "stop", "length", "stop"], ["stop", "stop", "stop", "length"]]
    prompts = [Prompt(id=f"p{i}", text="Q: 1+1 A: ", env="arith") for i in range(2)]
    r = Rollout(
        prompts=prompts,
        requests=[GenerateRequest(request_id=p.id, prompt_ids=[1, 21]) for p in prompts],
        results=[
            GenerateResult(request_id=p.id, completions=[completion(x, 3) for x in g])
            for p, g in zip(prompts, reasons, strict=True)
        ],
        scores=[
            [RewardResult(float(i % 2), None, None, {}, "arith", "h", "0:1") for i in range(4)]
            for _ in prompts
        ],
    )
    _, stats = build_batch(0, r, cfg)
    assert stats["truncated"] == 3.0
    assert stats["truncation_rate"] == 3 / 8


def test_gsm8k_cot_example_fits_the_tiny_model_and_its_sample_is_the_scripts_output(tmp_path):
    """The shipped chain-of-thought config: its sample is what the documented
    ``prep_gsm8k.py`` command writes, every prompt (few-shot system text included) leaves
    room for ``max_new_tokens`` in the tiny model's context, and the gsm8k env scores a
    completion in the format, cut by the stop string, by its "The answer is"."""
    import subprocess
    import sys

    from orchestrator.data import context_limit, read_dataset
    from reward_envs.builtin.gsm8k.env import score

    repo = paths.REPO_ROOT
    cfg = load_config(repo / "examples" / "configs" / "gsm8k_cot.toml")
    samples = repo / "examples" / "data_prep" / "samples"
    out = tmp_path / "cot.jsonl"
    args = [samples / "gsm8k_short.jsonl", out, "--env", "gsm8k", "--id-prefix", "gsm8k-cot"]
    script = repo / "examples" / "data_prep" / "prep_gsm8k.py"
    done = subprocess.run(
        [sys.executable, str(script), *map(str, args), "--template", "Q: {prompt}\nA:"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_text() == cfg.datasets[0].path.read_text()

    prompts = read_dataset(cfg.datasets[0], ("answer",))
    assert all(p.text.startswith("Q: ") and p.text.endswith("\nA:") for p in prompts)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    ids = encode_prompts(tok, [p.text for p in prompts], cfg.prompt.format, cfg.prompt.system)
    room = context_limit(cfg.model) - cfg.rollout.max_new_tokens
    assert max(map(len, ids)) <= room, (max(map(len, ids)), room)
    assert cfg.rollout.stop == ["\nQ:"] and "The answer is" in (cfg.prompt.system or "")

    from inference_server.transformers_backend import cut_at_stop

    raw = " 5 + 7 = 12. The answer is 12.\nQ: Ann has 2 cats. How many?\nA: The answer is 2."
    text = cut_at_stop(raw, cfg.rollout.stop)
    assert text == " 5 + 7 = 12. The answer is 12."
    assert score(prompts[0].text, text, prompts[0].fields["answer"]) == 1.0
    assert score(prompts[0].text, raw, prompts[0].fields["answer"]) == 0.0  # uncut: reads 2


def test_prompt_and_stop_settings_are_validated_with_the_key_in_the_message():
    from orchestrator.config import ConfigError

    for override, key in (
        ("prompt.format='xml'", "prompt.format"),
        ("prompt.system=''", "prompt.system"),
        ('rollout.stop=["\\nQ:", ""]', "rollout.stop.1"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(overrides=[override])
    cfg = load_config(overrides=["prompt.format='chat'", 'rollout.stop=["\\nQ:"]'])
    assert cfg.prompt.format == "chat" and cfg.rollout.stop == ["\nQ:"]
