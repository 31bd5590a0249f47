"""Generate the many-envs example: 30 reward envs, each with its own venv and PyPI package.

Each env is a real Caravela env package (``caravela-env.toml`` + ``env.py``) whose verifier
imports and uses one small pure-Python package, pinned in its manifest, that Caravela's own
venv does not have; ``caravela env build`` gives every env its own venv in the env store.
The task is the tiny model's arithmetic (``examples/tiny_arith/task.py``: ``Q: 50+98-54 A:``)
split 30 ways: by operators or operand/answer range (the env's *family*: its prompts) and by
what is checked of the model's answer (equal, parity, sign, mod k, digit sum, within a
tolerance, the whole chain of steps, ...). Each env gets a seeded dataset of 64 train
prompts; ``data/heldout.jsonl`` holds 16 held-out prompts of ``eq-all`` for the run's eval.

Writes, all deterministic (the same bytes on every run)::

    examples/many_envs/envs/<env>/{caravela-env.toml,env.py}
    examples/many_envs/data/<env>.jsonl, data/heldout.jsonl
    examples/configs/many_envs.toml

    python examples/many_envs/make_envs.py           # (re)write them
    python examples/many_envs/make_envs.py --check   # exit 1 if a written file differs

Stdlib only: it runs in Caravela's venv, which has none of the envs' packages.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CONFIG = REPO / "examples" / "configs" / "many_envs.toml"
N_TRAIN = 64
N_HELDOUT = 16
EVAL_ENV = "eq-all"

_spec = importlib.util.spec_from_file_location(
    "tiny_arith_task", REPO / "examples/tiny_arith/task.py"
)
assert _spec is not None and _spec.loader is not None
task = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(task)

Question = tuple[int, str, int, str, int]
FAMILIES: dict[str, tuple[str, Callable[[Question, int], bool]]] = {
    "all": ("any problem", lambda q, r: True),
    "pp": ("both operators +", lambda q, r: q[1] + q[3] == "++"),
    "pm": ("operators + then -", lambda q, r: q[1] + q[3] == "+-"),
    "mp": ("operators - then +", lambda q, r: q[1] + q[3] == "-+"),
    "mm": ("both operators -", lambda q, r: q[1] + q[3] == "--"),
    "pos": ("answers above 0", lambda q, r: r > 0),
    "neg": ("answers below 0", lambda q, r: r < 0),
    "small": ("every operand below 50", lambda q, r: max(q[0], q[2], q[4]) < 50),
    "big": ("first operand 50 or more", lambda q, r: q[0] >= 50),
}
"""Family name -> (description, predicate on the question and its answer)."""


def _suffix(x: int) -> str:
    n = abs(x)
    return "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


def _prime(x: int) -> bool:
    n = abs(x)
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def _edges(x: int) -> int:
    return sum(x > e for e in (-50.5, 0.5, 50.5, 100.5))


@dataclass(frozen=True)
class Env:
    """One env: its name (``<check>-<family>``), package, what it checks and how."""

    check: str
    family: str
    package: str
    """Pinned requirement, e.g. ``parse==1.22.4``."""
    module: str
    """The package's import name (the test checks Caravela's venv lacks it)."""
    doc: str
    """What the verifier checks, one sentence."""
    code: str
    """Imports and ``verify(prompt, completion, answer) -> bool``, using the package."""
    key: Callable[[int], object] | None = None
    """Stdlib statement of the answer property compared (picks the failing example)."""
    wrong: str = "key"
    """How the failing example is made: ``key`` (an answer whose ``key`` differs),
    ``near:T`` (T+1 off), ``chain`` (the first step wrong, carried through)."""
    roman_answer: bool = False
    """The dataset's ``answer`` column holds Roman numerals."""

    @property
    def name(self) -> str:
        return f"{self.check}-{self.family}"


