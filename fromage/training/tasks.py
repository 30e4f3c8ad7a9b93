"""The ship recipe's retrieval-pass contexts: prompts that end in a request, drawn fresh each
step, so that `[RET]` reads the last request *in context* instead of a lone caption.

Each `Query` is a prompt (text pieces and training images) and the training image it should
retrieve. Kinds (shares in `TaskMix`):

- `request`: one request sentence, in a training template, naming the concept by its name or
  a shortcode ("can you show me an apple?");
- `dialogue`: easy-VQA rounds whose answers settle the image, negations included;
- `story`: four `caption. [image]` pairs of an emoji family and the fifth name without the
  family word (families split: the offline benchmark scores the others);
- `category`: two images of one category and "show me another fruit";
- `chat`: earlier turns in the chat format (a described image, or a request answered with its
  image), then a request: unrelated to them, or referring to them ("show me another animal").

Text appears as apps/chat.py writes conversations: turns joined by "\\n", retrieved images fed
back as images. Request templates held out for evaluation (data/requests.py) never appear here.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from ..config import TaskMix
from ..data.builtin import emoji_concepts, is_story_training_family
from ..data.dialogues import determining_dialogue
from ..data.emoji_styles import code_key
from ..data.emoji_words import emoji_words
from ..data.examples import Example
from ..data.requests import TRAINING_TEMPLATES, article

log = logging.getLogger(__name__)

Piece = str | int
"""Text, or the training-example row of an image."""

CATEGORY_WORDS = {
    "animal-mammal": "animal",
    "animal-bird": "bird",
    "animal-marine": "sea animal",
    "animal-bug": "bug",
    "animal-reptile": "reptile",
    "plant-flower": "flower",
    "plant-other": "plant",
    "food-fruit": "fruit",
    "food-vegetable": "vegetable",
    "food-prepared": "dish",
    "food-asian": "dish",
    "food-sweet": "sweet",
    "drink": "drink",
    "transport-ground": "vehicle",
    "transport-air": "aircraft",
    "transport-water": "boat",
    "musical-instrument": "instrument",
    "heart": "heart",
    "clothing": "piece of clothing",
    "sport": "sport",
    "game": "game",
    "country-flag": "flag",
    "sky & weather": "weather symbol",
    "tool": "tool",
    "place-building": "building",
    "face-smiling": "smiley",
    "face-concerned": "worried face",
    "person-sport": "athlete",
    "person-role": "person",
    "zodiac": "zodiac sign",
    "computer": "computer thing",
    "office": "office thing",
    "household": "household thing",
}
"""Subcategories that a person would name with one word, and that word."""

DESCRIBE = ("Describe this.", "What is this?", "What do you see?", "Describe this image.")
ANOTHER = ("show me another {w}", "another {w}, please", "can you show me another {w}?", "one more {w}")


@dataclass(frozen=True)
class Query:
    pieces: tuple[Piece, ...]
    target: int
    kind: str


class TaskSampler:
    """Draws queries over the training examples (rows of the training split)."""

    def __init__(self, examples: list[Example], mix: TaskMix):
        self.examples, self.mix = examples, mix
        self.named = [i for i, e in enumerate(examples) if e.caption]
        self.emoji = [i for i, e in enumerate(examples) if e.source.startswith("emoji")]
        self.easyvqa = [i for i, e in enumerate(examples) if e.qa]
        self.rows_of: dict[str, list[int]] = {}
        for i in self.named:
            self.rows_of.setdefault(examples[i].caption, []).append(i)
        self.aliases: dict[str, tuple[str, ...]] = {}
        self.by_category: dict[str, list[int]] = {}
        families: dict[str, set[str]] = {}
        concepts = {c.name: c for c in emoji_concepts("google")} if self.emoji else {}
        words = emoji_words() if self.emoji else {}
        for i in self.emoji:
            name = examples[i].caption
            concept = concepts.get(name)
            if concept is None:
                continue
            known = words.get(code_key(Path(concept.image).stem))
            self.aliases[name] = known.shortcodes if known else ()
            if concept.subcategory in CATEGORY_WORDS:
                self.by_category.setdefault(concept.subcategory, []).append(i)
            parts = name.split()
            if len(parts) >= 2 and is_story_training_family(parts[-1]):
                families.setdefault(parts[-1], set()).add(name)
        self.families = {w: sorted(n) for w, n in families.items() if len(n) >= 5}
        self.categories = {
            sub: sorted({examples[r].caption for r in rows})
            for sub, rows in self.by_category.items()
            if len({examples[r].caption for r in rows}) >= 3
        }
        """Subcategory → its concept names (at least three)."""
        self.category_of = {
            r: sub for sub, rows in self.by_category.items() if sub in self.categories for r in rows
        }
        available = {
            "request": bool(self.named),
            "chat": bool(self.named),
            "dialogue": bool(self.easyvqa),
            "story": bool(self.families),
            "category": bool(self.categories),
        }
        wanted = [k for k in ("request", "dialogue", "story", "category", "chat") if getattr(mix, k) > 0]
        missing = [k for k in wanted if not available[k]]
        if missing:
            log.warning(
                "task mix: no training data for %s; those shares go to the others", ", ".join(missing)
            )
        self.kinds = [k for k in wanted if available[k]]
        if not self.kinds:
            raise ValueError(
                f"the task mix wants {', '.join(wanted)} but the training data supports none of them"
            )
        self.weights = [getattr(mix, k) for k in self.kinds]

    # ------------------------------------------------------------------ pieces

    def _request(self, row: int, rng: random.Random) -> str:
        name = self.examples[row].caption
        aliases = self.aliases.get(name, ())
        if aliases and rng.random() < self.mix.alias_share:
            name = rng.choice(aliases)
        return rng.choice(TRAINING_TEMPLATES).format(a=article(name), x=name)

    def _image_of(self, name: str, rng: random.Random) -> int:
        """A training row of the concept, in any of its styles."""
        return rng.choice(self.rows_of[name])

    # ------------------------------------------------------------------ kinds

    def request(self, rng: random.Random) -> Query:
        row = rng.choice(self.named)
        return Query((self._request(row, rng),), row, "request")

    def dialogue(self, rng: random.Random) -> Query:
        for _ in range(20):
            row = rng.choice(self.easyvqa)
            found = determining_dialogue(self.examples[row].qa, rng)
            if found is not None:
                return Query((found.text(),), row, "dialogue")
        return self.request(rng)

    def story(self, rng: random.Random) -> Query:
        if not self.families:
            return self.request(rng)
        word = rng.choice(sorted(self.families))
        names = rng.sample(self.families[word], 5)
        pieces: list[Piece] = []
        for name in names[:4]:
            pieces += [f"{name}.", self._image_of(name, rng)]
        pieces.append(" ".join(w for w in names[4].split() if w != word))
        return Query(tuple(pieces), self._image_of(names[4], rng), "story")

    def category(self, rng: random.Random) -> Query:
        if not self.categories:
            return self.request(rng)
        sub = rng.choice(sorted(self.categories))
        a, b, c = rng.sample(self.categories[sub], 3)
        ask = rng.choice(ANOTHER).format(w=CATEGORY_WORDS[sub])
        pieces: tuple[Piece, ...] = (self._image_of(a, rng), "and", self._image_of(b, rng), ask)
        return Query(pieces, self._image_of(c, rng), "category")

    def chat(self, rng: random.Random) -> Query:
        """One or two earlier exchanges, then the request."""
        history: list[Piece] = []
        for _ in range(rng.choice((1, 1, 2))):
            if history:
                history.append("\n")
            row = rng.choice(self.named)
            if rng.random() < 0.5:  # the user showed an image and the model described it
                history += [row, rng.choice(DESCRIBE), "\n", f"{self.examples[row].caption}."]
            else:  # the user asked and the model answered with the image
                history += [self._request(row, rng), "\n", row]
        last = history[-1]
        subcategory = self.category_of.get(last) if isinstance(last, int) else None
        if isinstance(last, int) and subcategory is not None and rng.random() < self.mix.refer_share:
            # A request that refers to the previous answer: "show me another animal".
            choices = [n for n in self.categories[subcategory] if n != self.examples[last].caption]
            target = self._image_of(rng.choice(choices), rng)
            ask = rng.choice(ANOTHER).format(w=CATEGORY_WORDS[subcategory])
        else:
            target = rng.choice(self.named)
            ask = self._request(target, rng)
        return Query((*history, "\n", ask), target, "chat")

    def draw(self, n: int, rng: random.Random) -> list[Query]:
        kinds = rng.choices(self.kinds, weights=self.weights, k=n)
        return [getattr(self, kind)(rng) for kind in kinds]
