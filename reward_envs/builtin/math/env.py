"""Reward function of the built-in ``math`` env: final-answer equivalence through math-verify.

``score(prompt, completion, answer)`` is 1.0 when the completion's final answer is
mathematically equivalent to the reference ``answer``, else 0.0. Equivalence itself is
HuggingFace's math-verify (``parse`` + ``verify``: sympy values, fractions, radicals,
expressions, sets, intervals, equations such as ``x=3`` against ``3``, numeric tolerance of
6 decimals). This module adds the answer extraction and the pre-normalisation math-verify
lacks.

Answer extraction (on the completion):

* the text after the last ``"answer is"`` / ``"answer:"`` (also Portuguese ``"resposta é"``,
  ``"resposta final é"``, ``"resposta:"``), case-insensitive, up to the end of that sentence
  (a ``.`` before whitespace, or a newline), or the whole display-math block it opens
  (``$$…$$``, ``\\[…\\]``);
* every ``\\boxed{…}`` (and ``\\fbox{…}``);
* only when neither exists: the completion's last value (``last_number``): a number
  (``1 000``, ``1\\,000``, ``.4``, ``3/4``), a ``\\frac`` / ``\\dfrac`` / ``\\tfrac`` / ``\\cfrac``
  (braces optional: ``\\frac13``) or a ``\\sqrt`` (``\\sqrt3``), or the one-expression math span
  holding it (``\\( (9+1) \\)``). Digits glued to a letter on their left are part of a word and
  never read (``AZYUK2A``, ``x2``, ``H2O``); letters glued on the right are a unit or suffix
  (``5cm``, ``2nd``).

Every declared answer (the answer-is sentence and each box) must match the reference, so a
completion that commits to several candidates (two different boxes, a box that disagrees
with its "The answer is" sentence) scores 0. Inside one answer, ``or`` / ``ou`` / ``and``
right after the value (``3 or 4``) makes it ambiguous (0), unless the reference is a
collection, where they separate items (``x = 3 or x = -3`` against ``{3, -3}``); a list
(``3, 4``) never equals a single value. A declared answer over ``MAX_ANSWER_CHARS`` scores 0
unparsed.

Pre-normalisation of each answer (and of the reference) before math-verify sees it:

* unicode: minus signs (U+2212, U+FE63, U+FF0D; an en dash before a digit) become ``-``;
  no-break / thin spaces between digit groups are thousands separators; ``π × ÷ · √ ∞ ≤ ≥``
  become their LaTeX commands;
* currency: ``R$``, ``US$``, ``\\$``, ``$``, ``€``, ``£``, ``¥`` are dropped, and so are
  math delimiters, markdown emphasis (``**42**``, ``*42*``) and code marks;
* words: ``\\text{…}``-style wrappers are unwrapped, words before the answer are dropped and
  the answer ends at the first word after it (units: ``42 apples``, ``3 cm``, ``12 reais``),
  unless the answer is only words (``\\text{Evelyn}``);
* ``percent`` / ``por cento`` / ``\\%`` become ``%``; a percent sign on either side is
  optional: ``p%`` equals both ``p`` and ``p/100`` (reference ``50%`` accepts ``50%``, ``50``
  and ``0.5``; reference ``0.5`` accepts ``50%`` but not ``50``; reference ``50`` accepts
  ``50%``);
* number separators, for a scalar reference: when a number holds both ``.`` and ``,`` the
  last one is the decimal mark and the other groups thousands (``1.234,5`` = ``1,234.5`` =
  1234.5); a lone ``,`` followed by exactly three digits groups thousands (``1,234`` = 1234,
  the English reading), any other lone ``,`` is a decimal comma (``3,5`` = 3.5, ``0,500`` =
  0.5); repeated separators in groups of three group thousands (``1.234.567``, ``1,234,567``,
  ``1 234 567``); a single ``.`` is always a decimal point. So a Portuguese ``36,256`` meaning
  36.256 reads as 36256: write ``36,2560`` or ``36.256``;
* for a collection reference (braces, brackets/parentheses with commas, ``", "``, ``;`` or
  ``and``): commas separate items (``1,2`` = ``{1, 2}``), unless the text uses ``;``, which
  then separates items while commas are read as in a scalar; plain braces ``{1, 2}`` are read
  as the set ``\\{1, 2\\}``; sets compare without order;
* a reference in GSM8K form keeps what follows the last ``####``; a boxed reference is
  unboxed.

Timeouts: math-verify's own ``parsing_timeout`` / ``timeout_seconds`` are switched off. They
use ``signal.alarm`` (fails off the main thread) and, worse, make a pathological item score
0 when they fire, a silent wrong reward. Here a slow item runs until the env pool's hard
per-item limit (``timeout_s`` in the manifest) kills the worker, and the item comes back as
a ``timeout`` error that the run counts and does not train on.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

MAX_ANSWER_CHARS = 1000
"""A declared answer longer than this scores 0 without being parsed (bounds the work)."""

_EXTRACTION_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())

# --- unicode and currency ---------------------------------------------------------------

_UNICODE_SYMBOLS = {
    "\u2212": "-",  # minus sign
    "\ufe63": "-",  # small hyphen-minus
    "\uff0d": "-",  # full-width hyphen-minus
    "π": r"\pi ",
    "×": r"\times ",
    "÷": r"\div ",
    "·": r"\cdot ",
    "√": r"\sqrt",
    "∞": r"\infty ",
    "≤": r"\le ",
    "≥": r"\ge ",
}
_EN_DASH_MINUS_RE = re.compile(r"(?<!\w)\u2013(?=\s?\d)")
_GROUP_SPACE_RE = re.compile(r"(?<=\d)(?:[\u00a0\u202f\u2009\u2007]|\\[,:; ]|~)(?=\d{3}(?!\d))")
_OTHER_SPACE_RE = re.compile(r"[\u00a0\u202f\u2009\u2007]")
_BRACED_COMMA_RE = re.compile(r"(?<=\d)\{,\}(?=\d)")
_CURRENCY_RE = re.compile(r"R\$|US\$|\\\$|[$€£¥]")


def normalise_unicode(text: str) -> str:
    """Unicode minus signs, digit-group spaces and math symbols in ASCII / LaTeX form.

    A no-break / thin space, ``\\,`` / ``\\;`` / ``\\:`` / ``\\ `` or ``~`` before a group of
    exactly three digits groups thousands (dropped); LaTeX's ``{,}`` between digits is a plain
    comma, read later by the separator rules (``1{,}000`` = 1000, ``3{,}5`` = 3.5).
    """
    text = _EN_DASH_MINUS_RE.sub("-", text)
    text = _GROUP_SPACE_RE.sub("", text)
    text = _BRACED_COMMA_RE.sub(",", text)
    text = _OTHER_SPACE_RE.sub(" ", text)
    for symbol, replacement in _UNICODE_SYMBOLS.items():
        text = text.replace(symbol, replacement)
    return text


# --- extraction -------------------------------------------------------------------------

_MARKER_RE = re.compile(r"(?i)\b(?:answer\s*(?:is\b|:)|resposta(?:\s+final)?\s*(?:é|:))\s*:?\s*")
_DISPLAY_BLOCKS = (("$$", "$$"), (r"\[", r"\]"))
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)|\n")
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ARG = r"(?:\{(?:[^{}]|\{[^{}]*\})*\}|[0-9A-Za-z])"  # {…} (one nesting level) or one char
_NUMBER = r"(?:\d{1,3}(?: \d{3})+(?:[.,]\d+)?(?!\d)|\d+(?:[.,]\d+)*|\.\d+)"
_LAST_NUMBER_RE = re.compile(
    r"-?(?:"
    rf"\d*\\[dtc]?frac\s*{_ARG}\s*{_ARG}"  # \frac{1}{3}, \frac13, \tfrac{1}3
    rf"|\d*\\sqrt\s*(?:\[[^\]]*\]\s*)?{_ARG}"  # \sqrt{3}, 2\sqrt3, \sqrt[3]{2}
    rf"|{_NUMBER}(?:\s*/\s*{_NUMBER})?(?:\s*(?:%|\\%))?"  # 1 000, 1,234.5, .4, 3/4, 50%
    r")"
)
_DOLLAR_RE = re.compile(r"\\\$|\$\$|\$")  # an escaped \\$ (not a delimiter), $$ or $
_NOT_ONE_EXPRESSION_RE = re.compile(
    r"[;&]|\\\\|\\begin|\\(?:text|textbf|textit|mathrm|mbox|operatorname|quad)\b"
)


def braced_contents(text: str, pattern: re.Pattern[str]) -> list[str]:
    """Contents of the outermost ``{…}`` groups opened by ``pattern``, in order (one pass).

    Braces are matched by depth; a group that never closes is skipped, and a group nested in
    another matched group is part of the outer one.
    """
    openers = {m.end() - 1 for m in pattern.finditer(text)}
    found: list[str] = []
    stack: list[int] = []
    open_groups = 0
    for i, char in enumerate(text):
        if char == "{":
            stack.append(i)
            open_groups += i in openers
        elif char == "}" and stack:
            start = stack.pop()
            if start in openers:
                open_groups -= 1
                if open_groups == 0:
                    found.append(text[start + 1 : i])
    return found


def answer_sentence(completion: str) -> str | None:
    """Text after the last answer marker: its display-math block, or up to its sentence end."""
    markers = list(_MARKER_RE.finditer(completion))
    if not markers:
        return None
    rest = completion[markers[-1].end() :]
    for opening, closing in _DISPLAY_BLOCKS:
        close = rest.find(closing, len(opening)) if rest.startswith(opening) else -1
        if close > 0:
            return rest[: close + len(closing)]
    end = _SENTENCE_END_RE.search(rest)
    sentence = rest[: end.start()] if end else rest
    return sentence.strip() or None


def glued(text: str, value: re.Match[str]) -> bool:
    """Whether a value found in ``text`` starts inside a word (``2`` in ``AZYUK2A``, ``x2``).

    Digits right after a LaTeX command (``\\approx11``, ``\\pi2``) are not in a word.
    """
    i = value.start()
    if not (value.group()[0].isdigit() or value.group()[0] == ".") or not is_word_char(text, i - 1):
        return False
    while is_word_char(text, i - 1):
        i -= 1
    return i == 0 or text[i - 1] != "\\"


def is_word_char(text: str, i: int) -> bool:
    """Whether ``text[i]`` exists and is a letter, digit or ``_``."""
    return i >= 0 and (text[i].isalnum() or text[i] == "_")


def last_number(completion: str, collection: bool = False) -> str | None:
    """The completion's last value, or None; the fallback when no answer is declared.

    The value is the last number (``1 000``, ``1.234,5``, ``.4``, ``3/4``, ``50%``),
    ``\\frac`` (also ``\\dfrac`` / ``\\tfrac`` / ``\\cfrac``, braces optional: ``\\frac13``) or
    ``\\sqrt`` (``\\sqrt3``); digits glued to a letter on their left are part of a word
    (``AZYUK2A``, ``x2``, ``H2O``) and never read. Letters glued on the right are a unit or
    suffix (``5cm`` and ``2nd`` read as 5 and 2). When that value lies in a math span
    (``$…$``, ``\\(…\\)``, ``\\[…\\]``, ``$$…$$``) holding one expression (no ``,`` ``;`` ``&``,
    ``\\\\``, environment or ``\\text``; commas only for a ``collection`` reference), the whole
    span is the answer: ``$(9+1)$``, ``$[0,1)$``.
    """
    numbers = [m for m in _LAST_NUMBER_RE.finditer(completion) if not glued(completion, m)]
    if not numbers:
        return None
    last = numbers[-1]
    span = enclosing_span(completion, last.start(), last.end())
    if span is None or len(span) > MAX_ANSWER_CHARS or _NOT_ONE_EXPRESSION_RE.search(span):
        return last.group()
    return last.group() if "," in span and not collection else span


def enclosing_span(text: str, start: int, end: int) -> str | None:
    """The content of the math span around ``text[start:end]``, or None (linear time).

    ``\\(…\\)`` and ``$…$`` stay on one line; ``$`` / ``$$`` pair up in order (``\\$`` is not
    a delimiter), so an odd count of them before the value opens a span.
    """
    left, right = text[:start], text[end:]
    for opening, closing, inline in ((r"\(", r"\)", True), (r"\[", r"\]", False)):
        i, j = left.rfind(opening), right.find(closing)
        if i < 0 or j < 0 or left.rfind(closing) > i or 0 <= right.find(opening) < j:
            continue
        content = text[i + len(opening) : end + j]
        if not (inline and "\n" in content):
            return content
    for delimiter in ("$$", "$"):
        before = [m for m in _DOLLAR_RE.finditer(left) if m.group() == delimiter]
        after = (m for m in _DOLLAR_RE.finditer(right) if m.group() == delimiter)
        close = next(after, None)
        if len(before) % 2 == 0 or close is None:
            continue
        content = text[before[-1].end() : end + close.start()]
        if not (delimiter == "$" and "\n" in content):
            return content
    return None


def declared_answers(completion: str, collection: bool = False) -> list[str]:
    """Every answer the completion commits to (see the module docstring), maybe none."""
    completion = normalise_unicode(completion)
    answers = braced_contents(completion, _BOX_RE)
    sentence = answer_sentence(completion)
    if sentence is not None and not _BOX_RE.search(sentence):
        answers.append(sentence)
    if answers:
        return answers
    number = last_number(completion, collection)
    return [number] if number is not None else []


# --- normalisation of one answer --------------------------------------------------------

_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{")
_PERCENT_WORD_RE = re.compile(r"(?i)\s*(?:per\s?cent|percentage|por\s?cento)\b|\\%")
_MARKDOWN_RE = re.compile(r"(?:^|(?<=\s))(?:\*\*|__)|(?:\*\*|__)(?=\s|$)|`")  # not 2**3
_CONJUNCTION_RE = re.compile(r"(?i)\s+(?:and|or|ou)\s+")
_WORD_RE = re.compile(r"(?<![\\A-Za-z])[^\W\d_]+")
_MATH_WORDS = {"sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "sqrt", "pi"}
_CONTENT_RE = re.compile(r"[^\s.,;:!?]")
_AMBIGUOUS_WORDS = {"or", "ou", "and"}
_NUMBER_TOKEN_RE = re.compile(r"(?<![\d.,])\d+(?:[.,]\d+)+(?![\d])")
_SPACE_GROUPS_RE = re.compile(r"(?<![\d.,])\d{1,3}(?: \d{3})+(?!\d)")
_THOUSANDS_GROUPS_RE = re.compile(r"[1-9]\d{0,2}(?:X\d{3})+")
_OPEN_COLLECTION_RE = re.compile(r"^\s*(?:\\\{|\{|\\left\s*[(\[]|\(|\[)")


def unwrap_text(text: str) -> str:
    """``\\text{5 apples}`` → ``5 apples``: each wrapper in turn, outermost first."""
    while m := _TEXT_WRAPPER_RE.search(text):
        inner = braced_contents(text[m.start() :], _TEXT_WRAPPER_RE)
        if not inner:
            return text
        end = m.end() + len(inner[0]) + 1
        text = text[: m.start()] + " " + inner[0] + " " + text[end:]
    return text


def is_word(token: str) -> bool:
    """A prose word: 2+ letters, or any non-ASCII letter; not a math function name."""
    return (len(token) > 1 or not token.isascii()) and token.lower() not in _MATH_WORDS


def has_content(text: str) -> bool:
    """Whether ``text`` holds more than whitespace and punctuation."""
    return bool(_CONTENT_RE.search(text))


def strip_prose(text: str) -> tuple[str, str | None]:
    """The answer without the prose before it, cut at the first word after it.

    Returns the answer and the word it was cut at (None when nothing followed). An answer
    that is only words (``Evelyn``) is kept whole.
    """
    start = 0
    for m in _WORD_RE.finditer(text):
        if not is_word(m.group()):
            continue
        if has_content(text[start : m.start()]):
            return text[start : m.start()], m.group()
        start = m.end()
    rest = text[start:]
    return (rest if has_content(rest) else text), None


def ungroup(token: str, mark: str) -> str | None:
    """``token`` without its ``mark`` thousands separators, or None if not grouped by 3."""
    if _THOUSANDS_GROUPS_RE.fullmatch(token.replace(mark, "X")):
        return token.replace(mark, "")
    return None


def canonical_number(token: str) -> str:
    """One number with ``.``/``,`` separators in plain form (rules in the module docstring)."""
    marks = re.findall(r"[.,]", token)
    if len(set(marks)) == 2:
        decimal = marks[-1]
        head, _, tail = token.rpartition(decimal)
        grouped = ungroup(head, "," if decimal == "." else ".") if decimal not in head else None
        return f"{grouped}.{tail}" if grouped is not None else token
    if len(marks) > 1:
        return ungroup(token, marks[0]) or token
    if marks == ["."]:
        return token
    grouped = ungroup(token, ",")
    return grouped if grouped is not None else token.replace(",", ".")


def canonical_numbers(text: str, collection: bool) -> str:
    """Every separated number in ``text`` in plain form; commas split items in collections."""
    if collection and ";" not in text:
        text = _NUMBER_TOKEN_RE.sub(lambda m: ungroup(m.group(), ".") or m.group(), text)
        return text.replace(",", ", ")
    if not collection:
        text = _SPACE_GROUPS_RE.sub(lambda m: m.group().replace(" ", ""), text)
    text = _NUMBER_TOKEN_RE.sub(lambda m: canonical_number(m.group()), text)
    return text.replace(";", ",") if collection else text


def is_collection(reference: str) -> bool:
    """Whether the (cleaned) reference lists several items: a set, tuple, interval or list."""
    if ";" in reference or re.search(r",\s|\s+and\s+", reference):
        return True
    return bool(_OPEN_COLLECTION_RE.match(reference)) and "," in reference


def clean(text: str) -> str:
    """An answer's box; unicode, currency, delimiters, ``\\text``, percent words, markdown."""
    text = normalise_unicode(text)
    boxes = braced_contents(text, _BOX_RE)
    text = boxes[-1] if boxes else text
    text = _CURRENCY_RE.sub("", unwrap_text(text))
    text = re.sub(r"\\[()\[\]]", " ", text)
    text = _PERCENT_WORD_RE.sub("%", text)
    return _MARKDOWN_RE.sub("", text).strip().strip("*").strip()


