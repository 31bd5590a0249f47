"""Arithmetic scoring (as the built-in ``arith`` env) that echoes the item it scored, and
misbehaves where the dataset row asks: ``fault = "hang"`` never returns, ``fault = "nan"``
returns NaN; ``delay`` (seconds) slows every item down a little."""

import re
import threading
import time

_ANSWER_RE = re.compile(r"\s*([+-]?\d+)\.?\s*")


def score(prompt, completion, answer, fault=None, delay=0.0):
    if fault == "hang":
        threading.Event().wait()  # forever: only the pool's kill ends it
    if fault == "nan":
        return float("nan")
    time.sleep(delay)
    idx = completion.rfind("The answer is ")
    m = _ANSWER_RE.fullmatch(completion[idx + len("The answer is ") :]) if idx >= 0 else None
    value = 1.0 if m is not None and int(m.group(1)) == int(answer) else 0.0
    return {"score": value, "info": {"prompt": prompt, "completion": completion}}
