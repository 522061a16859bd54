"""How close two answers are: :func:`chrf` (character n-gram F-score) and :func:`token_f1` (bag-of-words F1).

Both are 1 for identical answers and 0 for answers with nothing in common; :func:`attnscan.behaviour.defend.defend`
averages them over the benign prompts to compare the bypassed model's answers with the baseline's.
"""

from __future__ import annotations

import re
from collections import Counter

__all__ = ["chrf", "token_f1"]


def _char_ngrams(text: str, n: int) -> Counter[str]:
    return Counter(text[i : i + n] for i in range(len(text) - n + 1))


def chrf(hypothesis: str, reference: str, n: int = 6, beta: float = 1.0) -> float:
    """Character n-gram F-score in [0, 1] (chrF with orders 1..``n``, white space removed).

    Precision and recall are averaged over the orders at which either string has n-grams, then combined as
    ``(1 + β²) P R / (β² P + R)``. Two empty strings score 1, one empty string 0.
    """
    hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
    if not hyp and not ref:
        return 1.0
    if not hyp or not ref:
        return 0.0
    precisions, recalls = [], []
    for order in range(1, n + 1):
        h, r = _char_ngrams(hyp, order), _char_ngrams(ref, order)
        if not h and not r:
            continue
        overlap = sum((h & r).values())
        precisions.append(overlap / sum(h.values()) if h else 0.0)
        recalls.append(overlap / sum(r.values()) if r else 0.0)
    p, r_ = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if p == 0 and r_ == 0:
        return 0.0
    b2 = beta * beta
    return (1 + b2) * p * r_ / (b2 * p + r_)


_WORD = re.compile(r"\w+")


def token_f1(hypothesis: str, reference: str) -> float:
    """Bag-of-words F1 in [0, 1] over lower-cased ``\\w+`` tokens. Two empty strings score 1, one empty 0."""
    h, r = Counter(_WORD.findall(hypothesis.lower())), Counter(_WORD.findall(reference.lower()))
    if not h and not r:
        return 1.0
    overlap = sum((h & r).values())
    if overlap == 0:
        return 0.0
    p, rec = overlap / sum(h.values()), overlap / sum(r.values())
    return 2 * p * rec / (p + rec)
