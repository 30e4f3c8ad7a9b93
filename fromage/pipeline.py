"""`Fromage`: the user-facing API over a checkpoint, its tokenizer and an optional image index.

A prompt is a list whose items are text (`str`) or images (a PIL image, or a `pathlib.Path` to
an image file), in any order. `generate` answers with a list of text pieces and
`RetrievedImage`s; `stream` yields the same pieces as they are produced; `caption`, `retrieve`
and `score` cover captioning, prompt → images, and answer selection by log-likelihood.

    from pathlib import Path
    from fromage.pipeline import Fromage

    bot = Fromage.from_pretrained("runs/default/checkpoint", index="indexes/emoji-google")
    bot.generate(["show me a red apple"], ret_scale_factor=5.0, stop=("\\n",))
    bot.caption(Path("photo.jpg"))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
from PIL import Image

from .backbones import load_tokenizer
from .backbones.lm import WEIGHT_STORAGE
from .checkpoint import checkpoint_digest, resolve
from .data.digest import file_digest
from .data.images import load_image
from .embed import layout_prompt, ret_hidden_batch
from .generate import (
    CAPTION_TOKENS,
    GenerationConfig,
    LeanBatchDecoder,
    batch_decoder,
    decode,
    greedy_captions,
)
from .index.store import ImageIndex
from .model import FromageModel
from .scoring import candidate_logprobs
from .tokens import SpecialTokens

PromptItem: TypeAlias = "str | Image.Image | Path"


@dataclass
class RetrievedImage:
    path: str
    caption: str
    score: float
    row: int


@dataclass(frozen=True)
class Ending:
    """How an answer ended: `reason` as OpenAI's `finish_reason` says it ("stop": end of text or
    a stop string; "length": `max_new_tokens` reached), and the tokens decoded (`[RET]`s too)."""

    reason: str
    tokens: int


@dataclass
class EncodedPrompt:
    input_ids: torch.Tensor  # (1, T) with IMAGE_TOKEN_ID slots
    image_features: torch.Tensor | None  # (n, F)
    context_rows: set[int]  # index rows of the prompt's own images (never retrieved)


class Fromage:
    def __init__(
        self,
        model: FromageModel,
        tokenizer: Any,
        index: ImageIndex | None = None,
        generation: GenerationConfig | None = None,
    ):
        if model.encoder is None:
            raise ValueError("Fromage needs the model's image encoder (load it with load_encoder=True)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.special = SpecialTokens.from_tokenizer(tokenizer)
        self.index = index
        self.generation = generation or GenerationConfig()
        if index is not None:
            if index.manifest.dim != model.config.retrieval_dim:
                raise ValueError(
                    f"index has dimension {index.manifest.dim}, the model retrieves in {model.config.retrieval_dim}"
                )

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | Path,
        index: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        lm_weights: str = "int8",
        revision: str | None = None,
    ) -> Fromage:
        """`dtype` converts the whole frozen LM; `lm_weights` instead stores only its linear
        weights, activations staying float32, and for Llama-family LMs decodes with the lean
        fused step (backbones/fast_llama.py). "int8" (the default): int8 rows with a scale each
        (backbones/int8_weights.py), the fastest single stream (~1.5× bf16); the shipped model's
        R@1 and caption scores stay within ±0.02 of float32's and bf16's. "bfloat16": the
        better choice when many rows decode together (a server), where the bf16 product scales
        with rows and the int8 kernel does not. "float32": the exact Hugging Face model, slowest
        (BENCHMARKS.md, issue #17)."""
        if lm_weights not in WEIGHT_STORAGE:
            raise ValueError(f"lm_weights must be one of {', '.join(WEIGHT_STORAGE)}; got {lm_weights!r}")
        checkpoint = resolve(checkpoint, revision)  # a local directory, or a Hub id fetched once
        model = FromageModel.from_pretrained(checkpoint, device=device, dtype=dtype)
        model.lm.store_weights(lm_weights, model.config.ret_layer)
        loaded = None
        if index is not None:
            loaded = ImageIndex.load(index, checkpoint_digest=checkpoint_digest(checkpoint))
        return cls(model, load_tokenizer(model.config.lm), loaded)

    # ------------------------------------------------------------------ prompts

    def encode(self, prompt: Sequence[PromptItem]) -> EncodedPrompt:
        """`[BOS]` then each item: text tokens, or an image's k visual-token slots."""
        if isinstance(prompt, (str, Path, Image.Image)):
            prompt = [prompt]
        images: list[Image.Image] = []
        context: set[int] = set()
        for item in prompt:
            if isinstance(item, (Path, Image.Image)):
                images.append(load_image(item))  # names the file when it cannot be read
                if isinstance(item, Path) and self.index is not None:
                    row = self.index.row_of_digest(file_digest(item))
                    if row is not None:
                        context.add(row)
            elif not isinstance(item, str):
                raise TypeError(
                    f"prompt items are str (text), PIL images or pathlib.Path (image files); got {type(item).__name__}"
                )
        ids = self._layout(prompt)
        if len(ids) == 1:
            raise ValueError("the prompt has no text and no image")
        assert self.model.encoder is not None
        feats = self.model.encoder.encode(images) if images else None
        return EncodedPrompt(torch.tensor([ids]), feats, context)

    def _layout(self, prompt: Sequence[PromptItem]) -> list[int]:
        ids, _ = layout_prompt(
            prompt,
            lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"],
            self.special.bos,
            self.model.config.num_visual_tokens,
        )
        return ids

    def count_tokens(self, prompt: Sequence[PromptItem]) -> int:
        """The prompt's length in LM positions (`[BOS]`, text tokens, k slots per image), without
        reading or encoding its images."""
        return len(self._layout([prompt] if isinstance(prompt, (str, Path, Image.Image)) else prompt))

    @property
    def max_positions(self) -> int | None:
        """The LM's context length (prompt + answer), when its config says."""
        return self.model.lm.max_positions

    # ------------------------------------------------------------------ retrieval

    def _search(self, ret_hidden: torch.Tensor, k: int, exclude: set[int]) -> list[RetrievedImage]:
        if self.index is None:
            raise ValueError("retrieval needs an image index: Fromage.from_pretrained(..., index=DIR)")
        with torch.no_grad():
            query = self.model.text_embeddings(ret_hidden.reshape(1, -1)).cpu().numpy().astype(np.float32)
        scores, rows = self.index.search(query, k, exclude=exclude)
        return [
            RetrievedImage(
                self.index.metadata[r].get("path", ""),
                self.index.metadata[r].get("caption", ""),
                float(s),
                int(r),
            )
            for s, r in zip(scores[0], rows[0], strict=True)
            if r >= 0
        ]

    @torch.no_grad()
    def retrieve(self, prompt: Sequence[PromptItem], k: int = 3) -> list[RetrievedImage]:
        """Prompt (text, images or both) + `[RET]` → the k best images of the index."""
        return self.retrieve_batch([prompt], k)[0]

    @torch.no_grad()
    def retrieve_batch(
        self, prompts: Sequence[Sequence[PromptItem]], k: int = 3
    ) -> list[list[RetrievedImage]]:
        """`retrieve` for many prompts in one forward pass (left-padded batch)."""
        if self.index is None:
            raise ValueError("retrieval needs an image index: Fromage.from_pretrained(..., index=DIR)")
        encoded = [self.encode(p) for p in prompts]
        hidden = ret_hidden_batch(
            self.model,
            [e.input_ids[0].tolist() for e in encoded],
            [e.image_features for e in encoded],
            self.special.pad,
        )
        return [self._search(hidden[i], k, e.context_rows) for i, e in enumerate(encoded)]

    # ------------------------------------------------------------------ generation

    def _config(self, overrides: dict[str, Any]) -> GenerationConfig:
        config = dataclasses.replace(self.generation, **overrides)
        if self.index is None:
            config = dataclasses.replace(config, max_rets=0)  # nothing to retrieve from
        return config

    def stream(
        self,
        prompt: Sequence[PromptItem],
        seed: int | None = None,
        exclude: Iterable[int] = (),
        **overrides: Any,
    ) -> Generator[str | list[RetrievedImage], None, Ending]:
        """Yield text pieces as they are decoded and, at each `[RET]`, the retrieved images
        (never the prompt's own images, nor index rows in `exclude`). `overrides` are
        `GenerationConfig` fields (max_new_tokens, temperature, top_p, stop, …). The generator
        returns how the answer ended (`Ending`)."""
        config = self._config(overrides)
        enc = self.encode(prompt)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        text = _AnswerText(self.tokenizer, config.stop)
        exclude = set(enc.context_rows) | set(exclude)
        steps = 0
        for step in decode(self.model, enc.input_ids, enc.image_features, self.special, config, generator):
            steps += 1
            if step.ret_hidden is None:
                piece, stopped = text.add(step.token_id)
                if piece:
                    yield piece
                if stopped:
                    return Ending("stop", steps)
                continue
            rest = text.flush()
            if rest:
                yield rest
            found = self._search(step.ret_hidden, config.images_per_ret, exclude)
            exclude |= {img.row for img in found}  # one image is not shown twice in an answer
            yield found
        rest = text.flush()
        if rest:
            yield rest
        return Ending("length" if steps >= config.max_new_tokens else "stop", steps)

    def stream_batch(
        self,
        prompts: Sequence[Sequence[PromptItem]],
        seeds: Sequence[int | None] | None = None,
        excludes: Sequence[Iterable[int]] | None = None,
        **overrides: Any,
    ) -> Iterator[tuple[int, str | list[RetrievedImage] | Ending]]:
        """`stream` for many prompts decoded together (one forward per step, `AnswerBatch`):
        yields `(row, piece)` as each row's text and images arrive, and `(row, Ending)` once per
        row when it ends. Each row gets exactly what `stream` gives it alone (same seed)."""
        batch = AnswerBatch(self)
        handles = batch.add(prompts, seeds, excludes, **overrides)
        row_of = {h: i for i, h in enumerate(handles)}
        while batch.running:
            for handle, piece in batch.step():
                yield row_of[handle], piece

    def generate(
        self, prompt: Sequence[PromptItem], seed: int | None = None, **overrides: Any
    ) -> list[str | RetrievedImage]:
        """The answer as a list: text pieces (merged) and retrieved images, in order."""
        return self.complete(prompt, seed, **overrides)[0]

    def complete(
        self, prompt: Sequence[PromptItem], seed: int | None = None, **overrides: Any
    ) -> tuple[list[str | RetrievedImage], Ending]:
        """`generate`'s answer and how it ended (see `stream`)."""
        out: list[str | RetrievedImage] = []
        pieces = self.stream(prompt, seed, **overrides)
        while True:
            try:
                piece = next(pieces)
            except StopIteration as end:
                return out, end.value
            add_piece(out, piece)

    def generate_batch(
        self, prompts: Sequence[Sequence[PromptItem]], seed: int | None = None, **overrides: Any
    ) -> list[list[str | RetrievedImage]]:
        """`generate` for each prompt, decoded together (`stream_batch`); every row is seeded
        with `seed`, so each answer is what `generate(prompt, seed)` gives."""
        out: list[list[str | RetrievedImage]] = [[] for _ in prompts]
        for row, piece in self.stream_batch(prompts, [seed] * len(prompts), **overrides):
            if isinstance(piece, Ending):
                continue
            add_piece(out[row], piece)
        return out

    @torch.no_grad()
    def caption(
        self, image: Image.Image | Path, max_new_tokens: int = CAPTION_TOKENS, min_new_tokens: int = 0
    ) -> str:
        """Greedy caption of one image (`[RET]` never allowed; no EOS before `min_new_tokens`)."""
        return self.caption_batch([image], max_new_tokens, min_new_tokens)[0]

    @torch.no_grad()
    def caption_batch(
        self,
        images: Sequence[Image.Image | Path],
        max_new_tokens: int = CAPTION_TOKENS,
        min_new_tokens: int = 0,
    ) -> list[str]:
        """Greedy captions of many images, decoded together."""
        if not images:
            return []
        assert self.model.encoder is not None
        feats = self.model.encoder.encode([load_image(i) for i in images])
        ids = greedy_captions(self.model, feats, self.special, max_new_tokens, min_new_tokens=min_new_tokens)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    @torch.no_grad()
    def score(self, prompt: Sequence[PromptItem], candidates: Sequence[str]) -> list[float]:
        """Log-likelihood of each candidate continuation given the prompt (answer selection),
        with the causal shift done right (scoring.py). The prompt runs once for all candidates."""
        enc = self.encode(prompt)
        tokens = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in candidates]
        for text, ids in zip(candidates, tokens, strict=True):
            if not ids:
                raise ValueError(f"candidate {text!r} has no tokens")
        return candidate_logprobs(self.model, enc.input_ids, enc.image_features, tokens).tolist()


