"""The model-side operations every benchmark needs, batched and cached.

A benchmark prompt is a list of text pieces and *encoded* images (a (F,) feature row): images
are encoded once per benchmark, through the same on-disk feature cache training uses, however
many prompts they appear in. `Evaluator` turns prompts into retrieval embeddings (the `[RET]`
state mapped to the retrieval space) and scores candidate answers by log-likelihood.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..backbones import load_tokenizer
from ..data.dataset import extract_features
from ..data.examples import Example
from ..data.readers import BadInputLog
from ..embed import embed_images, layout_prompt, prompt_states
from ..generate import greedy_captions
from ..model import FromageModel
from ..scoring import candidate_logprobs, shared_candidate_logprobs
from ..tokens import SpecialTokens

Prompt: TypeAlias = Sequence["str | torch.Tensor"]
"""Text pieces and (F,) image features, in order. `[BOS]` goes first; `[RET]` is appended."""


@dataclass
class EncodedImages:
    features: torch.Tensor
    """(N, F) one row per readable image, in the order of `paths`."""
    paths: list[str]
    unreadable: list[str] = field(default_factory=list)


class Evaluator:
    def __init__(self, model: FromageModel, tokenizer: Any, batch_size: int = 32, progress: bool = True):
        if model.encoder is None:
            raise ValueError("evaluation needs the model's image encoder (load it with load_encoder=True)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.special = SpecialTokens.from_tokenizer(tokenizer)
        self.batch_size = batch_size
        self.progress = progress
        self._token_cache: dict[str, list[int]] = {}

    @classmethod
    def load(
        cls, checkpoint: str | Path, device: str = "cpu", lm_weights: str = "float32", **kwargs: Any
    ) -> Evaluator:
        """float32 by default: benchmark numbers should not depend on a speed setting.
        `lm_weights` ("bfloat16", "int8") measures the model as the chat and the server run it
        with that storage of the frozen LM's linear weights (`FrozenLM.store_weights`)."""
        model = FromageModel.from_pretrained(checkpoint, device=device)
        model.lm.store_weights(lm_weights, model.config.ret_layer)
        return cls(model, load_tokenizer(model.config.lm), **kwargs)

    # ------------------------------------------------------------------ images

    def encode_images(self, paths: Sequence[str | Path], desc: str = "images") -> EncodedImages:
        """Pooled features of each image, computed once and cached on disk. Unreadable images
        are listed, not dropped silently: callers count what they skip."""
        assert self.model.encoder is not None
        unique = list(dict.fromkeys(str(p) for p in paths))
        bad = BadInputLog()
        split = extract_features([Example(p, "", "eval") for p in unique], self.model.encoder, bad, desc=desc)
        kept = [e.image for e in split.examples]
        missing = sorted(set(unique) - set(kept))
        return EncodedImages(split.features[0], kept, missing)

    @torch.no_grad()
    def image_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """(N, F) → (N, R) unit vectors in the retrieval space."""
        return embed_images(self.model, features)

    # ------------------------------------------------------------------ prompts

    def tokens(self, text: str) -> list[int]:
        ids = self._token_cache.get(text)
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self._token_cache[text] = ids
        return list(ids)

    def layout(self, prompt: Prompt) -> tuple[list[int], torch.Tensor | None]:
        """`[BOS]` + each piece: its tokens, or k image slots. → (ids, (n, F) features or None)."""
        for piece in prompt:
            if not (isinstance(piece, str) or (isinstance(piece, torch.Tensor) and piece.dim() == 1)):
                raise TypeError(f"prompt pieces are str or (F,) feature tensors, got {type(piece).__name__}")
        k = self.model.config.num_visual_tokens
        ids, images = layout_prompt(prompt, self.tokens, self.special.bos, k)
        return ids, torch.stack([prompt[i] for i in images]) if images else None  # type: ignore[misc]

    @torch.no_grad()
    def query_embeddings(self, prompts: Sequence[Prompt], desc: str = "queries") -> torch.Tensor:
        """Prompt + `[RET]` → (Q, R) unit vectors; batched in length order."""
        laid = [self.layout(p) for p in prompts]
        return prompt_states(
            self.model,
            [ids for ids, _ in laid],
            [feats for _, feats in laid],
            self.special.pad,
            self.batch_size,
            desc if self.progress else None,
            embed=True,
        )

    @torch.no_grad()
    def shared_answer_scores(
        self, prompts: Sequence[Prompt], candidates: Sequence[str], desc: str = "answers"
    ) -> torch.Tensor:
        """(P, C) log-likelihood of each of one candidate list after each prompt, prompts
        batched in length order (a fixed answer vocabulary: easy-VQA's 13 answers)."""
        laid = [self.layout(p) for p in prompts]
        tokens = [self.tokens(c) for c in candidates]
        order = sorted(range(len(laid)), key=lambda i: len(laid[i][0]))
        out = torch.empty(len(laid), len(candidates))
        bar = tqdm(total=len(laid), desc=desc, unit="prompt", leave=False, disable=not self.progress)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            out[torch.tensor(rows)] = shared_candidate_logprobs(
                self.model, [laid[i][0] for i in rows], [laid[i][1] for i in rows], tokens, self.special.pad
            )
            bar.update(len(rows))
        bar.close()
        return out

    @torch.no_grad()
    def captions(self, features: torch.Tensor, desc: str = "captions") -> list[str]:
        """(N, F) image features → N greedy captions (`[img][BOS]` → text until EOS)."""
        out: list[str] = []
        bar = tqdm(total=len(features), desc=desc, unit="image", leave=False, disable=not self.progress)
        for start in range(0, len(features), self.batch_size):
            ids = greedy_captions(self.model, features[start : start + self.batch_size], self.special)
            out += self.tokenizer.batch_decode(ids, skip_special_tokens=True)
            bar.update(len(ids))
        bar.close()
        return out

    @torch.no_grad()
    def answer_scores(self, prompt: Prompt, candidates: Sequence[str]) -> torch.Tensor:
        """(C,) log-likelihood of each candidate continuing the prompt (shift done right)."""
        ids, feats = self.layout(prompt)
        tokens = [self.tokens(c) for c in candidates]
        return candidate_logprobs(self.model, torch.tensor([ids]), feats, tokens)


def cosine_scores(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """(Q, D) × (N, D) → (Q, N) cosine similarities (inputs need not be normalised)."""
    return F.normalize(queries.float(), dim=-1) @ F.normalize(gallery.float(), dim=-1).T
