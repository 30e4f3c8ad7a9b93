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

EXTRA_TEMPLATES = (
    "give me {a}{x}",
    "send me {a}{x}",
    "I'd like {a}{x}",
    "an image of {a}{x}",
    "look for {a}{x}",
    "search for {a}{x}",
    "where is {a}{x}?",
    "show {a}{x}",
    "can I see {a}{x}?",
    "{x}, please",
    "get me {a}{x}",
    "I need {a}{x}",
)
"""More forms the ship recipe's retrieval contexts read (training/tasks.py)."""
TRAINING_TEMPLATES = (*TEMPLATES, *EXTRA_TEMPLATES)

HELD_OUT_TEMPLATES = (
    "could you pull up {a}{x} for me?",
    "I'm looking for {a}{x}",
    "what does {a}{x} look like?",
    "let me have a look at {a}{x}",
    "display {a}{x}",
    "any chance you have {a}{x}?",
    "I would love to see {a}{x} right now",
    "bring up {a}{x}",
    "my friend wants {a}{x}",
    "time for {a}{x}!",
)
"""Sentence forms no training template uses: requests in them measure whether the model learned
requests or only the templates (evaluate/offline.py). Never train on these."""

_ARTICLES = ("a ", "an ", "the ")


def article(noun_phrase: str) -> str:
    """The indefinite article to put before `noun_phrase` ("" if it already has one)."""
    lowered = noun_phrase.lower()
    if lowered.startswith(_ARTICLES) or not lowered:
        return ""
    return "an " if lowered[0] in "aeiou" else "a "


def held_out_request(caption: str, index: int) -> str:
    """The caption in held-out sentence form `index` (modulo their number)."""
    return HELD_OUT_TEMPLATES[index % len(HELD_OUT_TEMPLATES)].format(a=article(caption), x=caption)


def request_forms(caption: str, count: int) -> list[str]:
    """`count` distinct request sentences for `caption` (at most len(TEMPLATES)), the same for
    the same caption in every process."""
    if count <= 0:
        return []
    count = min(count, len(TEMPLATES))
    start = int.from_bytes(hashlib.sha256(caption.encode()).digest()[:4], "big") % len(TEMPLATES)
    a = article(caption)
    return [TEMPLATES[(start + i) % len(TEMPLATES)].format(a=a, x=caption) for i in range(count)]