class AnswerBatch:
    """Answers decoded together that join and leave between steps (a server's concurrent
    chats): `add` a prompt, call `step` until `running` is 0; each step gives every row's new
    text, its images at a `[RET]`, and an `Ending` once per row. A row gets exactly what
    `Fromage.stream` gives it alone with the same seed (`BatchDecoder`)."""

    def __init__(self, bot: Fromage):
        self.bot = bot
        self.decoder = batch_decoder(bot.model, bot.special)
        self._rows: dict[int, _AnswerRow] = {}
        self._reads: dict[int, tuple[int, set[int]]] = {}  # handle → (k, rows not to return)

    @property
    def running(self) -> int:
        return self.decoder.running

    def add(
        self,
        prompts: Sequence[Sequence[PromptItem]],
        seeds: Sequence[int | None] | None = None,
        excludes: Sequence[Iterable[int]] | None = None,
        **overrides: Any,
    ) -> list[int]:
        """Encode and prefill prompts (one `GenerationConfig` override set for all); → handles."""
        config = self.bot._config(overrides)
        encoded = [self.bot.encode(p) for p in prompts]
        seeds = list(seeds) if seeds is not None else [None] * len(prompts)
        gens = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
        handles = self.decoder.add(
            [e.input_ids[0].tolist() for e in encoded],
            [e.image_features for e in encoded],
            [config] * len(prompts),
            gens,
        )
        extra = list(excludes) if excludes is not None else [()] * len(prompts)
        for handle, enc, more in zip(handles, encoded, extra, strict=True):
            exclude = set(enc.context_rows) | set(more)
            self._rows[handle] = _AnswerRow(config, _AnswerText(self.bot.tokenizer, config.stop), exclude)
        return handles

    @staticmethod
    def reads(bot: Fromage) -> bool:
        """Whether an `AnswerBatch` of `bot` runs retrievals inside its decoding steps (`read`):
        on the lean batch decoder, with an index to search."""
        return bot.model.lm.stepper is not None and bot.index is not None

    def read(self, prompts: Sequence[Sequence[PromptItem]], ks: Sequence[int]) -> list[int]:
        """Retrievals (`Fromage.retrieve`) that run in the next step's forward with the rows
        being decoded; each one's top `ks[i]` images come out of that `step` as
        (handle, list[RetrievedImage]). Needs `AnswerBatch.reads(bot)`."""
        if not isinstance(self.decoder, LeanBatchDecoder) or self.bot.index is None:
            raise ValueError("reading in the decoding steps needs the lean batch decoder and an index")
        encoded = [self.bot.encode(p) for p in prompts]
        handles = self.decoder.read(
            [e.input_ids[0].tolist() for e in encoded], [e.image_features for e in encoded]
        )
        for handle, enc, k in zip(handles, encoded, ks, strict=True):
            self._reads[handle] = (k, set(enc.context_rows))
        return handles

    def cancel(self, handle: int) -> None:
        """Stop decoding a row now (its client left); it yields nothing more."""
        self.decoder.end(handle)
        self._rows.pop(handle, None)

    def step(self) -> list[tuple[int, str | list[RetrievedImage] | Ending]]:
        steps, ended = self.decoder.step()
        out: list[tuple[int, str | list[RetrievedImage] | Ending]] = []
        for handle, step in steps:
            row = self._rows[handle]
            row.steps += 1
            if step.ret_hidden is None:
                piece, stopped = row.text.add(step.token_id)
                if piece:
                    out.append((handle, piece))
                if stopped:
                    self.decoder.end(handle)
                    del self._rows[handle]
                    out.append((handle, Ending("stop", row.steps)))
                continue
            rest = row.text.flush()
            if rest:
                out.append((handle, rest))
            found = self.bot._search(step.ret_hidden, row.config.images_per_ret, row.exclude)
            row.exclude |= {img.row for img in found}  # one image is not shown twice in an answer
            out.append((handle, found))
        for handle in ended:
            ending_row = self._rows.pop(handle, None)
            if ending_row is None:  # its stop string ended it at this very step
                continue
            row = ending_row
            rest = row.text.flush()
            if rest:
                out.append((handle, rest))
            reason = "length" if row.steps >= row.config.max_new_tokens else "stop"
            out.append((handle, Ending(reason, row.steps)))
        if isinstance(self.decoder, LeanBatchDecoder):
            states, self.decoder.states = self.decoder.states, {}  # taken even if a search fails
            for handle, state in states.items():
                k, exclude = self._reads.pop(handle)
                out.append((handle, self.bot._search(state, k, exclude)))
        return out


