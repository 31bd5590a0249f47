"""``caravela env check``: an env must score its own example items as declared."""

import shutil

from orchestrator.cli import main
from orchestrator.paths import ARITH_ENV


def test_builtin_arith_passes_its_examples(capsys):
    assert main(["env", "check", str(ARITH_ENV)]) == 0
    assert "arith: 3/3 ok" in capsys.readouterr().out


def test_env_scoring_against_its_examples_is_reported(tmp_path, capsys):
    env = tmp_path / "arith"
    shutil.copytree(ARITH_ENV, env)
    manifest = env / "caravela-env.toml"
    manifest.write_text(
        manifest.read_text().replace("expected_score = 0.0", "expected_score = 1.0")
    )
    assert main(["env", "check", str(env)]) == 1
    out = capsys.readouterr().out
    assert "FAIL example 2: expected 1.0, got 0.0" in out


def test_missing_manifest_is_a_clear_error(tmp_path, capsys):
    assert main(["env", "check", str(tmp_path)]) == 2
    assert "no env manifest at" in capsys.readouterr().err


def test_score_one_completion(capsys):
    rc = main(
        [
            "env",
            "score",
            str(ARITH_ENV),
            "--prompt",
            "Q: 1+1+1 A: ",
            "--completion",
            "1+1=2, 2+1=3. The answer is 3.",
            "--answer",
            "3",
        ]
    )
    assert rc == 0 and capsys.readouterr().out.strip() == "1.0"
