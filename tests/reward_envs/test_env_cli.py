"""``caravela env``: test an env against its own examples, score JSONL items, build, list."""

import json
import shutil

from common.paths import ARITH_ENV
from orchestrator.cli import main


def test_builtin_arith_passes_its_examples(capsys):
    assert main(["env", "test", "arith", "--isolation", "process"]) == 0
    assert "arith: 3/3 ok" in capsys.readouterr().out


def test_a_wrong_expectation_is_reported(tmp_path, capsys):
    env = tmp_path / "arith"
    shutil.copytree(ARITH_ENV, env)
    manifest = env / "caravela-env.toml"
    manifest.write_text(
        manifest.read_text().replace("expected_score = 0.0", "expected_score = 1.0")
    )
    assert main(["env", "test", str(env), "--isolation", "process"]) == 1
    assert "FAIL example 2: expected 1.0, got 0.0" in capsys.readouterr().out


def test_unknown_env_is_a_clear_error(tmp_path, capsys):
    assert main(["env", "test", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is neither a built-in env (arith" in err


def test_score_prints_one_json_object_per_item(tmp_path, capsys):
    items = tmp_path / "items.jsonl"
    rows = [
        {"id": "a", "prompt": "Q: 1+1+1 A: ", "completion": "The answer is 3.", "answer": "3"},
        {"id": "b", "prompt": "Q: 1+1+1 A: ", "completion": "The answer is 4.", "answer": "3"},
        {"id": "c", "prompt": "Q: 1+1+1 A: ", "completion": "The answer is 3."},
    ]
    items.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rc = main(["env", "score", "arith", "--input", str(items), "--isolation", "process"])
    assert rc == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["id"] for o in out] == ["a", "b", "c"]
    assert [o["score"] for o in out[:2]] == [1.0, 0.0]
    assert out[2]["score"] is None and "answer" in out[2]["error"]  # missing field: an error


def test_build_then_list_shows_the_store_entry(tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["env", "build", "arith", "--store", str(store)]) == 0
    first = capsys.readouterr().out
    assert "arith-" in first and "built in" in first
    assert main(["env", "build", "arith", "--store", str(store)]) == 0
    assert "found" in capsys.readouterr().out  # content-addressed: the same build again
    assert main(["env", "list", "--store", str(store)]) == 0
    assert "1 builds (arith-" in capsys.readouterr().out