ENVS = [
    Env(
        "eq",
        "all",
        "parse==1.22.4",
        "parse",
        "the answer, read with a `parse` pattern, equals the reference",
        """import parse


def verify(prompt: str, completion: str, answer: str) -> bool:
    found = parse.search("The answer is {:d}.", completion)
    return found is not None and found[0] == int(answer)
""",
        key=lambda x: x,
    ),
    Env(
        "eval",
        "pp",
        "simpleeval==1.0.8",
        "simpleeval",
        "the answer equals the question evaluated by `simpleeval` (the answer column unused)",
        """from simpleeval import simple_eval


def verify(prompt: str, completion: str, answer: str) -> bool:
    got = extract(completion)
    return got is not None and got == simple_eval(question(prompt))
""",
        key=lambda x: x,
    ),
    Env(
        "eval",
        "mm",
        "py-expression-eval==0.3.14",
        "py_expression_eval",
        "the answer equals the question evaluated by `py_expression_eval` (answer unused)",
        """from py_expression_eval import Parser

PARSER = Parser()


def verify(prompt: str, completion: str, answer: str) -> bool:
    got = extract(completion)
    return got is not None and got == int(PARSER.parse(question(prompt)).evaluate({}))
""",
        key=lambda x: x,
    ),
    Env(
        "sign",
        "all",
        "ply==3.11",
        "ply",
        "the sign of the answer, lexed with `ply`, equals the reference's",
        '''import ply.lex


class SignedNumbers:
    """A ply lexer of signed integers; everything else is skipped."""

    tokens = ("NUMBER",)
    t_ignore = " "

    def t_NUMBER(self, t):
        r"-?\\d+"
        t.value = int(t.value)
        return t

    def t_error(self, t):
        t.lexer.skip(1)


LEXER = ply.lex.lex(module=SignedNumbers())


def sign(x: int) -> int:
    return (x > 0) - (x < 0)


def verify(prompt: str, completion: str, answer: str) -> bool:
    idx = completion.rfind(MARKER)
    if idx < 0:
        return False
    lexer = LEXER.clone()
    lexer.input(completion[idx + len(MARKER) :])
    token = lexer.token()
    return token is not None and sign(token.value) == sign(int(answer))
''',
        key=lambda x: (x > 0) - (x < 0),
    ),
    Env(
        "words",
        "all",
        "num2words==0.5.14",
        "num2words",
        "the answer spelled out by `num2words` equals the reference spelled out",
        """from num2words import num2words


def verify(prompt: str, completion: str, answer: str) -> bool:
    got = extract(completion)
    return got is not None and num2words(got) == num2words(int(answer))
""",
        key=lambda x: x,
    ),
    Env(
        "roman",
        "pos",
        "roman==5.2",
        "roman",
        "the answer equals the reference, a Roman numeral read with `roman`",
        """import roman


def verify(prompt: str, completion: str, answer: str) -> bool:
    got = extract(completion)
    return got is not None and got == roman.fromRoman(answer)
""",
        key=lambda x: x,
        roman_answer=True,
    ),
    Env(
        "ordinal",
        "mp",
        "humanize==4.17.0",
        "humanize",
        "the answer's ordinal suffix (st, nd, rd, th) by `humanize` equals the reference's",
        """import humanize


def suffix(x: int) -> str:
    return humanize.ordinal(abs(x))[len(str(abs(x))) :]


def verify(prompt: str, completion: str, answer: str) -> bool:
    got = extract(completion)
    return got is not None and suffix(got) == suffix(int(answer))
""",
        key=_suffix,
    ),
    Env(
        "words",
        "small",
        "inflect==7.6.0",
        "inflect",
        "the answer in words by `inflect` equals the reference in words",
        """import inflect

ENGINE = inflect.engine()


def verify(prompt: str, completion: str, answer: str) -> bool:
    got = extract(completion)
    return got is not None and ENGINE.number_to_words(got) == ENGINE.number_to_words(int(answer))
""",
        key=lambda x: x,
    ),
    Env(
        "last",
        "all",
        "more-itertools==11.2.1",
        "more_itertools",
        "the answer's last digit (`more_itertools.last`) equals the reference's",
        """import more_itertools


def verify(prompt: str, completion: str, answer: str) -> bool:
    got = extract(completion)
    return got is not None and more_itertools.last(str(abs(got))) == more_itertools.last(
        str(abs(int(answer)))
    )
""",
        key=lambda x: abs(x) % 10,
    ),
    Env(
        "digitsum",
        "pm",
        "toolz==1.2.0",
        "toolz",
        "the answer's digit sum (a `toolz` pipeline) equals the reference's",
        """import toolz
import toolz.curried

DIGIT_SUM = toolz.compose(sum, toolz.curried.map(int), str, abs)


def verify(prompt: str, completion: str, answer: str) -> bool:
    got = extract(completion)
    return got is not None and DIGIT_SUM(got) == DIGIT_SUM(int(answer))
""",
        key=lambda x: sum(int(d) for d in str(abs(x))),
    ),
    Env(
        "mod3",
        "all",
        "funcy==2.1",
        "funcy",
        "the answer, found with `funcy.re_find`, is congruent to the reference mod 3",
        """import funcy


def verify(prompt: str, completion: str, answer: str) -> bool:
    found = funcy.re_find(r"The answer is ([+-]?\\d+)\\.?\\s*$", completion)
    return found is not None and int(found) % 3 == int(answer) % 3
""",
        key=lambda x: x % 3,
    ),
    Env(
        "bucket",
        "all",
        "boltons==26.2.0",
        "boltons",
        "the answer falls in the reference's bucket of 25 (`boltons.mathutils.floor`)",
        """from boltons.mathutils import floor

BUCKETS = range(-200, 301, 25)


def verify(prompt: str, completion: str, answer: str) -> bool:
    got = extract(completion)
    if got is None or got < BUCKETS[0]:
        return False
    return floor(got, BUCKETS) == floor(int(answer), BUCKETS)
""",
        key=lambda x: min((x + 200) // 25, 20),
    ),
    Env(
        "near-chain",
        "all",
        "textdistance==4.6.3",
        "textdistance",
        "the completion is within one edit (`textdistance` Levenshtein) of the reference one",
        """import textdistance


def verify(prompt: str, completion: str, answer: str) -> bool:
    return textdistance.levenshtein.distance(completion, reference(prompt)) <= 1
""",
        wrong="chain",
    ),
    Env(
        "mod5",
        "pp",
        "Unidecode==1.4.0",
        "unidecode",
        "the answer of the `unidecode`-normalised completion is congruent mod 5",
        """from unidecode import unidecode


def verify(prompt: str, completion: str, answer: str) -> bool:
    got = extract(unidecode(completion))
    return got is not None and got % 5 == int(answer) % 5
""",
        key=lambda x: x % 5,
    ),
    Env(
        "mod7",
        "mm",
        "ftfy==6.3.1",
        "ftfy",
        "the answer of the `ftfy`-repaired completion is congruent mod 7",
        """import ftfy


def verify(prompt: str, completion: str, answer: str) -> bool:
    got = extract(ftfy.fix_text(completion))
    return got is not None and got % 7 == int(answer) % 7
""",
        key=lambda x: x % 7,
    ),
    Env(
        "lead",
        "all",
        "bidict==0.24.1",
        "bidict",
        "the answer's leading digit, named through a `bidict`, equals the reference's",
        """from bidict import bidict

WORDS = "zero one two three four five six seven eight nine".split()
NAMES = bidict(zip("0123456789", WORDS, strict=True))


def lead(x: int) -> str:
    return NAMES[str(abs(x))[0]]


def verify(prompt: str, completion: str, answer: str) -> bool:
    got = extract(completion)
    return got is not None and NAMES.inverse[lead(got)] == NAMES.inverse[lead(int(answer))]
""",
        key=lambda x: str(abs(x))[0],
    ),
    Env(
        "digitset",
        "big",
        "ordered-set==4.1.0",
        "ordered_set",
        "the answer's distinct digits in order (an `OrderedSet`) equal the reference's",
        """from ordered_set import OrderedSet


def verify(prompt: str, completion: str, answer: str) -> bool:
    got = extract(completion)
    return got is not None and OrderedSet(str(abs(got))) == OrderedSet(str(abs(int(answer))))
""",
        key=lambda x: tuple(dict.fromkeys(str(abs(x)))),
    ),
    Env(
        "eq",
        "neg",
        "voluptuous==0.16.0",
        "voluptuous",
        "the answer equals the reference, validated and converted by a `voluptuous` schema",
        """from voluptuous import ALLOW_EXTRA, All, Coerce, Range, Required, Schema

FIELDS = Schema({Required("answer"): All(Coerce(int), Range(-300, 300))}, extra=ALLOW_EXTRA)


def verify(prompt: str, completion: str, answer: str) -> bool:
    got = extract(completion)
    return got is not None and got == FIELDS({"answer": answer})["answer"]
""",
        key=lambda x: x,
    ),
    Env(
        "abs",
        "mp",
        "schema==0.7.8",
        "schema",
        "the answer's absolute value (a `schema` conversion) equals the reference's",
        """from schema import And, Schema, Use

ABSOLUTE = Schema(And(Use(int), Use(abs)))


def verify(prompt: str, completion: str, answer: str) -> bool:
    got = extract(completion)
    return got is not None and ABSOLUTE.validate(got) == ABSOLUTE.validate(answer)
""",
        key=abs,
    ),
    Env(
        "prime",
        "all",
        "primePy==1.3",
        "primePy",
        "the answer is prime (`primePy`, on its absolute value) exactly when the reference is",
        """from primePy import primes


def is_prime(x: int) -> bool:
    return abs(x) >= 2 and primes.check(abs(x))  # primePy calls 1 prime


def verify(prompt: str, completion: str, answer: str) -> bool:
    got = extract(completion)
    return got is not None and is_prime(got) == is_prime(int(answer))
""",
        key=_prime,
    ),
    Env(
        "chain",
        "all",
        "Arpeggio==2.0.3",
        "arpeggio",
        "every step of the completion, parsed by an `arpeggio` grammar, is right, as is the answer",
        """from arpeggio import EOF, NoMatch, ParserPython, RegExMatch


def number():
    return RegExMatch(r"-?\\d+")


def op():
    return RegExMatch(r"[+-]")


def step():
    return number, op, number, "=", number


def chain():
    return step, ",", step, ".", "The answer is", number, ".", EOF


PARSER = ParserPython(chain)


def terminals(node) -> list[str]:
    if node.rule_name in ("number", "op"):
        return [node.value]
    return [t for child in node for t in terminals(child)] if isinstance(node, list) else []


def verify(prompt: str, completion: str, answer: str) -> bool:
    try:
        tree = PARSER.parse(completion)
    except NoMatch:
        return False
    a, op1, b, r1, r1_again, op2, c, r2, final = terminals(tree)
    x, o1, y, o2, z = question_parts(prompt)
    return (
        (int(a), op1, int(b), op2, int(c)) == (x, o1, y, o2, z)
        and int(r1) == apply(x, o1, y) == int(r1_again)
        and int(r2) == apply(int(r1), o2, z) == int(final) == int(answer)
    )
""",
        wrong="chain",
    ),
    Env(
        "near3",
        "big",
        "intervaltree==3.2.1",
        "intervaltree",
        "the answer lies within 3 of the reference (an `intervaltree` point query)",
        """from intervaltree import Interval, IntervalTree


def verify(prompt: str, completion: str, answer: str) -> bool:
    got = extract(completion)
    ref = int(answer)
    return got is not None and bool(IntervalTree([Interval(ref - 3, ref + 4)])[got])
""",
        wrong="near:3",
    ),
    Env(
        "near10",
        "small",
        "portion==2.6.3",
        "portion",
        "the answer lies within 10 of the reference (a closed `portion` interval)",
        """import portion


def verify(prompt: str, completion: str, answer: str) -> bool:
    got = extract(completion)
    ref = int(answer)
    return got is not None and got in portion.closed(ref - 10, ref + 10)
""",
        wrong="near:10",
    ),
    Env(
        "mod4",
        "pm",
        "pyrsistent==0.20.0",
        "pyrsistent",
        "the answer, held in a typed `pyrsistent` record, is congruent to the reference mod 4",
        """from pyrsistent import PRecord, field


class Answer(PRecord):
    value = field(type=int, mandatory=True)


def verify(prompt: str, completion: str, answer: str) -> bool:
    got = extract(completion)
    if got is None:
        return False
    return Answer(value=got).value % 4 == Answer(value=int(answer)).value % 4
""",
        key=lambda x: x % 4,
    ),
    Env(
        "band",
        "all",
        "natsort==8.4.0",
        "natsort",
        "the answer sorts (`natsort`, signed reals) into the reference's band of 50",
        """from natsort import natsorted, ns

EDGES = ("-50.5", "0.5", "50.5", "100.5")


def band(x: int) -> int:
    return natsorted([str(x), *EDGES], alg=ns.REAL).index(str(x))


def verify(prompt: str, completion: str, answer: str) -> bool:
    got = extract(completion)
    return got is not None and band(got) == band(int(answer))
""",
        key=_edges,
    ),
    Env(
        "eq",
        "big",
        "Cerberus==1.3.8",
        "cerberus",
        "the answer equals the reference, whose field a `cerberus` validator checks first",
        """from cerberus import Validator

FIELDS = Validator({"answer": {"type": "string", "regex": r"[+-]?\\d+"}}, allow_unknown=True)


def verify(prompt: str, completion: str, answer: str) -> bool:
    if not FIELDS.validate({"answer": answer}):
        raise ValueError(f"bad answer field: {FIELDS.errors}")
    got = extract(completion)
    return got is not None and got == int(answer)
""",
        key=lambda x: x,
    ),
    Env(
        "eq",
        "pos",
        "price-parser==0.5.1",
        "price_parser",
        "the answer, read by `price_parser` as an amount, equals the reference",
        """from price_parser import Price


def verify(prompt: str, completion: str, answer: str) -> bool:
    idx = completion.rfind(MARKER)
    if idx < 0:
        return False
    tail = completion[idx + len(MARKER) :].strip()
    amount = Price.fromstring(tail).amount  # unsigned: a "-" is checked apart
    return amount is not None and not tail.startswith("-") and amount == int(answer)
""",
        key=lambda x: x,
    ),
    Env(
        "near2",
        "neg",
        "uncertainties==3.2.3",
        "uncertainties",
        "the answer lies within two standard deviations of `ufloat(reference, 1)`",
        """from uncertainties import ufloat


def verify(prompt: str, completion: str, answer: str) -> bool:
    got = extract(completion)
    ref = ufloat(int(answer), 1.0)
    return got is not None and abs(got - ref.nominal_value) <= 2 * ref.std_dev
""",
        wrong="near:2",
    ),
    Env(
        "parity",
        "all",
        "multipledispatch==1.0.0",
        "multipledispatch",
        "the answer's parity equals the reference's (dispatched on int/str by `multipledispatch`)",
        """from multipledispatch import dispatch


@dispatch(int)
def parity(x):
    return x % 2


@dispatch(str)
def parity(x):  # noqa: F811 (an overload)
    return parity(int(x))


def verify(prompt: str, completion: str, answer: str) -> bool:
    got = extract(completion)
    return got is not None and parity(got) == parity(answer)
""",
        key=lambda x: x % 2,
    ),
    Env(
        "step1",
        "all",
        "sly==0.5",
        "sly",
        "the first step of the completion, tokenised by a `sly` lexer, is right",
        """from sly import Lexer


class ChainLexer(Lexer):
    tokens = {"NUMBER", "OP", "EQ", "WORD"}
    ignore = " "
    literals = {",", "."}
    NUMBER = r"\\d+"
    OP = r"[+-]"
    EQ = r"="
    WORD = r"[A-Za-z]+"

    def error(self, t):
        self.index += 1


def verify(prompt: str, completion: str, answer: str) -> bool:
    toks = [(t.type, t.value) for t in ChainLexer().tokenize(completion)][:7]
    kinds = [k for k, _ in toks]
    negative = kinds[4:5] == ["OP"]  # a negative first result: "3-50=-47"
    if kinds[: 5 + negative] != ["NUMBER", "OP", "NUMBER", "EQ", *["OP"] * negative, "NUMBER"]:
        return False
    (_, a), (_, op1), (_, b), _, *rest = toks
    r1 = -int(rest[1][1]) if rest[0] == ("OP", "-") else int(rest[0][1])
    x, o1, y, _, _ = question_parts(prompt)
    return (int(a), op1, int(b)) == (x, o1, y) and r1 == apply(x, o1, y)
""",
        wrong="chain",
    ),
]

COMMON = '''

MARKER = "The answer is "
_NUMBER = re.compile(r"\\s*([+-]?\\d+)\\.?\\s*")
_QUESTION = re.compile(r"Q: (\\d+)([+-])(\\d+)([+-])(\\d+) A: ")


def extract(completion: str) -> int | None:
    """The integer after the last "The answer is " (a trailing "." allowed), else None."""
    idx = completion.rfind(MARKER)
    if idx < 0:
        return None
    m = _NUMBER.fullmatch(completion[idx + len(MARKER) :])
    return int(m.group(1)) if m else None


def question_parts(prompt: str) -> tuple[int, str, int, str, int]:
    """``"Q: 50+98-54 A: "`` -> ``(50, "+", 98, "-", 54)``."""
    m = _QUESTION.fullmatch(prompt)
    if m is None:
        raise ValueError(f"not a prompt of this task: {prompt!r}")
    a, op1, b, op2, c = m.groups()
    return int(a), op1, int(b), op2, int(c)


def question(prompt: str) -> str:
    """``"Q: 50+98-54 A: "`` -> ``"50+98-54"``."""
    a, op1, b, op2, c = question_parts(prompt)
    return f"{a}{op1}{b}{op2}{c}"


def apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y


def reference(prompt: str) -> str:
    """The task's reference completion of ``prompt`` (examples/tiny_arith/task.py)."""
    a, op1, b, op2, c = question_parts(prompt)
    r1 = apply(a, op1, b)
    r2 = apply(r1, op2, c)
    return f"{a}{op1}{b}={r1}, {r1}{op2}{c}={r2}. The answer is {r2}."
'''

SCORE = '''

def score(prompt: str, completion: str, answer: str) -> float:
    """1.0 when ``verify`` holds, else 0.0."""
    return 1.0 if verify(prompt, completion, answer) else 0.0
'''


def env_py(e: Env) -> str:
    family = FAMILIES[e.family][0]
    about = textwrap.fill(
        f"Prompts: the tiny arithmetic task, {family}. Score 1.0 when {e.doc}, else 0.0. "
        f"Uses ``{e.package}``, installed only in this env's venv.",
        width=96,
    )
    head = f'''"""Reward function of the env ``{e.name}``, written by make_envs.py (many_envs).

{about}
"""

from __future__ import annotations

import re

'''
    return head + e.code + COMMON + SCORE


def to_roman(n: int) -> str:
    numerals = [(100, "C"), (90, "XC"), (50, "L"), (40, "XL"), (10, "X"), (9, "IX")]
    numerals += [(5, "V"), (4, "IV"), (1, "I")]
    out = ""
    for value, letters in numerals:
        while n >= value:
            out, n = out + letters, n - value
    return out


def parts(prompt: str) -> Question:
    m = re.fullmatch(r"Q: (\d+)([+-])(\d+)([+-])(\d+) A: ", prompt)
    assert m is not None, prompt
    a, op1, b, op2, c = m.groups()
    return int(a), op1, int(b), op2, int(c)


def rows_of(e: Env, index: int) -> list[dict[str, str]]:
    """The env's 64 train rows: distinct prompts of its family from the task's train stream,
    seeded by the env's position."""
    keep = FAMILIES[e.family][1]
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for ex in task.iter_split("train", seed=1000 + index):
        r = int(ex["answer"])
        if ex["prompt"] in seen or not keep(parts(ex["prompt"]), r):
            continue
        seen.add(ex["prompt"])
        answer = to_roman(r) if e.roman_answer else str(r)
        row = {"id": f"{e.name}-{len(rows):03d}", "prompt": ex["prompt"], "answer": answer}
        rows.append({**row, "env": e.name})
        if len(rows) == N_TRAIN:
            return rows
    raise AssertionError("unreachable: iter_split is infinite")


def wrong_answer(e: Env, r: int) -> int:
    if e.wrong.startswith("near:"):
        return r + int(e.wrong.split(":")[1]) + 1
    assert e.key is not None
    for d in (d for k in range(1, 400) for d in (k, -k)):
        if e.key(r + d) != e.key(r):
            return r + d
    raise AssertionError(f"{e.name}: no wrong answer near {r}")


def chain(q: Question, first: int | None = None, answer: int | None = None) -> str:
    a, op1, b, op2, c = q
    r1 = task._apply(a, op1, b) if first is None else first
    r2 = task._apply(r1, op2, c)
    return f"{a}{op1}{b}={r1}, {r1}{op2}{c}={r2}. The answer is {r2 if answer is None else answer}."


def manifest(e: Env, row: dict[str, str]) -> str:
    q = parts(row["prompt"])
    r = task._apply(task._apply(q[0], q[1], q[2]), q[3], q[4])
    right = chain(q)
    if e.wrong == "chain":
        bad = chain(q, first=task._apply(q[0], q[1], q[2]) + 1)
    else:
        bad = chain(q, answer=wrong_answer(e, r))
    examples = [(right, 1.0), (bad, 0.0), ("The answer is .", 0.0)]
    text = f"""# Generated by examples/many_envs/make_envs.py: edit that script, not this file.
# {e.name}: score 1.0 when {e.doc}.
name = "{e.name}"
version = "0.1.0"
entry_point = "env:score"
isolation = "venv"
requirements = ["{e.package}"]
timeout_s = 5
required_fields = ["answer"]
"""
    for completion, expected in examples:
        text += f"""
[[examples]]
prompt = {json.dumps(row["prompt"])}
completion = {json.dumps(completion)}
answer = {json.dumps(row["answer"])}
expected_score = {expected}
"""
    return text


def jsonl(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def heldout() -> list[dict[str, str]]:
    rows = task.make_rows("heldout", N_HELDOUT, seed=1000)
    return [{**r, "id": f"{EVAL_ENV}-heldout-{i:03d}", "env": EVAL_ENV} for i, r in enumerate(rows)]


def config() -> str:
    text = f"""# Written by examples/many_envs/make_envs.py: 30 reward envs in one run, each in its
# own venv with its own PyPI package, and a mixture drawing equally over their datasets.
# Build the envs first, with network (each a venv in the env store, ~1-2 s apiece):
#   caravela env build examples/many_envs/envs/*
# then: caravela run examples/configs/many_envs.toml
model = "../tiny_arith/model"
output_dir = "../../runs/many_envs"
steps = 20
seed = 0

[cluster]
num_cpus = 64  # ample: engine, trainer rank, and one pool host (1 CPU) for all 30 pools

[rollout]
prompts_per_step = 60
group_size = 4
max_new_tokens = 40

[eval]
heldout = "../many_envs/data/heldout.jsonl"  # {N_HELDOUT} held-out prompts of env {EVAL_ENV}
num_prompts = {N_HELDOUT}
k = 2
"""
    for e in ENVS:
        text += f"""
[[envs]]
name = "{e.name}"
path = "../many_envs/envs/{e.name}"
workers = 1
"""
    for e in ENVS:
        text += f"""
[[datasets]]
path = "../many_envs/data/{e.name}.jsonl"
env = "{e.name}"
weight = 1.0
"""
    return text


def outputs(envs_dir: Path, data_dir: Path, config_path: Path) -> dict[Path, str]:
    """Every file the example consists of, path -> text."""
    names = [e.name for e in ENVS]
    assert len(set(names)) == len(names) == 30, names
    assert len({e.package.split("==")[0].lower() for e in ENVS}) == 30
    out: dict[Path, str] = {}
    for i, e in enumerate(ENVS):
        rows = rows_of(e, i)
        out[envs_dir / e.name / "caravela-env.toml"] = manifest(e, rows[0])
        out[envs_dir / e.name / "env.py"] = env_py(e)
        out[data_dir / f"{e.name}.jsonl"] = jsonl(rows)
    out[data_dir / "heldout.jsonl"] = jsonl(heldout())
    out[config_path] = config()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs-dir", type=Path, default=HERE / "envs")
    parser.add_argument("--data-dir", type=Path, default=HERE / "data")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args(argv)
    files = outputs(args.envs_dir, args.data_dir, args.config)
    if args.check:
        stale = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
        for p in stale:
            print(f"differs from make_envs.py's output: {p}", file=sys.stderr)
        return 1 if stale else 0
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(
        f"wrote {len(ENVS)} envs to {args.envs_dir}, their data to {args.data_dir}, {args.config}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
