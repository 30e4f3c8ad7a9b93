"""Decoding with the KV cache. This session's scope: batched greedy captioning.

Captioning prompts are `[img × k][BOS]`, all the same length, so a batch needs no padding.
`[RET]` is never allowed while captioning.
"""

from __future__ import annotations

import torch

from .data.collate import SpecialTokens
from .model import IMAGE_TOKEN_ID, FromageModel


@torch.no_grad()
def greedy_captions(
    model: FromageModel,
    features: torch.Tensor,
    special: SpecialTokens,
    max_new_tokens: int = 24,
    batch_size: int = 128,
) -> list[list[int]]:
    """(N, F) image features → N generated token-id lists (EOS excluded)."""
    k = model.config.num_visual_tokens
    device = model.ret_embedding.device
    results: list[list[int]] = []
    for start in range(0, features.shape[0], batch_size):
        feats = features[start : start + batch_size].to(device)
        b = feats.shape[0]
        prompt = torch.tensor([IMAGE_TOKEN_ID] * k + [special.bos], device=device).repeat(b, 1)
        out = model(prompt, image_features=feats, use_cache=True, compute_logits=False)
        cache = out.cache
        logits = model.lm.logits(out.last_hidden[:, -1])  # (b, V): the [RET] column is left out
        done = torch.zeros(b, dtype=torch.bool, device=device)
        tokens: list[list[int]] = [[] for _ in range(b)]
        length = prompt.shape[1]
        for _ in range(max_new_tokens):
            next_ids = logits.argmax(-1)
            for i in range(b):
                if not done[i] and int(next_ids[i]) != special.eos:
                    tokens[i].append(int(next_ids[i]))
            done |= next_ids == special.eos
            if bool(done.all()):
                break
            step = model(
                next_ids[:, None],
                cache=cache,
                use_cache=True,
                compute_logits=False,
                position_ids=torch.full((b, 1), length, device=device),
            )
            cache = step.cache
            length += 1
            logits = model.lm.logits(step.last_hidden[:, -1])
        results += tokens
    return results
