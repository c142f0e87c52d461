"""Caption metrics without downloads: corpus BLEU-4 and CIDEr-D.

Both take `candidates: list[str]` and `references: list[list[str]]` (several
references per candidate). Tokenisation is lower-case words with punctuation
split off, the same for candidates and references.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.lower()) if t not in {".", ",", "!", "?", ";", ":"}]


def ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _check(candidates, references):
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    for i, refs in enumerate(references):
        if not refs:
            raise ValueError(f"candidate {i} has no references")


def bleu4(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (uniform weights, clipped counts, brevity penalty against the closest reference)."""
    _check(candidates, references)
    matched = [0] * 4
    total = [0] * 4
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references):
        c = tokenize(cand)
        rs = [tokenize(r) for r in refs]
        cand_len += len(c)
        ref_len += min((abs(len(r) - len(c)), len(r)) for r in rs)[1]
        for n in range(1, 5):
            cn = ngrams(c, n)
            best = Counter()
            for r in rs:
                best |= ngrams(r, n)
            matched[n - 1] += sum(min(k, best[g]) for g, k in cn.items())
            total[n - 1] += max(len(c) - n + 1, 0)
    if min(matched) == 0 or cand_len == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(matched, total)) / 4
    bp = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / cand_len)
    return bp * math.exp(log_p)


def cider_d(
    candidates: Sequence[str], references: Sequence[Sequence[str]], sigma: float = 6.0, n_max: int = 4
) -> float:
    """CIDEr-D: tf-idf n-gram cosine with clipping and a Gaussian length penalty, times 10.

    Document frequencies come from the references of this corpus, as in the
    metric's definition; the score is the mean over candidates.
    """
    _check(candidates, references)
    refs_tok = [[tokenize(r) for r in refs] for refs in references]
    df: Counter = Counter()
    for refs in refs_tok:
        seen = set()
        for r in refs:
            for n in range(1, n_max + 1):
                seen.update(ngrams(r, n))
        df.update(seen)
    log_n = math.log(float(len(candidates)))

    def vec(words):
        out = []
        for n in range(1, n_max + 1):
            v = {g: k * (log_n - math.log(max(1.0, df[g]))) for g, k in ngrams(words, n).items()}
            out.append((v, math.sqrt(sum(x * x for x in v.values()))))
        return out

    scores = []
    for cand, refs in zip(candidates, refs_tok):
        c = tokenize(cand)
        cv = vec(c)
        total = 0.0
        for r in refs:
            rv = vec(r)
            delta = len(c) - len(r)
            s = 0.0
            for (vc, nc), (vr, nr) in zip(cv, rv):
                if nc == 0 or nr == 0:
                    continue
                dot = sum(min(x, vr[g]) * vr[g] for g, x in vc.items() if g in vr)
                s += dot / (nc * nr)
            total += (s / n_max) * math.exp(-(delta**2) / (2 * sigma**2))
        scores.append(10.0 * total / len(refs))
    return sum(scores) / len(scores)
