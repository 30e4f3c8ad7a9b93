"""One training step of the joint loop (DESIGN §3): the captioning pass and the retrieval pass
on one micro-batch, and the few rules around a step (learning-rate schedule, precision).

(1) captioning pass: `[img][BOS] caption [EOS]` (two pairs per row when `interleave`), full
backward through the frozen LM into the visual tokens; (2) retrieval pass: `[BOS] text [RET]`,
the frozen prefix precomputed (prefixes.py), so only the `[RET]` position carries gradients;
LM loss including `[RET]` plus symmetric InfoNCE.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..config import TrainConfig
from ..data.collate import caption_batch
from ..data.dataset import Split
from ..embed import PrefixSource, layout_prompt
from ..losses import caption_loss, contrastive_loss, linear_cross_entropy, ret_token_loss
from ..model import FromageModel, RetrievalPass, TextPrefix
from ..tokens import IGNORE_INDEX, SpecialTokens, left_pad
from .distributed import Processes
from .tasks import Query

CONTEXT_CHUNK = 8
"""Context prompts encoded together (sorted by length first)."""


@dataclass
class StepData:
    """What every step of a run reads; fixed for the run. Indices are training-example rows."""

    split: Split
    """(V, N, F) cached features of the N training images in V augmented views."""
    prefixes: PrefixSource
    """Frozen retrieval-pass prefixes, one row per distinct text."""
    text_of_example: torch.Tensor
    """(N,) example → its row in `prefixes`."""
    group_ids: torch.Tensor
    """(N,) examples of one group (same caption) are not each other's negatives."""
    special: SpecialTokens
    tokenize: Callable[[str], list[int]] | None = None
    """Text → token ids, for retrieval contexts (tasks.py); needed only when steps have some."""


@dataclass
class StepInput:
    """One micro-batch: the global batch's indices (each process runs its contiguous shard)."""

    caption_idx: list[int]
    caption_texts: list[list[int]]
    """What the captioning pass reads for image caption_idx[j] (its caption or a Q→A turn)."""
    retrieval_idx: list[int]
    interleave: bool
    """Pack two caption pairs per row (the paper's interleaving trick)."""
    contexts: list[Query] = field(default_factory=list)
    """Retrieval-pass prompts with their target images, beside the caption rows (tasks.py)."""
    caption_context: list[int] = field(default_factory=list)
    """Leading tokens of caption_texts[j] that are context, not targets (a dialogue's questions;
    empty: none)."""