def finish(text: str, collection: bool) -> str | None:
    """Prose cut, separators made canonical, plain braces made a set; None: ambiguous/empty."""
    if collection:
        text = _CONJUNCTION_RE.sub(", ", text)
    text, stop = strip_prose(text)
    if stop is not None and stop.lower() in _AMBIGUOUS_WORDS:
        return None
    text = canonical_numbers(text.strip().rstrip(".,;:([ ").strip(), collection)
    if text.startswith("{") and text.endswith("}"):
        text = rf"\{{{text[1:-1]}\}}"
    return text or None


def variants(text: str) -> list[str]:
    """``text`` and, when it ends in a percent sign, ``text`` without it."""
    if text.endswith("%"):
        return [text, text[:-1].rstrip()]
    return [text]


# --- math-verify ------------------------------------------------------------------------


def parsed(text: str) -> Iterator[list[Any]]:
    """math-verify parses of each variant of one normalised answer (empty ones skipped)."""
    for variant in variants(text):
        result = parse(f"${variant}$", _EXTRACTION_CONFIG, parsing_timeout=None)
        if result:
            yield result


def equivalent(reference: list[list[Any]], candidate: str) -> bool:
    """Whether any parse of ``candidate`` verifies against any parse of the reference."""
    return any(
        verify(gold, pred, timeout_seconds=None) for pred in parsed(candidate) for gold in reference
    )


def reference_text(answer: str) -> str:
    """The reference with any GSM8K ``####`` prefix and box removed, cleaned."""
    return clean(answer.rpartition("####")[2])


def score(prompt: str, completion: str, answer: str, **fields: Any) -> float:
    """1.0 if every answer the completion declares is equivalent to ``answer``, else 0.0."""
    del prompt, fields
    ref = reference_text(answer)
    collection = is_collection(ref)
    ref_final = finish(ref, collection)
    reference = list(parsed(ref_final)) if ref_final is not None else []
    declared = list(dict.fromkeys(declared_answers(completion, collection)))
    if not reference or not declared or any(len(d) > MAX_ANSWER_CHARS for d in declared):
        return 0.0
    candidates = [finish(clean(d), collection) for d in declared]
    finished = [c for c in dict.fromkeys(candidates) if c is not None]
    if len(finished) < len(set(candidates)):  # an ambiguous or empty answer
        return 0.0
    return 1.0 if all(equivalent(reference, c) for c in finished) else 0.0
