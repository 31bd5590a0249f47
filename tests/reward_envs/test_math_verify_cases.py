"""The built-in ``math`` env against Math-Verify's own test suite, on bare answers.

Source of the table: huggingface/Math-Verify, ``tests/test_all.py`` at commit
5d148cfaaf99214c2e4ffb4bc497ab042c592a7a (repository licence Apache-2.0, file ``LICENCE``; the
file's own header carries an MIT notice). Rows: all 44 rows, in order and with the suite's
duplicates, of the parameter tables of ``test_number_extraction``,
``test_simple_fraction_notation`` and ``test_latex_notation``: bare answers (no "answer is"),
all but one without a box. Golds, predictions and expected verdicts are transcribed as data,
with the extraction each table asks for (``match_types``); no code of that file is used.

Math-Verify's own verdicts are computed here, in the env's venv (math-verify 0.9.0), two ways:
as the suite calls it (each table's ``match_types``) and as the env calls it
(``LatexExtractionConfig()`` + ``ExprExtractionConfig()``). The env reads both kinds of answer
at once, so it is held to the second: it must agree with the suite's expected verdicts at least
as often, and miss no row that Math-Verify called that way gets right.
"""

import json
import subprocess

from reward_envs.builder import prepare
from reward_envs.main import builtin_envs
from reward_envs.manifest import load_manifest
from reward_envs.pool import EnvPool
from reward_envs.protocol import Item

EXPR = ("expr",)
LATEX = ("latex",)
BOTH = ("latex", "expr")

# (table, match_types, gold, prediction, expected verdict)
CASES = [
    ("number_extraction", EXPR, "-5", "-5", 1),
    ("number_extraction", EXPR, "7425000", "7,425,000", 1),
    ("number_extraction", EXPR, "1000", "1 000", 1),
    ("number_extraction", EXPR, "1000", "1000.0", 1),
    ("number_extraction", EXPR, "1000.0", "1,000.0", 1),
    ("number_extraction", EXPR, "1000.99", "1000,99", 1),
    ("number_extraction", EXPR, "1,22", "1.22", 1),
    ("number_extraction", EXPR, "2.74", "Soucis : 2,74 $ a..", 1),
    ("number_extraction", EXPR, "0.4", ".4", 1),
    ("number_extraction", EXPR, "1000.99", "1,000.99", 1),
    ("number_extraction", EXPR, "1000.99", "1,000.99", 1),
    ("number_extraction", EXPR, "1000.99", "$1,000.99", 1),
    ("number_extraction", EXPR, "1000.99", "1,000.99$", 1),
    ("number_extraction", EXPR, "1000.99", "the number is not 10 which is 1,000.99€", 1),
    ("number_extraction", EXPR, "1000.99", "the number is not 10 which is 1,000.99€", 1),
    ("number_extraction", EXPR, "1000.99", "so the number is 10 which is 1,000.99m²", 1),
    ("number_extraction", EXPR, "1000.99", "not it's not 10 it's 1,000.99m²", 1),
    ("number_extraction", EXPR, "0,111", "0.111", 1),
    ("number_extraction", EXPR, "2", "AZYUK2A", 0),
    ("simple_fraction_notation", BOTH, "10/9", "\\frac{10}{9}", 1),
    ("simple_fraction_notation", BOTH, "-10/9", "-\\frac{10}{9}", 1),
    ("latex_notation", LATEX, "$9$", "Answer \\[ 9 \\]", 1),
    ("latex_notation", LATEX, "$9$", "Answer $ 9 $", 1),
    ("latex_notation", LATEX, "$9$", "Answer $$ 9 $$", 1),
    ("latex_notation", LATEX, "$9$", "Answer \\( 9 \\)", 1),
    ("latex_notation", LATEX, "$10$", "Answer \\( (9+1) \\)", 1),
    ("latex_notation", LATEX, "$9$", "Answer $ \n 9 \n $", 0),
    ("latex_notation", LATEX, "$9$", "Answer \\( \n 9 \n \\)", 0),
    ("latex_notation", LATEX, "$9$", "Answer \\[ \n 9 \n \\]", 1),
    ("latex_notation", LATEX, "$9$", "Answer $$ \n 9 \n $$", 1),
    ("latex_notation", LATEX, "$10/9$", "Answer $ \\frac{1}{2} \\$ = \\frac{10}{9} $", 1),
    ("latex_notation", LATEX, "$1/3$", "$\\frac13 $", 1),
    ("latex_notation", LATEX, "$1$", "$\\frac3{3} $", 1),
    ("latex_notation", LATEX, "$\\sqrt{3}$", "$\\sqrt3 $", 1),
    ("latex_notation", LATEX, "$1/3$", "$\\cfrac{1}{3} $", 1),
    ("latex_notation", LATEX, "$1/3$", "$\\dfrac{1}{3} $", 1),
    ("latex_notation", LATEX, "$1/3$", "$\\tfrac{1}{3} $", 1),
    ("latex_notation", LATEX, "$1/3$", "$ 1/3 $", 1),
    ("latex_notation", LATEX, "$1/3$", "$\\left( \\frac{1}{3} \\right)$", 1),
    ("latex_notation", LATEX, "$1/3$", "$\\boxed{\\frac{1}{3}}$", 1),
    ("latex_notation", LATEX, "$1/3$", "$\\frac{1}{3} \\text{meters}$", 1),
    ("latex_notation", LATEX, "$1/3$", "$\\frac{1}{3} \\textbf{meters}$", 1),
    ("latex_notation", LATEX, "$1/3$", "$k = \\frac{1}{3}$", 1),
    ("latex_notation", LATEX, "$1/3$", "$\\frac{1}{3} \\textbf{meters}$", 1),
]

