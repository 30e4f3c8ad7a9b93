"""Prompt-level computations on many prompts or candidates at once.

- `candidate_logprobs`: log-likelihood of each candidate continuation of one prompt (answer
  selection). The prompt runs once; every candidate continues from its keys/values, and a
  candidate's first token is read straight off the prompt's last position.
- `shared_candidate_logprobs`: the same for many prompts that share one candidate list (a
  fixed answer vocabulary), the prompts run as one left-padded batch.
Both are tested against `candidate_logprobs_naive`, which runs prompt + candidate from scratch
for each candidate.

Position t predicts token t+1: a candidate's tokens are scored from the positions just before
them (DESIGN §6: the published VisDial code compared logits and labels without this shift).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .embed import padded_forward
from .model import FromageModel


def _copy_cache(cache: Any, rows: int = 0) -> Any:
    """A fresh cache over the same keys/values (repeated to `rows` rows when given); `update`
    concatenates into new tensors, so the original stays intact for the next candidate."""
    from transformers import DynamicCache

    out = DynamicCache()
    for layer, kv in enumerate(cache.layers):
        keys, values = kv.keys, kv.values
        if rows:
            keys = keys.expand(rows, -1, -1, -1).contiguous()
            values = values.expand(rows, -1, -1, -1).contiguous()
        out.update(keys, values, layer)
    return out


def _check_candidates(candidates: Sequence[Sequence[int]]) -> None:
    for i, cand in enumerate(candidates):
        if not cand:
            raise ValueError(f"candidate {i} has no tokens")


@torch.no_grad()
def candidate_logprobs(
    model: FromageModel,
    prompt_ids: torch.Tensor,
    features: torch.Tensor | None,
    candidates: Sequence[Sequence[int]],
) -> torch.Tensor:
    """prompt_ids (1, T) with image slots filled from features (n, F); candidates: token ids.
    → (C,) summed log-probability of each candidate after the prompt."""
    _check_candidates(candidates)
    device = model.ret_embedding.device
    out = model(
        prompt_ids.to(device),
        image_features=None if features is None else features.to(device),
        use_cache=True,
        compute_logits=False,
    )
    first = torch.log_softmax(model.full_logits(out.last_hidden[0, -1]).float(), -1)  # (V+1,)
    scores = torch.tensor([float(first[c[0]]) for c in candidates])
    longer = [i for i, c in enumerate(candidates) if len(c) > 1]
    if not longer:
        return scores
    # Tokens 1.. of each longer candidate, predicted from inputs c[0..n-2] on top of the prompt.
    inputs = [list(candidates[i][:-1]) for i in longer]
    width = max(len(x) for x in inputs)
    ids = torch.zeros((len(longer), width), dtype=torch.long)
    keep = torch.zeros((len(longer), width), dtype=torch.bool)
    targets = torch.zeros((len(longer), width), dtype=torch.long)
    for row, i in enumerate(longer):
        n = len(candidates[i]) - 1
        ids[row, :n] = torch.tensor(inputs[row])
        targets[row, :n] = torch.tensor(candidates[i][1:])
        keep[row, :n] = True
    prompt_len = prompt_ids.shape[1]
    cache = _copy_cache(out.cache, len(longer))
    # Right padding: a real token never attends to the pads after it, so no mask is needed.
    step = model(
        ids.to(device),
        cache=cache,
        use_cache=True,
        compute_logits=False,
        position_ids=(prompt_len + torch.arange(width)).expand(len(longer), -1).to(device),
    )
    logp = torch.log_softmax(model.full_logits(step.last_hidden).float(), -1).cpu()  # (L, W, V+1)
    gathered = logp.gather(2, targets[..., None])[..., 0].masked_fill(~keep, 0.0).sum(1)
    scores[torch.tensor(longer)] += gathered
    return scores


@torch.no_grad()
def shared_candidate_logprobs(
    model: FromageModel,
    rows: Sequence[Sequence[int]],
    features: Sequence[torch.Tensor | None],
    candidates: Sequence[Sequence[int]],
    pad_id: int,
) -> torch.Tensor:
    """Prompts (token ids with image slots; (n_i, F) features or None each) that share one
    candidate list → (B, C) log-likelihoods. One left-padded pass over the prompts; then one
    short pass per candidate longer than a token, on a copy of the prompts' keys/values."""
    _check_candidates(candidates)
    if len(rows) != len(features):
        raise ValueError(f"{len(rows)} prompts but {len(features)} feature entries")
    device = model.ret_embedding.device
    out, mask = padded_forward(model, rows, features, pad_id, use_cache=True)
    first = torch.log_softmax(model.full_logits(out.last_hidden[:, -1]).float(), -1).cpu()  # (B, V+1)
    scores = first[:, [c[0] for c in candidates]].clone()  # (B, C)
    lengths = mask.sum(1, keepdim=True)  # (B, 1) next position of each row
    for j, cand in enumerate(candidates):
        if len(cand) == 1:
            continue
        n = len(cand) - 1
        step = model(
            torch.tensor([list(cand[:-1])]).expand(len(rows), -1).to(device),
            attention_mask=torch.cat([mask, torch.ones(len(rows), n, dtype=mask.dtype)], 1).to(device),
            cache=_copy_cache(out.cache),
            use_cache=True,
            compute_logits=False,
            position_ids=(lengths + torch.arange(n)).to(device),
        )
        logp = torch.log_softmax(model.full_logits(step.last_hidden).float(), -1).cpu()  # (B, n, V+1)
        scores[:, j] += logp[:, torch.arange(n), torch.tensor(list(cand[1:]))].sum(1)
    return scores


@torch.no_grad()
def candidate_logprobs_naive(
    model: FromageModel,
    prompt_ids: torch.Tensor,
    features: torch.Tensor | None,
    candidates: Sequence[Sequence[int]],
) -> torch.Tensor:
    """The naive twin of `candidate_logprobs`: prompt + candidate through the whole model,
    once per candidate, summing log p(token t+1 | ..t) over the candidate's tokens."""
    _check_candidates(candidates)
    device = model.ret_embedding.device
    feats = None if features is None else features.to(device)
    start = prompt_ids.shape[1]
    out = []
    for cand in candidates:
        ids = torch.cat([prompt_ids, torch.tensor([list(cand)])], 1).to(device)
        logp = torch.log_softmax(model(ids, image_features=feats).logits[0].float(), -1)  # (T, V+1)
        positions = torch.arange(start - 1, ids.shape[1] - 1, device=device)
        out.append(float(logp[positions, ids[0, start:]].sum()))
    return torch.tensor(out)
