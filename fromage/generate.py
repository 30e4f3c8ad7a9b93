"""Decoding with the KV cache (DESIGN §4, §6).

- `greedy_captions`: batched captioning of images; `[RET]` is never allowed.
- `BatchDecoder` / `decode_batch`: many prompts decoded together, one forward per step; rows
  join and leave between steps (continuous batching for a server's concurrent chats).
  `LeanBatchDecoder` does the same on the lean Llama step, where the model has one
  (`batch_decoder` picks): joining prompts run in the same forward as the others' step, and
  each row's cache is a slot of its own (backbones/batch_llama.py).
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
from typing import Any

import torch

from .backbones.batch_llama import Chunk, LlamaBatchStepper
from .backbones.growing_cache import growing
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
        step_cache = stepper.start(cache, ids.shape[1], ids.shape[1] + config.max_new_tokens)
    rets = 0
    for produced in range(config.max_new_tokens):
        allow_ret = rets < config.max_rets and produced >= config.min_word_tokens
        logp = next_token_scores(model, model.full_logits(hidden), config, allow_ret)
        token = choose(logp, config, generator)  # (1,)
        if int(token) == special.eos:
            return
        if stepper is not None:
            hidden, ret_hidden = stepper.step(model.embed_inputs(token[:, None])[:, 0].float(), step_cache)
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


@dataclass
class _Row:
    config: GenerationConfig
    generator: torch.Generator | None
    produced: int = 0
    rets: int = 0


class BatchDecoder:
    """Rows decoded together, one forward per step, that join and leave between steps
    (continuous batching: a server admits a new request at the next step boundary).

    Each row has its own prompt, `GenerationConfig` and generator. Rows live left-padded in one
    KV cache; each reads only its own columns (attention mask) at its own positions (position
    ids), so a row decodes exactly as `decode` decodes it alone, whenever it joined (tested
    token for token). A joining row's prompt runs alone (or with the others joining at the same
    step), then its cache is padded to the batch's width or the batch's to its. A row leaves
    at EOS, after its `max_new_tokens`, or when `end` is called; its cache rows go at once, and
    columns that no remaining row reads are dropped."""

    def __init__(self, model: FromageModel, special: SpecialTokens):
        self.model, self.special = model, special
        self.handles: list[int] = []  # the handle of each batch row, in cache order
        self.rows: dict[int, _Row] = {}
        self.cache: Any = None
        self.mask = torch.empty(0, 0, dtype=torch.long)  # (B, T) the columns each row reads
        self.positions = torch.empty(0, 1, dtype=torch.long)  # (B, 1) each row's next position
        self.hidden = torch.empty(0)  # (B, d) last hidden state: it predicts each row's next token
        self._next_handle = 0

    @property
    def running(self) -> int:
        return len(self.handles)

    @torch.no_grad()
    def add(
        self,
        prompts: Sequence[Sequence[int]],
        image_features: Sequence[torch.Tensor | None],
        configs: Sequence[GenerationConfig],
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> list[int]:
        """Prefill prompts (ids with image slots; (n_i, F) features or None) and join them to
        the batch; → their handles."""
        gens = _checked(prompts, image_features, configs, generators)
        if not prompts:
            return []
        out, mask = padded_forward(self.model, prompts, image_features, self.special.pad, use_cache=True)
        device = self.model.ret_embedding.device
        self._join(out.cache, mask.to(device), mask.sum(1, keepdim=True).to(device), out.last_hidden[:, -1])
        handles = list(range(self._next_handle, self._next_handle + len(prompts)))
        self._next_handle += len(prompts)
        for handle, config, gen in zip(handles, configs, gens, strict=True):
            self.rows[handle] = _Row(config, gen)
        self.handles += handles
        return handles

    def _join(self, cache: Any, mask: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor) -> None:
        if self.cache is None:
            # Steps append in place (backbones/growing_cache.py), not by concatenation.
            self.cache, self.mask, self.positions, self.hidden = growing(cache), mask, positions, hidden
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)])
            old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)])
        self.positions = torch.cat([self.positions, positions])
        self.hidden = torch.cat([self.hidden, hidden.to(self.hidden.dtype)])

    def end(self, handle: int) -> None:
        """Drop a row (a stop string, a client that left); unknown or ended handles are ignored."""
        if handle in self.rows:
            self._keep([h for h in self.handles if h != handle])

    def _keep(self, handles: list[int]) -> None:
        index = torch.tensor([self.handles.index(h) for h in handles], dtype=torch.long)
        for handle in set(self.handles) - set(handles):
            del self.rows[handle]
        self.handles = handles
        if not handles:
            self.cache = None
            return
        self.mask, self.positions, self.hidden = self.mask[index], self.positions[index], self.hidden[index]
        unread = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns no row reads
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, unread:], layer.values[index, :, unread:]
        self.mask = self.mask[:, unread:]

    @torch.no_grad()
    def step(self) -> tuple[list[tuple[int, Step]], list[int]]:
        """One token for every running row: → ((handle, Step) of the rows that produced one,
        handles of the rows that ended at this step: EOS, or their `max_new_tokens` reached)."""
        if not self.handles:
            return [], []
        ended = [h for h in self.handles if self.rows[h].produced >= self.rows[h].config.max_new_tokens]
        if ended:  # a budget of 0 tokens: nothing to decode
            self._keep([h for h in self.handles if h not in ended])
            if not self.handles:
                return [], ended
        rows = [(h, self.rows[h]) for h in self.handles]
        chosen = _next_tokens(self.model, self.model.full_logits(self.hidden), rows, self.special.eos, ended)
        if ended:
            self._keep([h for h, _ in chosen])
        if not chosen:
            return [], ended
        device = self.model.ret_embedding.device
        tokens = torch.tensor([[t] for _, t in chosen], device=device)  # (B, 1)
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
        out = self.model(
            tokens,
            attention_mask=mask,
            position_ids=self.positions,
            cache=self.cache,
            use_cache=True,
            compute_logits=False,
        )
        self.cache, self.mask, self.positions = out.cache, mask, self.positions + 1
        self.hidden, ret_hidden = out.last_hidden[:, -1], out.ret_hidden[:, -1]
        steps = []
        for i, (handle, token) in enumerate(chosen):
            row = self.rows[handle]
            row.produced += 1
            if token == self.model.ret_token_id:
                row.rets += 1
                steps.append((handle, Step(token, ret_hidden[i].float())))
            else:
                steps.append((handle, Step(token)))
        done = [h for h, _ in chosen if self.rows[h].produced >= self.rows[h].config.max_new_tokens]
        if done:
            self._keep([h for h in self.handles if h not in done])
        return steps, ended + done


@dataclass
class _LeanRow(_Row):
    slot: int = 0
    length: int = 0
    """Positions in the slot's cache so far (0 until its prompt has run)."""
    prompt: torch.Tensor | None = None
    """(T, d) input embeddings of a prompt that runs at the next step, then None."""
    hidden: torch.Tensor | None = None
    """(d,) the last hidden state: it predicts the row's next token."""