# Runs in the env's venv: Math-Verify's verdict per row, as the suite calls it and as the env
# calls it. Reads [[gold, prediction, match_types], ...] on stdin, prints one JSON line.
MATH_VERIFY_VERDICTS = """
import json, sys
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
def configs(kinds):
    return [LatexExtractionConfig(boxed_match_priority=0) if k == "latex"
            else ExprExtractionConfig() for k in kinds]
as_env = [LatexExtractionConfig(), ExprExtractionConfig()]
rows = []
for gold, pred, kinds in json.load(sys.stdin):
    suite = configs(kinds)
    rows.append([int(verify(parse(gold, suite), parse(pred, suite))),
                 int(verify(parse(gold, as_env), parse(pred, as_env)))])
print("VERDICTS " + json.dumps(rows))
"""


def test_math_env_agrees_with_math_verify_suite_on_bare_answers(tmp_path):
    assert len(CASES) == 44
    env = next(d for d in builtin_envs() if d.name == "math")
    manifest = load_manifest(env)
    built = prepare(env, manifest.isolation)

    stdin = json.dumps([[gold, pred, list(kinds)] for _, kinds, gold, pred, _ in CASES])
    proc = subprocess.run(
        [built.python, "-I", "-c", MATH_VERIFY_VERDICTS],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("VERDICTS "))
    verdicts = json.loads(line.removeprefix("VERDICTS "))

    pool = EnvPool(manifest, built, workers=2, log_dir=tmp_path)
    try:
        results = pool.score([Item("", pred, {"answer": gold}) for _, _, gold, pred, _ in CASES])
    finally:
        pool.close()
    assert all(r.error is None for r in results), [r.error for r in results if r.error]

    rows = [
        (table, gold, pred, expected, int(res.score), suite, as_env)
        for (table, _, gold, pred, expected), res, (suite, as_env) in zip(
            CASES, results, verdicts, strict=True
        )
    ]
    env_agree = sum(r[4] == r[3] for r in rows)
    suite_agree = sum(r[5] == r[3] for r in rows)
    as_env_agree = sum(r[6] == r[3] for r in rows)
    env_misses = [r for r in rows if r[4] != r[3]]
    report = (
        f"agreement with the suite's verdicts on {len(rows)} rows: env {env_agree}, "
        f"Math-Verify as the env calls it {as_env_agree}, as its suite calls it {suite_agree}; "
        "env disagreements (table, gold, prediction, expected, env, mv-suite, mv-as-env): "
        f"{env_misses}"
    )
    print(report)
    assert env_agree >= as_env_agree, report
    assert all(r[6] != r[3] for r in env_misses), report
