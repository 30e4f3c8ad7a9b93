"""Pure loss functions. Imports nothing from the package.

- `caption_loss`: next-token cross-entropy on the positions that have a label.
- `ret_token_loss`: the retrieval pass's LM loss when only the `[RET]` logit is trainable, from
  frozen log-sum-exps and target logits computed without autograd (exactly the full CE).
- `contrastive_loss`: symmetric InfoNCE with in-batch negatives, gathered across processes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, count: float | None = None) -> torch.Tensor:
    """(N, V+1) logits at labelled positions, (N,) target ids → mean cross-entropy.

    `count` replaces N as the divisor: under data parallelism it is the number of labelled
    positions over all processes, so the processes' losses (and gradients) sum to the mean
    over the global batch.
    """
    total = F.cross_entropy(logits.float(), targets, reduction="sum")
    return total / (targets.numel() if count is None else count)


class _LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of logits `[hidden @ weight.T (+ bias), hidden @ extra]` (V + 1 classes)
    computed a chunk of rows at a time. `weight` is frozen, so the gradients are known as soon
    as a chunk's softmax is: they are computed right away and only they are kept, (N, d) and
    (d,), instead of the (N, V + 1) logits, their softmax and its gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, extra, targets, divisor: float, chunk: int):  # type: ignore[override]
        want_hidden, want_extra = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32) if want_hidden else None
        grad_extra = torch.zeros_like(extra, dtype=torch.float32) if want_extra else None
        total = hidden.new_zeros((), dtype=torch.float32)
        extra32 = extra.float()
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            frozen = (h.to(weight.dtype) @ weight.T).float()  # (c, V)
            if bias is not None:
                frozen = frozen + bias.float()
            logits = torch.cat([frozen, (h.float() @ extra32)[:, None]], 1)  # (c, V + 1)
            lse = logits.logsumexp(1)
            total = total + (lse - logits.gather(1, t[:, None])[:, 0]).sum()
            if grad_hidden is None and grad_extra is None:
                continue
            # d(loss)/d(logits) = softmax - one-hot, reusing the logits' memory.
            probs = logits.sub_(lse[:, None]).exp_()
            probs[torch.arange(len(t)), t] -= 1.0
            if grad_hidden is not None:
                grad = (probs[:, :-1].to(weight.dtype) @ weight).float() + probs[:, -1:] * extra32
                grad_hidden[start : start + chunk] = grad
            if grad_extra is not None:
                grad_extra += probs[:, -1] @ h.float()
        ctx.save_for_backward(
            *(g / divisor if g is not None else torch.empty(0) for g in (grad_hidden, grad_extra))
        )
        return total / divisor

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        grad_hidden, grad_extra = ctx.saved_tensors
        hidden = grad_hidden * grad_output if ctx.needs_input_grad[0] else None
        extra = grad_extra * grad_output if ctx.needs_input_grad[3] else None
        return hidden, None, None, extra, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    extra: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    count: float | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """`caption_loss` of the logits `[hidden @ weight.T + bias, hidden @ extra]` without ever
    holding all of them: (N, d) hidden states at labelled positions, a frozen (V, d) output
    head, the trainable (d,) `[RET]` output row, (N,) targets in 0..V (V = `[RET]`).

    Same value and gradients as building the (N, V + 1) logits (tested); peak memory is one
    (chunk, V + 1) block instead of about three (N, V + 1) tensors (logits, log-softmax and
    its gradient: 0.75 GB for 1,280 positions of a 49k vocabulary)."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("linear_cross_entropy keeps no graph through the output head: it must be frozen")
    if targets.numel() != hidden.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden states but {targets.numel()} targets")
    divisor = float(targets.numel() if count is None else count)
    return _LinearCrossEntropy.apply(hidden, weight, bias, extra, targets, divisor, chunk)


def ret_token_loss(
    frozen_lse: torch.Tensor,
    frozen_target_logit: torch.Tensor,
    ret_logit: torch.Tensor,
    target_is_ret: torch.Tensor,
    count: float | None = None,
) -> torch.Tensor:
    """Cross-entropy over V+1 classes where only the `[RET]` logit carries gradient.

    All inputs are (N,): logsumexp of the frozen V logits, the frozen logit of the target (any
    value where the target is `[RET]`), the `[RET]` logit, and whether `[RET]` is the target.
    `count` replaces N as the divisor (the global count under data parallelism).
    """
    lse = torch.logaddexp(frozen_lse.float(), ret_logit.float())
    target = torch.where(target_is_ret, ret_logit.float(), frozen_target_logit.float())
    return (lse - target).sum() / (target.numel() if count is None else count)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 across processes; gradients flow to the local shard only."""
    if _world_size() == 1:
        return x
    parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


def contrastive_loss(
    text: torch.Tensor,
    image: torch.Tensor,
    logit_scale: torch.Tensor,
    groups: torch.Tensor | None = None,
    max_scale: float = 100.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE between (B, R) unit text and image embeddings, row i matching row i.

    `groups` (B,) marks pairs that describe the same thing (equal ids): such off-diagonal pairs
    are not used as negatives (easy-VQA has 24 captions over thousands of images).
    Returns (loss, (B, B) text→image logits).

    Under data parallelism both sides are gathered and every process computes the same loss
    over the global batch; its gradient reaches only the local shard's embeddings, so summing
    gradients over processes gives exactly the single-process gradient. The temperature enters
    every process's copy directly, so its gradient is divided by the number of processes.
    """
    world = _world_size()
    if world > 1:
        # Same value; 1/world of the gradient (the processes' gradients are summed).
        logit_scale = logit_scale / world + (logit_scale * (1 - 1 / world)).detach()
    text = gather_with_grad(text)
    image = gather_with_grad(image)
    if groups is not None:
        groups = gather_with_grad(groups)
    n = text.shape[0]
    if image.shape[0] != n:
        raise ValueError(f"{n} text embeddings but {image.shape[0]} image embeddings")
    scale = logit_scale.exp().clamp(max=max_scale)
    logits = scale * text.float() @ image.float().T  # (B, B)
    if groups is not None:
        same = groups[:, None] == groups[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(n, device=logits.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return loss, logits