@dataclass
class _AnswerRow:
    config: GenerationConfig
    text: _AnswerText
    exclude: set[int]
    steps: int = 0


class _AnswerText:
    """One answer's tokens → the text to show as they arrive: half a character waits for the
    rest, and a tail that could grow into a stop string is held back (`split_at_stop`)."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.pending: list[int] = []  # tokens of the text since the last [RET]
        self.shown = ""  # the part of their text already given out

    def add(self, token_id: int) -> tuple[str, bool]:
        """→ (new text to show, whether a stop string has appeared)."""
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half a character: wait for the rest
            return "", False
        safe, stopped = split_at_stop(text, self.stops)
        if len(safe) <= len(self.shown):
            return "", stopped
        piece, self.shown = safe[len(self.shown) :], safe
        return piece, stopped

    def flush(self) -> str:
        """The text not shown yet (at a `[RET]` or the end); a new run of text starts after."""
        text = self.tokenizer.decode(self.pending, skip_special_tokens=True) if self.pending else ""
        rest = text[len(self.shown) :]
        self.pending, self.shown = [], ""
        return rest


def add_piece(answer: list[Any], piece: str | list[RetrievedImage]) -> None:
    """Grow an answer by one streamed piece: text joins the text before it, images follow."""
    if isinstance(piece, str) and answer and isinstance(answer[-1], str):
        answer[-1] += piece
    elif isinstance(piece, str):
        answer.append(piece)
    else:
        answer.extend(piece)


def split_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(the part of `text` that is safe to show, whether a stop string occurs in it).
    Without a stop, a tail that could still grow into one is held back."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    if found:
        return text[: min(found)], True
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return text[: len(text) - hold], False