class LeanBatchDecoder:
    """`BatchDecoder` on the lean Llama step (backbones/batch_llama.py), for models that have
    one (`model.lm.stepper`): each step is *one* forward over every running row's next token
    and the whole prompt of every row that joined since the last step. A row's keys/values
    live in a slot of its own, from column 0: joining takes a free slot, leaving frees it,
    and nothing is copied. A joining row's first token comes at the step after its prompt
    ran. Same interface and the same tokens as `BatchDecoder` (tested against `decode` with
    float32 weights). With bf16 or int8 weights the products pick their kernel by the step's
    row count (int8: its own kernel up to 16 rows, bf16 above), so a row's rounding, and on a
    near-tie its token, can depend on what else the step carries."""

    def __init__(self, model: FromageModel, special: SpecialTokens):
        if model.lm.stepper is None:
            raise ValueError("the lean batch decoder needs the lean Llama step (model.lm.stepper)")
        self.model, self.special = model, special
        self.engine = LlamaBatchStepper(model.lm.stepper)
        self.cache = self.engine.new_cache(limit=model.lm.max_positions or 0)
        self.rows: dict[int, _LeanRow] = {}
        self.reading: dict[int, _LeanRow] = {}
        """Prompts whose `[RET]` state is all that is wanted (`read`), until their step."""
        self.states: dict[int, torch.Tensor] = {}
        """handle → (d,) `[RET]` state of each prompt `read` whose step has run (the caller pops them)."""
        self._next_handle = 0

    @property
    def running(self) -> int:
        return len(self.rows) + len(self.reading)

    def _embed(
        self, prompts: Sequence[Sequence[int]], image_features: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor]:
        """(T_i, d) float32 input embeddings of each prompt (all checked before any joins)."""
        device = self.model.ret_embedding.device
        return [
            self.model.embed_inputs(
                torch.tensor([list(ids)], device=device), None if f is None else f.to(device)
            )[0].float()
            for ids, f in zip(prompts, image_features, strict=True)
        ]

    def _take(self, rows: dict[int, _LeanRow], row: _LeanRow) -> int:
        """Give `row` the lowest free slot and a handle."""
        taken = {r.slot for r in (*self.rows.values(), *self.reading.values())}
        row.slot = next(i for i in range(len(taken) + 1) if i not in taken)
        self.cache.clear(row.slot)
        rows[self._next_handle] = row
        self._next_handle += 1
        return self._next_handle - 1

    @torch.no_grad()
    def read(
        self, prompts: Sequence[Sequence[int]], image_features: Sequence[torch.Tensor | None]
    ) -> list[int]:
        """Retrieval queries: each prompt (ids with image slots, `[RET]` appended here) runs at
        the next step, in the same forward as the decoding rows, and its `[RET]` state (the
        `ret_layer` hidden at `[RET]`, normed: what `embed.ret_hidden_batch` gives) is then in
        `states`. It decodes nothing and frees its slot at once. → handles."""
        if len(prompts) != len(image_features):
            raise ValueError(f"{len(prompts)} prompts but {len(image_features)} feature entries")
        embeds = self._embed([[*p, self.model.ret_token_id] for p in prompts], image_features)
        return [self._take(self.reading, _LeanRow(GenerationConfig(), None, prompt=e)) for e in embeds]

    @torch.no_grad()
    def add(
        self,
        prompts: Sequence[Sequence[int]],
        image_features: Sequence[torch.Tensor | None],
        configs: Sequence[GenerationConfig],
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> list[int]:
        """Take prompts (ids with image slots; (n_i, F) features or None) into the batch; their
        prompts run at the next step. → their handles."""
        gens = _checked(prompts, image_features, configs, generators)
        embeds = self._embed(prompts, image_features)
        return [
            self._take(self.rows, _LeanRow(config, gen, prompt=prompt))
            for prompt, config, gen in zip(embeds, configs, gens, strict=True)
        ]

    def end(self, handle: int) -> None:
        """Drop a row or a pending read (a stop string, a client that left): its slot is free at once."""
        self.rows.pop(handle, None)
        self.reading.pop(handle, None)

    def step(self) -> tuple[list[tuple[int, Step]], list[int]]:
        """One token for every row whose prompt has run, and the prompts of rows that joined:
        → ((handle, Step) of the rows that produced a token, handles of the rows that ended
        at this step: EOS, or their `max_new_tokens` reached)."""
        result = self._step()
        # A burst of long or many rows does not keep its memory once it has passed.
        rows = [*self.rows.values(), *self.reading.values()]
        used = max((r.length + (0 if r.prompt is None else r.prompt.shape[0]) for r in rows), default=0)
        self.cache.fit(1 + max((r.slot for r in rows), default=-1), used)
        return result

    @torch.no_grad()
    def _step(self) -> tuple[list[tuple[int, Step]], list[int]]:
        ended = [
            h for h, r in self.rows.items() if r.prompt is None and r.produced >= r.config.max_new_tokens
        ]
        chosen: list[tuple[int, int]] = []
        ready = [(h, r) for h, r in self.rows.items() if r.prompt is None and h not in ended]
        if ready:
            hidden = torch.stack([r.hidden for _, r in ready])  # type: ignore[misc]
            logits = self.model.full_logits(hidden.to(self.model.lm.dtype))  # (B, V+1)
            chosen = _next_tokens(self.model, logits, ready, self.special.eos, ended)
        for handle in ended:
            del self.rows[handle]
        joining = [(h, r) for h, r in self.rows.items() if r.prompt is not None]
        reading = list(self.reading.items())
        self.reading.clear()
        if not chosen and not joining and not reading:
            return [], ended
        device = self.model.ret_embedding.device
        inputs, chunks = [], []
        if chosen:
            tokens = torch.tensor([[t] for _, t in chosen], device=device)  # (B, 1)
            inputs.append(self.model.embed_inputs(tokens)[:, 0].float())
            chunks += [Chunk(self.rows[h].slot, self.rows[h].length, 1) for h, _ in chosen]
        for _, row in joining + reading:
            assert row.prompt is not None
            inputs.append(row.prompt)
            chunks.append(Chunk(row.slot, 0, row.prompt.shape[0]))
        hidden, ret_hidden = self.engine.forward(torch.cat(inputs), chunks, self.cache)
        first_read = len(chosen) + len(joining)
        for j, (handle, _) in enumerate(reading, start=first_read):
            self.states[handle] = ret_hidden[j].float()
        steps = []
        for i, (handle, token) in enumerate(chosen):
            row = self.rows[handle]
            row.hidden, row.length, row.produced = hidden[i], row.length + 1, row.produced + 1
            if token == self.model.ret_token_id:
                row.rets += 1
                steps.append((handle, Step(token, ret_hidden[i].float())))
            else:
                steps.append((handle, Step(token)))
        for j, (_, row) in enumerate(joining, start=len(chosen)):
            assert row.prompt is not None
            row.hidden, row.length, row.prompt = hidden[j], row.prompt.shape[0], None
        done = [h for h, _ in chosen if self.rows[h].produced >= self.rows[h].config.max_new_tokens]
        for handle in done:
            del self.rows[handle]
        return steps, ended + done


def batch_decoder(model: FromageModel, special: SpecialTokens) -> BatchDecoder | LeanBatchDecoder:
    """The lean batch decoder where the model has the lean Llama step, else the Hugging Face
    layers' (`BatchDecoder`)."""
    if model.lm.stepper is not None:
        return LeanBatchDecoder(model, special)
    return BatchDecoder(model, special)


def _next_tokens(
    model: FromageModel, logits: torch.Tensor, rows: Sequence[tuple[int, _Row]], eos: int, ended: list[int]
) -> list[tuple[int, int]]:
    """Each row's next token from its (V+1,) row of `logits`: → (handle, token) of the rows
    that go on; the handles of rows that chose EOS are appended to `ended`."""
    chosen = []
    for i, (handle, row) in enumerate(rows):
        allow_ret = row.rets < row.config.max_rets and row.produced >= row.config.min_word_tokens
        # Row by row, as `decode` does for its one row: the same draw from the same generator.
        logp = next_token_scores(model, logits[i : i + 1], row.config, allow_ret)
        token = int(choose(logp, row.config, row.generator))
        if token == eos:
            ended.append(handle)
        else:
            chosen.append((handle, token))
    return chosen


def _checked(
    prompts: Sequence[Sequence[int]],
    image_features: Sequence[torch.Tensor | None],
    configs: Sequence[GenerationConfig],
    generators: Sequence[torch.Generator | None] | None,
) -> list[torch.Generator | None]:
    """Refuse a batch whose parts do not line up or that has an empty prompt; → one generator
    (or None) per prompt."""
    if not (len(prompts) == len(image_features) == len(configs)):
        raise ValueError(
            f"{len(prompts)} prompts, {len(image_features)} feature entries, {len(configs)} configs"
        )
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt is empty: give at least one token or image")
    gens = list(generators) if generators is not None else [None] * len(prompts)
    if len(gens) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(gens)} generators")
    return gens


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros before dim 2 of a (B, H, T, D) cache tensor, or dim 1 of a (B, T) mask, to `width`."""
    if x.dim() == 2:
        return torch.nn.functional.pad(x, (width - x.shape[1], 0))
    return torch.nn.functional.pad(x, (0, 0, width - x.shape[2], 0))


def decode_batch(
    model: FromageModel,
    prompts: Sequence[Sequence[int]],
    image_features: Sequence[torch.Tensor | None],
    special: SpecialTokens,
    config: GenerationConfig | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
    ended: set[int] | None = None,
) -> Iterator[list[tuple[int, Step]]]:
    """`decode` for many prompts at once (a `BatchDecoder` that no row joins later): each
    iteration yields the `(row, Step)` of every row that produced a token. prompts[i] is row
    i's ids (image slots included), image_features[i] its (n_i, F) features or None,
    generators[i] its sampling generator; the caller ends a row (a stop string) by adding it to
    `ended` between steps."""
    config = config or GenerationConfig()
    decoder = batch_decoder(model, special)
    decoder.add(prompts, image_features, [config] * len(prompts), generators)
    while decoder.running:
        for row in ended or ():
            decoder.end(row)
        steps, _ = decoder.step()
        if steps:
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