def use_bf16(config: TrainConfig, device: torch.device) -> bool:
    if config.precision == "bf16":
        return True
    if config.precision == "fp32":
        return False
    # On CPUs here bf16 made the backward pass slower (DESIGN §7): auto means CUDA only.
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def lr_at(step: int, config: TrainConfig, time_progress: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak at the end of the run: `max_steps`
    or, with a time budget, `time_progress` (share of the budget used), whichever is further."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, max((step - config.warmup_steps) / span, time_progress))
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pick_caption_texts(
    texts: list[list[int]],
    qa_forms: list[list[list[int]]],
    idx: list[int],
    share: float,
    generator: torch.Generator,
    qa_context: list[list[int]] | None = None,
) -> tuple[list[list[int]], list[int]]:
    """What the captioning pass reads for each image in `idx`: its caption, or with probability
    `share` one of its dialogues (images that have some), drawn uniformly; and how many of each
    text's leading tokens are context, not targets (`qa_context`; 0 for captions)."""
    draws = torch.rand(len(idx), generator=generator).tolist()
    picks = torch.randint(0, 1 << 30, (len(idx),), generator=generator).tolist()
    out, context = [], []
    for i, draw, pick in zip(idx, draws, picks, strict=True):
        forms = qa_forms[i]
        if forms and draw < share:
            out.append(forms[pick % len(forms)])
            context.append(qa_context[i][pick % len(forms)] if qa_context is not None else 0)
        else:
            out.append(texts[i])
            context.append(0)
    return out, context


def train_step(
    model: FromageModel,
    data: StepData,
    batch: StepInput,
    config: TrainConfig,
    generator: torch.Generator,
    device: torch.device,
    scale: float = 1.0,
    procs: Processes | None = None,
) -> dict[str, float]:
    """Both passes on one micro-batch; backward with `scale` (1 / accumulation steps).

    Random draws are made for the whole global batch and then sharded, and the losses are
    divided by global counts, so the processes' gradients sum to one process's gradient
    (`Processes.sum_gradients`) and the returned values are the global batch's."""
    procs = procs or Processes(0, 1, device)
    features = data.split.features
    views = features.shape[0]
    n_cap, n_ret = len(batch.caption_idx), len(batch.retrieval_idx)
    cap_views = procs.shard(torch.randint(0, views, (n_cap,), generator=generator).tolist())
    ret_views = torch.tensor(procs.shard(torch.randint(0, views, (n_ret,), generator=generator).tolist()))
    p_drop = model.config.feature_dropout
    keep = None
    if p_drop > 0:  # (B, F) feature-dropout mask for the retrieval pass
        keep = torch.rand(n_ret, features.shape[2], generator=generator) >= p_drop
        keep = keep[procs.shard(list(range(n_ret)))].to(device)
    caption_idx, caption_texts = procs.shard(batch.caption_idx), procs.shard(batch.caption_texts)
    caption_context = procs.shard(batch.caption_context) if batch.caption_context else None
    retrieval_idx = torch.tensor(procs.shard(batch.retrieval_idx))

    # (1) captioning pass: full backward through the LM into the visual tokens.
    cap = caption_batch(
        caption_texts, model.config.num_visual_tokens, data.special, batch.interleave, caption_context
    )
    rows = torch.tensor([caption_idx[j] for j in cap.image_order])
    cap_feats = features[torch.tensor([cap_views[j] for j in cap.image_order]), rows].to(device)
    # (2) retrieval pass: the prefix runs without autograd; only [RET] carries gradients.
    # Captions and contexts take separate [RET] steps: one batch would pad every caption's
    # keys/values to the longest context.
    prefixes = [data.prefixes.select(data.text_of_example[retrieval_idx])]
    image_rows, image_views, target_keep = retrieval_idx, ret_views, keep
    if batch.contexts:
        context_prefix, context_targets, target_views, context_keep = _contexts(
            model, data, batch.contexts, generator, procs
        )
        prefixes.append(context_prefix)
        image_rows = torch.cat([retrieval_idx, context_targets])
        image_views = torch.cat([ret_views, target_views])
        if keep is not None and context_keep is not None:
            target_keep = torch.cat([keep, context_keep.to(device)])
    # Loss divisors: labelled caption positions and retrieval-pass positions, all processes.
    counts = procs.sum(
        torch.tensor(
            [(cap.labels[:, 1:] != IGNORE_INDEX).sum(), sum(p.predicts.sum() for p in prefixes)],
            dtype=torch.float64,
        )
    ).tolist()

    hidden, targets = model.caption_hidden(
        cap.input_ids.to(device), cap.attention_mask.to(device), cap_feats, cap.labels.to(device)
    )
    head = model.lm.head_linear()
    if head is not None:  # the (N, V+1) logits are never held whole (losses.linear_cross_entropy)
        weight, bias = head
        loss_cap = linear_cross_entropy(hidden, weight, model.ret_output_row, targets, bias, counts[0])
    else:
        loss_cap = caption_loss(model.full_logits(hidden), targets, counts[0])
    ret = RetrievalPass.cat([model.retrieval_from_prefix(p) for p in prefixes])
    loss_ret_lm = ret_token_loss(
        ret.frozen_lse, ret.frozen_target_logit, ret.ret_logit, ret.target_is_ret, counts[1]
    )
    text_emb = model.text_embeddings(ret.ret_hidden)
    image_emb = model.image_embeddings(features[image_views, image_rows].to(device), target_keep)
    groups = data.group_ids[image_rows].to(device)
    loss_con, con_logits = contrastive_loss(text_emb, image_emb, model.logit_scale, groups)

    weights = (config.caption_loss_weight, config.retrieval_lm_loss_weight, config.contrastive_loss_weight)
    total = weights[0] * loss_cap + weights[1] * loss_ret_lm + weights[2] * loss_con
    (total * scale).backward()
    # The captioning and LM parts are this shard's share of the global mean; the contrastive
    # loss is computed over the gathered global batch by every process.
    cap_loss, ret_lm = procs.sum(torch.stack([loss_cap.detach(), loss_ret_lm.detach()])).tolist()
    con = float(loss_con.detach())
    global_batch = con_logits.shape[0]
    hits = con_logits.argmax(1) == torch.arange(global_batch, device=con_logits.device)
    return {
        "loss": weights[0] * cap_loss + weights[1] * ret_lm + weights[2] * con,
        "caption_loss": cap_loss,
        "ret_lm_loss": ret_lm,
        "contrastive_loss": con,
        "contrastive_acc": float(hits.float().mean()),
    }


def _contexts(
    model: FromageModel,
    data: StepData,
    queries: list[Query],
    generator: torch.Generator,
    procs: Processes,
) -> tuple[TextPrefix, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The frozen prefixes of this process's share of the context prompts (their images read
    through the current visual map, without autograd) → (prefix, (n,) target rows, (n,) target
    views, (n, F) feature-dropout mask or None). Views and masks are drawn for the global batch
    first, so any number of processes draws the same."""
    if data.tokenize is None:
        raise ValueError("retrieval contexts need StepData.tokenize")
    features = data.split.features
    views, dim = features.shape[0], features.shape[2]
    n = len(queries)
    pieces = [sum(isinstance(p, int) for p in q.pieces) for q in queries]
    piece_views = torch.randint(0, views, (sum(pieces),), generator=generator).split(pieces)
    target_views = torch.randint(0, views, (n,), generator=generator)
    p_drop = model.config.feature_dropout
    keep = torch.rand(n, dim, generator=generator) >= p_drop if p_drop > 0 else None
    mine = procs.shard(list(range(n)))
    k = model.config.num_visual_tokens
    laid = []  # (ids, (n_i, F) features or None) per prompt of this process
    for i in mine:
        ids, images = layout_prompt(queries[i].pieces, data.tokenize, data.special.bos, k)
        feats = [features[int(piece_views[i][j]), int(queries[i].pieces[p])] for j, p in enumerate(images)]
        laid.append((ids, torch.stack(feats) if feats else None))
    # Prompts run in length order, a few at a time, so little compute goes to padding
    # (stories are ~70 tokens, requests ~10); the table is put back in prompt order.
    order = sorted(range(len(laid)), key=lambda j: len(laid[j][0]))
    device = model.ret_embedding.device
    parts = []
    for start in range(0, len(order), CONTEXT_CHUNK):
        chunk = [laid[j] for j in order[start : start + CONTEXT_CHUNK]]
        ids, mask = left_pad([c[0] for c in chunk], data.special.pad)
        feats = [c[1] for c in chunk if c[1] is not None]
        image_features = torch.cat(feats).to(device) if feats else None
        parts.append(model.encode_text_prefix(ids.to(device), mask.to(device), image_features, True))
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    prefix = TextPrefix.cat(parts).select(inverse)
    index = torch.tensor(mine, dtype=torch.long)
    targets = torch.tensor([queries[i].target for i in mine], dtype=torch.long)
    return prefix, targets, target_views[index], None if keep is None else keep[index]
