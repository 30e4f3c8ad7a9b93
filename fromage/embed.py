"""The one home of embeddings: `[RET]` states, text and image embeddings, and prompt layout.

Everything that turns text, prompts or image features into vectors goes through here, for
training (prefix states), validation, evaluation, indexing and the pipeline alike:

- `layout_prompt`: `[BOS]` + each piece's tokens or k image slots (the one prompt layout).
- `padded_forward` / `ret_hidden_batch`: left-padded prompts (+ `[RET]`) through the model in
  one pass; → the `[RET]` state of each row.
- `prompt_states`: prompts → (Q, d) `[RET]` states, or (Q, R) retrieval vectors, batched in
  length order.
- `fill_states` / `embed_texts`: token lists → `[RET]` states / retrieval vectors, with a cache
  of states that stays valid while `[RET]` is unchanged.
- `embed_images`: (N, F) image features → (N, R) retrieval vectors.
- `ret_states`: precomputed frozen prefixes (training) → `[RET]` states.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from .model import FromageModel, TextPrefix
from .tokens import IMAGE_TOKEN_ID, SpecialTokens, left_pad

StateCache = dict[tuple[int, ...], torch.Tensor]
"""Token ids of a text → its (d,) hidden state at `[RET]`. Valid while `[RET]` is unchanged."""


class PrefixSource(Protocol):
    """Rows of frozen retrieval-pass prefixes: a precomputed `TextPrefix` table, or
    `training.prefixes.OnTheFlyPrefixes` computing them when asked."""

    def __len__(self) -> int: ...

    def select(self, rows: torch.Tensor) -> TextPrefix: ...


# ---------------------------------------------------------------------- prompt layout


def layout_prompt(
    pieces: Sequence[Any], tokenize: Callable[[str], list[int]], bos: int, k: int
) -> tuple[list[int], list[int]]:
    """`[BOS]` then each piece: a str's tokens, anything else (an image) k visual-token slots.
    → (ids, indices of the image pieces in prompt order). Callers check piece types first."""
    ids = [bos]
    images = []
    for i, piece in enumerate(pieces):
        if isinstance(piece, str):
            ids += tokenize(piece)
        else:
            ids += [IMAGE_TOKEN_ID] * k
            images.append(i)
    return ids, images


# ---------------------------------------------------------------------- prompts → [RET] states


def padded_forward(
    model: FromageModel,
    rows: Sequence[Sequence[int]],
    features: Sequence[torch.Tensor | None],
    pad_id: int,
    use_cache: bool = False,
) -> tuple[Any, torch.Tensor]:
    """One forward pass over left-padded prompts; → (model output, (B, T) attention mask).
    features[i] is (n_i, F) for row i's n_i image slots, or None."""
    device = model.ret_embedding.device
    ids, mask = left_pad(rows, pad_id)
    feats = [f for f in features if f is not None and f.shape[0]]
    out = model(
        ids.to(device),
        attention_mask=mask.to(device),
        image_features=torch.cat(feats).to(device) if feats else None,
        position_ids=(mask.cumsum(1) - 1).clamp(min=0).to(device),
        use_cache=use_cache,
        compute_logits=False,
    )
    return out, mask


@torch.no_grad()
def ret_hidden_batch(
    model: FromageModel,
    rows: Sequence[Sequence[int]],
    features: Sequence[torch.Tensor | None],
    pad_id: int,
) -> torch.Tensor:
    """rows: token ids per prompt (image slots included, no `[RET]`); features: (n_i, F) per
    prompt for its n_i image slots, or None. → (B, d) `[RET]` states (model.config.ret_layer)."""
    if len(rows) != len(features):
        raise ValueError(f"{len(rows)} prompts but {len(features)} feature entries")
    if not rows:
        return torch.empty(0, model.config.hidden_size)
    out, _ = padded_forward(model, [[*r, model.ret_token_id] for r in rows], features, pad_id)
    return out.ret_hidden[:, -1].float()


@torch.no_grad()
def prompt_states(
    model: FromageModel,
    rows: Sequence[Sequence[int]],
    features: Sequence[torch.Tensor | None],
    pad_id: int,
    batch_size: int = 32,
    desc: str | None = None,
    embed: bool = False,
) -> torch.Tensor:
    """Prompts + `[RET]` → (Q, d) `[RET]` states, or (Q, R) retrieval vectors when `embed`,
    run in length order so little compute goes to padding (a progress bar when `desc` is given)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = torch.empty(len(rows), model.config.retrieval_dim if embed else model.config.hidden_size)
    bar = tqdm(total=len(rows), desc=desc, unit="query", leave=False, disable=desc is None)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        hidden = ret_hidden_batch(model, [rows[i] for i in chunk], [features[i] for i in chunk], pad_id)
        out[torch.tensor(chunk)] = (model.text_embeddings(hidden) if embed else hidden).float().cpu()
        bar.update(len(chunk))
    bar.close()
    return out


# ---------------------------------------------------------------------- texts and images


@torch.no_grad()
def fill_states(
    model: FromageModel,
    texts: Sequence[list[int]],
    special: SpecialTokens,
    states: StateCache,
    batch_size: int = 256,
) -> StateCache:
    """Add the `[RET]` state of `[BOS] text [RET]` for each text not yet in `states`.
    Texts run in length order so little compute goes to padding."""
    todo = sorted(dict.fromkeys(tuple(t) for t in texts if tuple(t) not in states), key=len)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        rows = [[special.bos, *t] for t in chunk]
        hidden = ret_hidden_batch(model, rows, [None] * len(rows), special.pad).cpu()
        states.update(zip(chunk, hidden, strict=True))
    return states


@torch.no_grad()
def embed_texts(
    model: FromageModel,
    texts: Sequence[list[int]],
    special: SpecialTokens,
    batch_size: int = 256,
    states: StateCache | None = None,
) -> torch.Tensor:
    """Token lists → (N, R) retrieval embeddings of `[BOS] text [RET]`. Texts found in
    `states` skip the LM; the others are computed and added to it."""
    device = model.ret_embedding.device
    states = fill_states(model, texts, special, {} if states is None else states, batch_size)
    if not texts:
        return torch.empty(0, model.config.retrieval_dim)
    hidden = torch.stack([states[tuple(t)] for t in texts])
    return torch.cat(
        [model.text_embeddings(hidden[s : s + 1024].to(device)).cpu() for s in range(0, len(texts), 1024)]
    )


@torch.no_grad()
def embed_images(model: FromageModel, features: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """(N, F) pooled image features → (N, R) unit vectors in the retrieval space (float32)."""
    device = model.ret_embedding.device
    parts = [
        model.image_embeddings(features[s : s + batch_size].to(device)).float().cpu()
        for s in range(0, len(features), batch_size)
    ]
    return torch.cat(parts) if parts else torch.empty(0, model.config.retrieval_dim)


# ---------------------------------------------------------------------- training prefixes


@torch.no_grad()
def ret_states(model: FromageModel, prefixes: PrefixSource, chunk: int = 256) -> torch.Tensor:
    """(T, d) hidden state at `[RET]` (model.config.ret_layer) for each frozen text prefix."""
    n = len(prefixes)
    parts = [
        model.retrieval_from_prefix(prefixes.select(torch.arange(s, min(s + chunk, n)))).ret_hidden
        for s in range(0, n, chunk)
    ]
    return torch.cat(parts).float()
