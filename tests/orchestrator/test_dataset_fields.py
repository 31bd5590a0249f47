"""Dataset field mapping (``[[datasets]] fields``) and the fields envs declare they need
(``required_fields`` in ``caravela-env.toml``): GSM8K- and MATH-format files (a few
synthetic rows each, examples/data_prep/samples) load as they are, a dataset lacking a
field its env needs is refused at load time naming the field, the dataset and the env, and
the examples/data_prep scripts turn both formats into Caravela's own columns. The env
scoring test runs the real built-in envs in their venvs (``make envs``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.config import ConfigError, DatasetSpec, load_config
from orchestrator.data import read_dataset, read_jsonl, required_fields
from orchestrator.prepare import prepare
from orchestrator.sampler import PromptSampler
from reward_envs.builder import prepare as build_env
from reward_envs.config import EnvSpec
from reward_envs.manifest import load_manifest
from reward_envs.pool import EnvPool
from reward_envs.protocol import Item

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "examples" / "data_prep" / "samples"
GSM8K, MATH = SAMPLES / "gsm8k_format.jsonl", SAMPLES / "math_format.jsonl"
BUILTIN = REPO / "reward_envs" / "builtin"
ENVS = [EnvSpec(name=n, path=BUILTIN / n) for n in ("arith", "code", "format", "gsm8k", "math")]
NEEDS = required_fields(ENVS)

MATH_SPEC = DatasetSpec(
    path=MATH, env="math", prompt_field="problem", id_field="", fields={"answer": "solution"}
)
GSM8K_SPEC = DatasetSpec(path=GSM8K, env="gsm8k", prompt_field="question", id_field="")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_builtin_envs_declare_the_fields_they_read():
    assert NEEDS == {
        "arith": ["answer"],
        "code": [["tests", "asserts"]],
        "format": [],
        "gsm8k": ["answer"],
        "math": ["answer"],
    }


def test_math_format_loads_as_is_with_the_answer_mapped_from_solution():
    prompts = read_dataset(MATH_SPEC, NEEDS["math"])
    first = json.loads(MATH.read_text().splitlines()[0])
    assert [p.id for p in prompts] == [f"math_format-{i}" for i in range(4)]
    assert prompts[0].text == first["problem"]
    # passed as `answer` and no longer as `solution`; the other columns as they are
    assert prompts[0].fields == {
        "answer": first["solution"],
        "level": first["level"],
        "type": first["type"],
    }


def test_gsm8k_format_needs_only_its_prompt_column_named():
    prompts = read_dataset(GSM8K_SPEC, NEEDS["gsm8k"])
    assert prompts[1].fields["answer"].endswith("#### 12,000")


def test_a_dataset_lacking_a_field_its_env_needs_is_refused_at_load_naming_it():
    unmapped = MATH_SPEC.model_copy(update={"fields": {}})
    message = (
        r"dataset .*math_format\.jsonl: 4 of 4 rows lack the field 'answer', which env 'math' "
        r"needs \(required_fields in its caravela-env.toml\); the first is the row with id "
        r"'math_format-0' \(its other columns: solution, level, type\)\. .*"
        r'fields = \{ answer = "<column>" \}'
    )
    with pytest.raises(ValueError, match=message):
        read_dataset(unmapped, NEEDS["math"])
    with pytest.raises(ValueError, match=message):  # when a run's sampler loads it
        PromptSampler([unmapped], required=NEEDS)
    sampler = PromptSampler([MATH_SPEC], required=NEEDS)
    assert all("answer" in p.fields for p in sampler.sample(6))
    # an env joining mid-run brings its needs along
    with pytest.raises(ValueError, match="lack the field 'answer', which env 'live'"):
        sampler.add(unmapped.model_copy(update={"env": "live"}), ["answer"])


def test_some_rows_lacking_and_alternatives(tmp_path):
    rows = [{"id": "a", "prompt": "x", "answer": "1"}, {"id": "b", "prompt": "y"}]
    spec = DatasetSpec(path=write_jsonl(tmp_path / "half.jsonl", rows), env="gsm8k")
    with pytest.raises(ValueError, match=r"1 of 2 rows lack the field 'answer'.*id 'b'"):
        read_dataset(spec, NEEDS["gsm8k"])
    code = [
        {"id": "t", "prompt": "p", "tests": [{"input": "1", "output": "1"}]},
        {"id": "s", "prompt": "p", "asserts": "assert f(1) == 1"},
        {"id": "n", "prompt": "p", "tests": None},  # null counts as missing
    ]
    spec = DatasetSpec(path=write_jsonl(tmp_path / "code.jsonl", code), env="code")
    with pytest.raises(ValueError, match=r"1 of 3 rows lack one of 'tests', 'asserts'.*id 'n'"):
        read_dataset(spec, NEEDS["code"])
    ok = DatasetSpec(path=write_jsonl(tmp_path / "code2.jsonl", code[:2]), env="code")
    assert len(read_dataset(ok, NEEDS["code"])) == 2


def test_mapped_columns_that_no_row_has_are_errors(tmp_path):
    typo = MATH_SPEC.model_copy(update={"fields": {"answer": "soluton"}})
    with pytest.raises(ValueError, match=r"no row has the column of fields \{ answer = 'soluton'"):
        read_dataset(typo)
    rows = [json.loads(x) for x in MATH.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "math_format.parquet")
    parquet = typo.model_copy(update={"path": tmp_path / "math_format.parquet"})
    with pytest.raises(ValueError, match=r"no column 'soluton' .*fix fields\.answer"):
        read_dataset(parquet)
    right = parquet.model_copy(update={"fields": {"answer": "solution"}})
    assert read_dataset(right, ["answer"]) == read_dataset(MATH_SPEC)  # parquet = jsonl


def test_one_column_under_two_names_and_the_prompt_as_a_field(tmp_path):
    rows = [{"q": "What is 2+2?", "sol": "#### 4"}]
    spec = DatasetSpec(
        path=write_jsonl(tmp_path / "d.jsonl", rows),
        env="gsm8k",
        prompt_field="q",
        id_field="",
        fields={"answer": "sol", "reference": "sol", "question": "q"},
    )
    (p,) = read_dataset(spec, ["answer"])
    assert p.text == "What is 2+2?"
    assert p.fields == {"answer": "#### 4", "reference": "#### 4", "question": "What is 2+2?"}


def test_the_mapping_is_part_of_the_samplers_resumable_state():
    sampler = PromptSampler([MATH_SPEC, GSM8K_SPEC], seed=3, required=NEEDS)
    sampler.sample(3)
    state = json.loads(json.dumps(sampler.state()))
    resumed = PromptSampler([MATH_SPEC, GSM8K_SPEC], seed=0, required=NEEDS)
    resumed.restore(state)
    assert resumed.sample(9) == sampler.sample(9)
    assert state["datasets"][0]["fields"] == {"answer": "solution"}


@pytest.mark.parametrize(
    "fields, expected",
    [
        ('{prompt="question"}', "'prompt' is not a scorer field"),
        ('{completion="x"}', "'completion' is not a scorer field"),
        ('{answer=""}', "empty name"),
        ("{answer=3}", "Input should be a valid string"),
    ],
)
def test_bad_mappings_are_config_errors(fields, expected):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[f'datasets=[{{path="x.jsonl", env="arith", fields={fields}}}]'])
    assert "datasets.0.fields" in str(e.value) and expected in str(e.value)


def test_data_prepare_refuses_the_dataset_before_tokenizing_it(tmp_path):
    cfg = load_config(
        overrides=[
            f'datasets=[{{path="{MATH}", env="math", prompt_field="problem", id_field=""}}]',
            f'envs=[{{name="math", path="{BUILTIN / "math"}"}}]',
            f"prepared_dir='{tmp_path}'",
        ]
    )
    with pytest.raises(ValueError, match="lack the field 'answer', which env 'math' needs"):
        prepare(cfg)
    assert not list(tmp_path.iterdir())


def test_a_manifest_example_must_carry_the_required_fields(tmp_path):
    text = (BUILTIN / "gsm8k" / "caravela-env.toml").read_text()
    (tmp_path / "caravela-env.toml").write_text(text.replace('answer = "3"\n', ""))
    with pytest.raises(ValueError, match=r"examples\[4\] lacks 'answer', which required_fields"):
        load_manifest(tmp_path)


# -- examples/data_prep --------------------------------------------------------------------


def prep(script: str, *args: object) -> subprocess.CompletedProcess[str]:
    path = REPO / "examples" / "data_prep" / script
    return subprocess.run(
        [sys.executable, str(path), *map(str, args)], capture_output=True, text=True, timeout=60
    )


def test_prep_scripts_write_caravelas_columns_with_the_final_answer(tmp_path):
    assert prep("prep_gsm8k.py", GSM8K, tmp_path / "g.jsonl", "--env", "gsm8k").returncode == 0
    template = "{prompt}\nPut the final answer in \\boxed{}."
    done = prep("prep_math.py", MATH, tmp_path / "m.jsonl", "--env", "math", "--template", template)
    assert done.returncode == 0 and "m.jsonl: 4 rows" in done.stdout
    g, m = read_jsonl(tmp_path / "g.jsonl"), read_jsonl(tmp_path / "m.jsonl")
    assert [p.fields["answer"] for p in g] == ["39", "12000", "20", "10.5"]
    assert [p.fields["answer"] for p in m] == ["\\frac{3}{4}", "2, 3", "4", "\\{-3, 3\\}"]
    assert m[0].text.endswith("$.\nPut the final answer in \\boxed{}.") and m[0].env == "math"
    assert [p.id for p in g] == [f"gsm8k_format-{i}" for i in range(4)] and g[0].env == "gsm8k"
    # what eval.heldout reads: default columns; the shipped converted sample is this output
    spec = DatasetSpec(path=tmp_path / "g.jsonl", env="gsm8k")
    assert len(read_dataset(spec, NEEDS["gsm8k"])) == 4
    prep("prep_math.py", MATH, tmp_path / "h.jsonl", "--env", "math", "--id-prefix", "math-heldout")
    assert (tmp_path / "h.jsonl").read_text() == (SAMPLES / "math_heldout.jsonl").read_text()


def test_prep_scripts_stop_at_a_bad_row_naming_it_or_skip_it(tmp_path):
    rows = [json.loads(x) for x in GSM8K.read_text().splitlines()]
    rows[1]["answer"] = "no final line"
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    done = prep("prep_gsm8k.py", bad, tmp_path / "out.jsonl")
    assert done.returncode != 0 and "bad.jsonl:2: the answer has no '#### <number>'" in done.stderr
    skipped = prep("prep_gsm8k.py", bad, tmp_path / "out.jsonl", "--skip-bad", "--limit", "2")
    assert skipped.returncode == 0 and "2 rows (1 skipped)" in skipped.stdout
    maths = [{"problem": "p", "solution": "no box here"}, {"problem": "p"}]
    done = prep("prep_math.py", write_jsonl(tmp_path / "m.jsonl", maths), tmp_path / "o.jsonl")
    assert "m.jsonl:1: the solution has no \\boxed{...} answer" in done.stderr
    done = prep("prep_math.py", write_jsonl(tmp_path / "m.jsonl", maths[1:]), tmp_path / "o.jsonl")
    assert "m.jsonl:1: column 'solution' must be text (missing; columns: problem)" in done.stderr


@pytest.mark.parametrize("env, spec", [("math", MATH_SPEC), ("gsm8k", GSM8K_SPEC)])
def test_the_real_env_scores_the_mapped_rows_as_it_scores_the_converted_ones(env, spec, tmp_path):
    """No conversion needed: the env reads the whole GSM8K/MATH solution as its reference and
    scores a right and a wrong completion as it does against the bare converted answer."""
    as_is = read_dataset(spec, NEEDS[env])
    script = "prep_math.py" if env == "math" else "prep_gsm8k.py"
    assert prep(script, spec.path, tmp_path / "c.jsonl").returncode == 0
    converted = read_jsonl(tmp_path / "c.jsonl")
    right = [f"The answer is {c.fields['answer']}." for c in converted]
    if env == "math":
        right = [f"So it is $\\boxed{{{c.fields['answer']}}}$." for c in converted]
    wrong = "The answer is 987654."
    items = [
        Item(p.text, done, p.fields)
        for rows in (as_is, converted)
        for p, ok in zip(rows, right, strict=True)
        for done in (ok, wrong)
    ]
    manifest = load_manifest(BUILTIN / env)
    pool = EnvPool(manifest, build_env(BUILTIN / env, manifest.isolation), 1, log_dir=tmp_path)
    try:
        results = pool.score(items)
    finally:
        pool.close()
    assert [r.error for r in results] == [None] * len(items)
    assert [r.score for r in results] == [1.0, 0.0] * (2 * len(as_is))
