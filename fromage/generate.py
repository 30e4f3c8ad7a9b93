"""Decoding with the KV cache (DESIGN §4, §6).

- `greedy_captions`: batched captioning of images; `[RET]` is never allowed.
- `decode_batch`: many prompts decoded together, one forward per step (serving concurrent chats).
- `decode`: one interleaved prompt → a stream of `Step`s (token ids; at each `[RET]`, the hidden
  state that feeds the text→retrieval map). Greedy or temperature + top-p; `[RET]` controls
  (`ret_scale_factor` scales its *probability*, so it works whatever the logit's sign;
  `min_word_tokens`; `max_rets`). `use_cache=False` recomputes the whole sequence every token:
  the naive twin the cached path is tested against, and the baseline of the speed benchmark.

No tokenising or retrieval here: the caller turns ids into text and `[RET]` states into images.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .config import GenerationConfig
from .embed import padded_forward
from .model import FromageModel
from .tokens import IMAGE_TOKEN_ID, SpecialTokens

CAPTION_TOKENS = 24
"""Longest greedy caption, in tokens (the paper's maximum caption length)."""


@dataclass
class Step:
    token_id: int
    ret_hidden: torch.Tensor | None = None
    """(d,) the `[RET]` state (config.ret_layer, normed) when token_id is `[RET]`."""


def next_token_scores(
    model: FromageModel, logits: torch.Tensor, config: GenerationConfig, allow_ret: bool
) -> torch.Tensor:
    """(B, V+1) raw logits → (B, V+1) log-probabilities after the `[RET]` controls."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ret = model.ret_token_id
    if not allow_ret or config.ret_scale_factor == 0:
        logp[:, ret] = -math.inf
    elif config.ret_scale_factor != 1.0:
        logp[:, ret] += math.log(config.ret_scale_factor)
    return torch.log_softmax(logp, dim=-1)


def choose(logp: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V+1) log-probabilities → (B,) token ids (greedy, or temperature + top-p sampling)."""
    if config.temperature == 0:
        return logp.argmax(-1)
    # Shifted so the top token is 0, and divided in float64 (a tiny temperature is 0 in
    # float32): the others go to -inf and the draw is the top token, never 0/0 = NaN, which
    # multinomial refuses.
    shifted = (logp - logp.max(dim=-1, keepdim=True).values).double()
    probs = torch.softmax(shifted / config.temperature, dim=-1)
    if config.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each token
        sorted_p = sorted_p.masked_fill(before >= config.top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def decode(
    model: FromageModel,
    input_ids: torch.Tensor,
    image_features: torch.Tensor | None,
    special: SpecialTokens,
    config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[Step]:
    """Continue one prompt (1, T) whose image slots are filled from `image_features` (n, F).
    Stops at EOS (not yielded) or after `max_new_tokens`."""
    config = config or GenerationConfig()
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"decode takes one prompt of shape (1, T), got {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token or image")
    device = model.ret_embedding.device
    ids = input_ids.to(device)
    feats = None if image_features is None else image_features.to(device)
    out = model(ids, image_features=feats, use_cache=use_cache, compute_logits=False)
    cache = out.cache
    hidden = out.last_hidden[:, -1]
    stepper = model.lm.stepper if use_cache else None
    if stepper is not None:  # the lean Llama step takes over the cache (tested against HF's)
        stepper.start(cache, ids.shape[1], ids.shape[1] + config.max_new_tokens)
    rets = 0
    for produced in range(config.max_new_tokens):
        allow_ret = rets < config.max_rets and produced >= config.min_word_tokens
        logp = next_token_scores(model, model.full_logits(hidden), config, allow_ret)
        token = choose(logp, config, generator)  # (1,)
        if int(token) == special.eos:
            return
        if stepper is not None:
            hidden, ret_hidden = stepper.step(model.embed_inputs(token[:, None])[:, 0].float())
            hidden = hidden.to(out.last_hidden.dtype)
        else:
            if use_cache:
                step = model(
                    token[:, None],
                    cache=cache,
                    use_cache=True,
                    compute_logits=False,
                    position_ids=torch.full((1, 1), ids.shape[1], device=device),
                )
                cache = step.cache
            else:
                # The naive twin: the whole sequence again, images included.
                step = model(torch.cat([ids, token[:, None]], 1), image_features=feats, compute_logits=False)
            hidden, ret_hidden = step.last_hidden[:, -1], step.ret_hidden[:, -1]
        ids = torch.cat([ids, token[:, None]], 1)
        if int(token) == model.ret_token_id:
            rets += 1
            yield Step(int(token), ret_hidden[0].float())
        else:
            yield Step(int(token))


@torch.no_grad()
def decode_batch(
    model: FromageModel,
    prompts: Sequence[Sequence[int]],
    image_features: Sequence[torch.Tensor | None],
    special: SpecialTokens,
    config: GenerationConfig | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
    ended: set[int] | None = None,
) -> Iterator[list[tuple[int, Step]]]:
    """`decode` for many prompts at once: one forward per step over all running rows.

    prompts[i] is row i's token ids (image slots included), image_features[i] its (n_i, F)
    features or None, generators[i] its sampling generator. Rows are left-padded into one cache
    and each reads its own positions (attention mask + position ids), so a row decodes exactly
    as it would alone (tested token for token against `decode`). Each iteration yields the
    `(row, Step)` of every row that produced a token: a row ends at EOS or after
    `max_new_tokens`, and its `[RET]` budget (`max_rets`) is its own; the caller ends a row (a
    stop string) by adding it to `ended` between steps. Ended rows stay in the batch, masked
    out, until every row has ended."""
    config = config or GenerationConfig()
    if not prompts:
        return
    if len(image_features) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(image_features)} feature entries")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt is empty: give at least one token or image")
    gens = list(generators) if generators is not None else [None] * len(prompts)
    if len(gens) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(gens)} generators")
    device = model.ret_embedding.device
    out, mask = padded_forward(model, prompts, image_features, special.pad, use_cache=True)
    cache, mask = out.cache, mask.to(device)  # mask: (B, T) grows a column per step
    positions = mask.sum(1, keepdim=True)  # (B, 1) each row's next position
    hidden = out.last_hidden[:, -1]  # (B, d)
    rets = [0] * len(prompts)
    running = [True] * len(prompts)
    for produced in range(config.max_new_tokens):
        logits = model.full_logits(hidden)  # (B, V+1)
        tokens = torch.full((len(prompts),), special.pad, dtype=torch.long, device=device)
        chosen: list[tuple[int, int]] = []
        for row in range(len(prompts)):
            if ended is not None and row in ended:
                running[row] = False
            if not running[row]:
                continue
            allow_ret = rets[row] < config.max_rets and produced >= config.min_word_tokens
            # Row by row, as `decode` does for its one row: the same draw from the same generator.
            logp = next_token_scores(model, logits[row : row + 1], config, allow_ret)
            token = int(choose(logp, config, gens[row]))
            if token == special.eos:
                running[row] = False
                continue
            tokens[row] = token
            chosen.append((row, token))
        if not chosen:
            return
        alive = torch.tensor(running, dtype=mask.dtype, device=device)[:, None]
        mask = torch.cat([mask, alive], 1)
        step = model(
            tokens[:, None],
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            compute_logits=False,
        )
        cache, positions = step.cache, positions + 1
        hidden, ret_hidden = step.last_hidden[:, -1], step.ret_hidden[:, -1]
        steps = []
        for row, token in chosen:
            if token == model.ret_token_id:
                rets[row] += 1
                steps.append((row, Step(token, ret_hidden[row].float())))
            else:
                steps.append((row, Step(token)))
        yield steps


@torch.no_grad()
def greedy_captions(
    model: FromageModel,
    features: torch.Tensor,
    special: SpecialTokens,
    max_new_tokens: int = CAPTION_TOKENS,
    batch_size: int = 128,
    min_new_tokens: int = 0,
) -> list[list[int]]:
    """(N, F) image features → N generated token-id lists (EOS excluded; not allowed before
    `min_new_tokens`). Prompts are `[img × k][BOS]`, all the same length: no padding."""
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
        for produced in range(max_new_tokens):
            if produced < min_new_tokens:
                logits[:, special.eos] = -math.inf
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
