"""Request forms of a caption for the retrieval pass: "red apple" → "show me a red apple".

Captions alone teach `[RET]` to follow a bare noun phrase, but users ask for images in
sentences. Training the retrieval pass on a few request templates too (the caption is the
image's name in every one) lets "can you show me a red apple?" land where "red apple" does.
Which templates a caption gets is a pure function of the caption, so every run, validation
and the state caches agree on the exact strings.
"""

from __future__ import annotations

import hashlib

TEMPLATES = (
    "show me {a}{x}",
    "can you show me {a}{x}?",
    "I want to see {a}{x}",
    "find me {a}{x}",
    "a picture of {a}{x}",
    "do you have {a}{x}?",
    "here is {a}{x}:",
    "please show {a}{x}",
)

_ARTICLES = ("a ", "an ", "the ")


def article(noun_phrase: str) -> str:
    """The indefinite article to put before `noun_phrase` ("" if it already has one)."""
    lowered = noun_phrase.lower()
    if lowered.startswith(_ARTICLES) or not lowered:
        return ""
    return "an " if lowered[0] in "aeiou" else "a "


def request_forms(caption: str, count: int) -> list[str]:
    """`count` distinct request sentences for `caption` (at most len(TEMPLATES)), the same for
    the same caption in every process."""
    if count <= 0:
        return []
    count = min(count, len(TEMPLATES))
    start = int.from_bytes(hashlib.sha256(caption.encode()).digest()[:4], "big") % len(TEMPLATES)
    a = article(caption)
    return [TEMPLATES[(start + i) % len(TEMPLATES)].format(a=a, x=caption) for i in range(count)]
