"""Caption metrics as coco-caption (pycocoevalcap) computes them: BLEU-1..4 and CIDEr-D.

Pure functions; imports nothing from the package. We re-implement instead of depending on
pycocoevalcap because its wheel is ~100 MB (it bundles Java jars for METEOR, SPICE and the
tokenizer) and needs Java, while the two scorers we report are a few dozen lines of counting.

Like coco-caption, tokenising and scoring are separate steps: the scorers split each caption on
whitespace, so given the same tokens they give pycocoevalcap's numbers. For COCO-style numbers
tokenise first::

    refs = [[" ".join(tokenize(r)) for r in rs] for rs in raw_refs]
    hyps = [" ".join(tokenize(h)) for h in raw_hyps]
    bleu(refs, hyps), cider(refs, hyps)
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

# coco-caption drops these tokens after PTB tokenisation. Its list also names -LRB- etc., but it
# lower-cases first, so "-lrb-" survives there; it survives here too.
_PUNCTUATION = {"''", "'", "``", "`", '"', ".", "?", "!", ",", ":", ";", "-", "--", "..."}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_WORDS = {
    "cannot": ["can", "not"],
    "gonna": ["gon", "na"],
    "gotta": ["got", "ta"],
    "wanna": ["wan", "na"],
}
_TOKEN = re.compile(
    r"""(?:[a-z]\.){2,}(?!\w)           # u.s. e.g. p.m.
    | (?:mrs?|ms|dr|st|jr|sr|vs|prof)\.(?!\w)
    | '(?:s|re|ve|ll|d|m)\b | n't\b     # clitics, split from their word first
    | 'n' | (?<!\w)'\d\w*                # rock 'n' roll, the '90s
    | \w+(?:(?:[-./&@]|(?<=[^\W\d_])'(?=[^\W\d_])|(?<=\d)[,:](?=\d))\w+)*
    | [.?!]+ | -+                       # runs: "?!" stays a token, "..." and "--" are dropped
    | \S""",
    re.VERBOSE,
)


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens, close to coco-caption's Stanford PTBTokenizer + punctuation filter.

    We do it in Python because the original runs a Java jar. It agrees on ordinary captions: it splits
    clitics ("dog's" -> dog 's, "can't" -> ca n't), keeps hyphenated words, decimals, times and
    abbreviations whole, and drops the same punctuation. Known differences, all rare in captions: PTB
    keeps some symbol-led words whole ("#hashtag", "@user", "<c>", URLs) where we split off the
    symbol; its full abbreviation list is longer than ours; it turns a few more contractions
    ("'tis", "d'ye") into two tokens.
    """
    text = text.lower().replace("\u2026", "...").replace("\u2014", "--").replace("\u2013", "--")
    text = re.sub(r"(?<=\w)('(?:s|re|ve|ll|d|m)\b|n't\b)", r" \1", text)  # it's -> it 's
    tokens: list[str] = []
    for tok in _TOKEN.findall(text):
        tok = _BRACKETS.get(tok, tok)
        if tok in _PUNCTUATION or set(tok) <= {"."} or set(tok) <= {"-"}:
            continue
        tokens.extend(_SPLIT_WORDS.get(tok, [tok]))
    return tokens


def _check_corpus(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> None:
    """coco-caption asserts these; we say what is wrong instead."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference lists but {len(hypotheses)} hypotheses")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    for i, (refs, hyp) in enumerate(zip(references, hypotheses, strict=True)):
        if isinstance(refs, str):
            raise TypeError(f"references[{i}] is a string; pass a list of reference captions per hypothesis")
        if not isinstance(hyp, str):
            raise TypeError(f"hypotheses[{i}] is {type(hyp).__name__}, not a string")
        if len(refs) == 0:
            raise ValueError(f"hypothesis {i} has no references")


def _ngrams(words: Sequence[str], max_n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


# coco-caption's smoothing: (matches + TINY) / (guesses + SMALL) keeps an order with no n-grams
# (a hypothesis shorter than n) from dividing by zero; it then contributes a factor 1e-6.
_TINY = 1e-15
_SMALL = 1e-9


def bleu(references: Sequence[Sequence[str]], hypotheses: Sequence[str], max_n: int = 4) -> dict[str, float]:
    """Corpus BLEU-1..max_n, {"BLEU-1": ..., "BLEU-4": ...}, as coco-caption's Bleu scorer.

    Corpus-level, not a mean of sentence scores: clipped n-gram matches and n-gram counts are summed
    over all hypotheses, and the brevity penalty compares the total hypothesis length with the
    total of each hypothesis's *closest* reference length (ties go to the shorter reference). An
    empty hypothesis adds nothing but its reference length, so it lowers the brevity penalty.
    """
    _check_corpus(references, hypotheses)
    if max_n < 1:
        raise ValueError(f"max_n must be at least 1, got {max_n}")
    matches = [0] * max_n
    guesses = [0] * max_n
    hyp_len = ref_len = 0
    for refs, hyp in zip(references, hypotheses, strict=True):
        words = hyp.split()
        ref_words = [r.split() for r in refs]
        max_ref_counts: Counter[tuple[str, ...]] = Counter()
        for r in ref_words:
            max_ref_counts |= _ngrams(r, max_n)  # per n-gram, the most any one reference has
        for gram, count in _ngrams(words, max_n).items():
            matches[len(gram) - 1] += min(count, max_ref_counts[gram])
        for n in range(max_n):
            guesses[n] += max(0, len(words) - n)
        hyp_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]

    scores: dict[str, float] = {}
    precision_product = 1.0
    for n in range(max_n):
        precision_product *= (matches[n] + _TINY) / (guesses[n] + _SMALL)
        scores[f"BLEU-{n + 1}"] = precision_product ** (1.0 / (n + 1))  # geometric mean of p_1..p_n
    ratio = (hyp_len + _TINY) / (ref_len + _SMALL)
    if ratio < 1:
        penalty = math.exp(1 - 1 / ratio)
        scores = {name: s * penalty for name, s in scores.items()}
    return scores


def cider(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> float:
    """CIDEr-D as coco-caption's Cider scorer (what COCO tables call "CIDEr"), mean over images.

    Each caption becomes tf-idf vectors of its 1..4-grams; the idf is log(images / images whose
    references hold the n-gram), computed over *this* corpus's references, so scores depend on
    which images are evaluated together, and a one-image corpus always scores 0. Per reference:
    the cosine per n-gram order with the hypothesis weights clipped by the reference's, times a
    Gaussian length penalty (sigma 6); averaged over orders and references, times 10.
    """
    _check_corpus(references, hypotheses)
    max_n, sigma = 4, 6.0
    ref_words = [[r.split() for r in refs] for refs in references]
    ref_counts = [[_ngrams(r, max_n) for r in refs] for refs in ref_words]
    document_frequency: Counter[tuple[str, ...]] = Counter()
    for counts in ref_counts:
        document_frequency.update(set().union(*counts))
    log_images = math.log(len(references))

    def tfidf(counts: Counter[tuple[str, ...]]) -> tuple[list[dict[tuple[str, ...], float]], list[float]]:
        vectors: list[dict[tuple[str, ...], float]] = [{} for _ in range(max_n)]
        for gram, tf in counts.items():
            # an n-gram no reference has gets document frequency 1, as in coco-caption
            vectors[len(gram) - 1][gram] = tf * (log_images - math.log(max(1, document_frequency[gram])))
        return vectors, [math.sqrt(sum(w * w for w in v.values())) for v in vectors]

    per_image = []
    for words, refs, counts in zip((h.split() for h in hypotheses), ref_words, ref_counts, strict=True):
        hyp_vec, hyp_norm = tfidf(_ngrams(words, max_n))
        per_order = [0.0] * max_n  # summed over references
        for ref, ref_count in zip(refs, counts, strict=True):
            ref_vec, ref_norm = tfidf(ref_count)
            # coco-caption measures length in bigrams; that difference equals the word-count
            # difference whenever both captions are non-empty, and an empty one scores 0 anyway.
            penalty = math.exp(-((len(words) - len(ref)) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                weights = ref_vec[n]
                dot = sum(min(w, weights.get(g, 0.0)) * weights.get(g, 0.0) for g, w in hyp_vec[n].items())
                if hyp_norm[n] != 0 and ref_norm[n] != 0:
                    dot /= hyp_norm[n] * ref_norm[n]
                per_order[n] += dot * penalty
        per_image.append(sum(per_order) / max_n / len(refs) * 10.0)
    return sum(per_image) / len(per_image)
