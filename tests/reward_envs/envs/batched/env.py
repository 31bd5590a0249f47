"""Exact match, scored a batch at a time; returns too few results when asked to."""


def score_batch(items):
    if any(i["completion"] == "short" for i in items):
        return [1.0] * (len(items) - 1)
    return [float(i["completion"] == i["answer"]) for i in items]
