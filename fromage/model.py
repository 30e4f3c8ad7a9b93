"""FromageModel: a frozen LM and a frozen image encoder joined by three trained linear maps,
one new token `[RET]` and a temperature (DESIGN §2).

The model does no I/O, tokenising or printing. Sequences reach it as token ids in which
`IMAGE_TOKEN_ID` marks the k slots of each image (filled, in order, from the image features
passed alongside) and `model.ret_token_id` (one past the frozen vocabulary) marks `[RET]`.
`[RET]` is its own small parameter spliced into the input embeddings, with its own output row
when the LM's head is untied; the frozen embedding matrix is never resized or touched.

Over 400 lines: one class with its typed outputs. The split retrieval pass (the frozen prefix
in `encode_text_prefix`, `[RET]` on top in `retrieval_from_prefix`) stays beside `forward`,
which it must equal (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from .backbones.lm import FrozenLM
from .backbones.vision import FrozenImageEncoder
from .config import ModelConfig
from .tokens import IGNORE_INDEX, IMAGE_TOKEN_ID


@dataclass
class FromageOutput:
    logits: torch.Tensor
    """(B, T, V + 1) next-token logits; the last column is `[RET]`."""
    ret_hidden: torch.Tensor
    """(B, T, d) the hidden state that feeds the text→retrieval map (config.ret_layer, normed)."""
    last_hidden: torch.Tensor
    """(B, T, d) last-layer normed hidden state (what the output head reads)."""
    cache: Any = None


@dataclass
class RetrievalPass:
    ret_hidden: torch.Tensor
    """(B, d) hidden state at `[RET]` (config.ret_layer, normed)."""
    frozen_lse: torch.Tensor
    """(N,) logsumexp of the frozen vocabulary logits at each predicting position."""
    frozen_target_logit: torch.Tensor
    """(N,) frozen logit of each position's target (meaningless where the target is `[RET]`)."""
    ret_logit: torch.Tensor
    """(N,) the `[RET]` logit at each predicting position (carries gradient)."""
    target_is_ret: torch.Tensor
    """(N,) bool: the position predicts `[RET]`."""

    @staticmethod
    def cat(parts: list[RetrievalPass]) -> RetrievalPass:
        """Several passes as one (rows and positions in order)."""
        if len(parts) == 1:
            return parts[0]
        fields = ("ret_hidden", "frozen_lse", "frozen_target_logit", "ret_logit", "target_is_ret")
        return RetrievalPass(**{f: torch.cat([getattr(p, f) for p in parts]) for f in fields})


@dataclass
class TextPrefix:
    """Frozen-LM results for left-padded `[BOS] text` rows (images, when the prompt has some,
    read through the visual map as constants); nothing here carries a gradient."""

    mask: torch.Tensor  # (B, T) attention mask
    predicts: torch.Tensor  # (B, T) bool: positions in the LM loss (text predicting text or [RET])
    targets: torch.Tensor  # (B, T) next-token targets, [RET] after the last token
    last_hidden: torch.Tensor  # (B, T, d)
    frozen_lse: torch.Tensor  # (B, T) logsumexp over the frozen vocabulary
    frozen_target_logit: torch.Tensor  # (B, T)
    keys: torch.Tensor  # (L, B, H, T, hd) per-layer attention keys
    values: torch.Tensor  # (L, B, H, T, hd)

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    @staticmethod
    def cat(parts: list[TextPrefix]) -> TextPrefix:
        """Concatenate along the batch, left-padding every part to the widest."""
        width = max(p.mask.shape[1] for p in parts)

        def pad(t: torch.Tensor, time_dim: int) -> torch.Tensor:
            missing = width - t.shape[time_dim]
            if not missing:
                return t
            shape = list(t.shape)
            shape[time_dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=time_dim)

        return TextPrefix(
            mask=torch.cat([pad(p.mask, 1) for p in parts]),
            predicts=torch.cat([pad(p.predicts, 1) for p in parts]),
            targets=torch.cat([pad(p.targets, 1) for p in parts]),
            last_hidden=torch.cat([pad(p.last_hidden, 1) for p in parts]),
            frozen_lse=torch.cat([pad(p.frozen_lse, 1) for p in parts]),
            frozen_target_logit=torch.cat([pad(p.frozen_target_logit, 1) for p in parts]),
            keys=torch.cat([pad(p.keys, 3) for p in parts], dim=1),
            values=torch.cat([pad(p.values, 3) for p in parts], dim=1),
        )

    def select(self, rows: torch.Tensor) -> TextPrefix:
        """Rows `rows` of the batch, with leading all-padding columns dropped."""
        mask = self.mask[rows]
        width = int(mask.sum(1).max())
        t0 = mask.shape[1] - width
        return TextPrefix(
            mask=mask[:, t0:],
            predicts=self.predicts[rows, t0:],
            targets=self.targets[rows, t0:],
            last_hidden=self.last_hidden[rows, t0:],
            frozen_lse=self.frozen_lse[rows, t0:],
            frozen_target_logit=self.frozen_target_logit[rows, t0:],
            keys=self.keys[:, rows, :, t0:],
            values=self.values[:, rows, :, t0:],
        )


class FromageModel(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        lm: FrozenLM,
        encoder: FrozenImageEncoder | None = None,
        feature_dim: int | None = None,
    ):
        super().__init__()
        feature_dim = feature_dim or (encoder.feature_dim if encoder is not None else 0)
        _check_dim(config, "hidden_size", lm.hidden_size)
        _check_dim(config, "vocab_size", lm.vocab_size)
        _check_dim(config, "feature_dim", feature_dim or config.feature_dim)
        if config.feature_dim < 1:
            raise ValueError("feature_dim is unknown: pass an encoder or feature_dim")
        self.config = config
        self.lm = lm
        if config.activation_checkpointing:
            lm.set_activation_checkpointing(True, config.activation_checkpointing_share)
        self.encoder = encoder
        d, f, k, r = lm.hidden_size, config.feature_dim, config.num_visual_tokens, config.retrieval_dim

        self.visual_map = nn.Linear(f, k * d)  # feature → k input embeddings
        self.text_ret_map = nn.Linear(d, r)  # [RET] hidden state → retrieval space
        self.image_ret_map = nn.Linear(f, r)  # feature → retrieval space
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))

        frozen = lm.embedding_weight.detach().float()
        self.register_buffer("frozen_row_norm", frozen.norm(dim=1).mean(), persistent=False)
        # Visual tokens start with the frozen rows' per-dimension statistics (inputs are
        # standardised features): default Linear init gives ~10x the norm of a real token,
        # which the frozen LM reads as noise.
        with torch.no_grad():
            self.visual_map.weight.normal_(0.0, float(frozen.std()) / f**0.5)
            self.visual_map.bias.copy_(frozen.mean(0).repeat(k))
        # [RET] starts at the centre of the frozen rows, at their typical norm.
        start = frozen.mean(0)
        start = start / start.norm().clamp_min(1e-8) * self.frozen_row_norm
        self.ret_embedding = nn.Parameter(start.clone())
        self.ret_output: nn.Parameter | None = None
        if not lm.tied:
            # Untied head: [RET] needs its own logit row, trained explicitly.
            head_rows = lm.head.weight.detach().float()  # type: ignore[union-attr]
            self.ret_output = nn.Parameter(head_rows.mean(0).clone())
        # Image features are standardised with training-set statistics (saved with the weights).
        self.register_buffer("feature_mean", torch.zeros(f))
        self.register_buffer("feature_std", torch.ones(f))
        # Likewise the [RET] hidden state: LM hidden states carry a few huge, nearly constant
        # dimensions (SmolLM2 layer 25: |mean| up to ~20 against a median per-dim std of ~0.35),
        # which a linear map would first have to learn to cancel.
        self.register_buffer("text_mean", torch.zeros(d))
        self.register_buffer("text_std", torch.ones(d))
        # Keep the trainable parts in fp32 whatever the frozen LM's dtype.
        self.float_trainables()

    # ------------------------------------------------------------------ basics

    def float_trainables(self) -> None:
        for module in (self.visual_map, self.text_ret_map, self.image_ret_map):
            module.float()

    def train(self, mode: bool = True) -> FromageModel:
        super().train(mode)
        self.lm.train(False)  # frozen towers stay in eval mode by construction
        if self.encoder is not None:
            self.encoder.train(False)
        return self

    @property
    def ret_token_id(self) -> int:
        return self.lm.vocab_size

    @property
    def ret_output_row(self) -> torch.Tensor:
        return self.ret_embedding if self.ret_output is None else self.ret_output

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training produced: the maps, [RET], the temperature, feature statistics."""
        return {
            name: tensor
            for name, tensor in self.state_dict().items()
            if not name.startswith(("lm.", "encoder."))
        }

    def load_trained_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.trained_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
        for name, tensor in state.items():
            if own[name].shape != tensor.shape:
                raise ValueError(
                    f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                    f"model expects {tuple(own[name].shape)}"
                )
        self.load_state_dict(state, strict=False)

    @torch.no_grad()
    def set_feature_stats(self, features: torch.Tensor) -> None:
        """Standardise image features with these (N, F) training features' mean and std."""
        self.feature_mean.copy_(features.float().mean(0))
        self.feature_std.copy_(features.float().std(0).clamp_min(1e-4))

    @torch.no_grad()
    def set_text_stats(self, ret_hidden: torch.Tensor) -> None:
        """Standardise `[RET]` hidden states with these (N, d) states' mean and std."""
        self.text_mean.copy_(ret_hidden.float().mean(0))
        self.text_std.copy_(ret_hidden.float().std(0).clamp_min(1e-4))

    @torch.no_grad()
    def rescale_ret_embedding(self) -> None:
        """Keep `[RET]` at the mean norm of the frozen rows (the paper does this every step)."""
        norm = self.ret_embedding.norm().clamp_min(1e-8)
        self.ret_embedding.mul_(self.frozen_row_norm / norm)

    # ------------------------------------------------------------------ embeddings

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        return (features.float() - self.feature_mean) / self.feature_std

    def visual_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """(N, F) image features → (N, k, d) LM input embeddings."""
        k = self.config.num_visual_tokens
        return self.visual_map(self.standardize(features)).view(features.shape[0], k, -1)

    def image_embeddings(self, features: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(N, F) image features → (N, R) unit vectors in the retrieval space.

        In training, feature dropout uses `keep` (N, F) booleans when given (the loop draws them
        from its own generator, so that a batch split over processes drops the same features as
        one process would), else torch's global generator."""
        x = self.standardize(features)
        p = self.config.feature_dropout
        if self.training and p > 0:
            x = F.dropout(x, p) if keep is None else x * keep / (1 - p)
        return F.normalize(self.image_ret_map(x), dim=-1)

    def text_embeddings(self, ret_hidden: torch.Tensor) -> torch.Tensor:
        """(N, d) hidden states at `[RET]` → (N, R) unit vectors in the retrieval space."""
        x = (ret_hidden.float() - self.text_mean) / self.text_std
        return F.normalize(self.text_ret_map(x), dim=-1)

    def embed_inputs(
        self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T) ids with image slots and `[RET]` → (B, T, d) LM input embeddings."""
        vocab = self.lm.vocab_size
        text_ids = input_ids.clamp(0, vocab - 1)
        embeds = self.lm.embed(text_ids)
        is_ret = (input_ids == self.ret_token_id).unsqueeze(-1)
        if bool(is_ret.any()):
            embeds = torch.where(is_ret, self.ret_embedding.to(embeds.dtype), embeds)
        slots = (input_ids == IMAGE_TOKEN_ID).nonzero(as_tuple=True)  # row-major order
        n_slots = int(slots[0].numel())
        k = self.config.num_visual_tokens
        n_images = 0 if image_features is None else int(image_features.shape[0])
        if n_slots != n_images * k:
            raise ValueError(
                f"input has {n_slots} image slots ({n_slots / k:g} images of {k} tokens) "
                f"but {n_images} images were given"
            )
        if n_images:
            assert image_features is not None
            visual = self.visual_tokens(image_features).reshape(n_images * k, -1)
            embeds = embeds.clone()
            embeds[slots] = visual.to(embeds.dtype)
        bad = (input_ids >= vocab) & (input_ids != self.ret_token_id)
        bad |= (input_ids < 0) & (input_ids != IMAGE_TOKEN_ID)
        if bool(bad.any()):
            raise ValueError(f"input ids outside the vocabulary 0..{vocab} (and image slots)")
        return embeds

    # ------------------------------------------------------------------ forward

    def ret_logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """(…, d) → (…,) the `[RET]` logit."""
        return last_hidden.float() @ self.ret_output_row.float()

    def full_logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """(…, d) → (…, V + 1) frozen vocabulary logits with `[RET]` appended."""
        frozen = self.lm.logits(last_hidden).float()
        return torch.cat([frozen, self.ret_logits(last_hidden).unsqueeze(-1)], dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool = False,
        compute_logits: bool = True,
    ) -> FromageOutput:
        embeds = self.embed_inputs(input_ids, image_features)
        out = self.lm(
            embeds.to(self.lm.dtype),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            ret_layer=self.config.ret_layer,
        )
        logits = self.full_logits(out.last_hidden) if compute_logits else torch.empty(0)
        return FromageOutput(logits, out.selected_hidden, out.last_hidden, out.cache)

    def caption_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_features: torch.Tensor,
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Captioning pass up to the output head. `labels` (B, T) holds the token at each
        position to be predicted (IGNORE_INDEX elsewhere); position t-1 predicts labels[t].
        Returns the (N, d) last hidden states at the N predicting positions and their (N,)
        targets (`losses.linear_cross_entropy` takes it from there without full logits)."""
        out = self.forward(input_ids, attention_mask, image_features, compute_logits=False)
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX  # (B, T-1)
        return out.last_hidden[:, :-1][keep], targets[keep]

    def caption_forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_features: torch.Tensor,
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Captioning pass: logits (N, V+1) at the N predicting positions and their (N,)
        targets (see `caption_hidden`)."""
        hidden, targets = self.caption_hidden(input_ids, attention_mask, image_features, labels)
        return self.full_logits(hidden), targets

    @torch.no_grad()
    def encode_text_prefix(
        self,
        prefix_ids: torch.Tensor,
        prefix_mask: torch.Tensor,
        image_features: torch.Tensor | None = None,
        loss_at_end_only: bool = False,
    ) -> TextPrefix:
        """Everything the retrieval pass needs from left-padded `[BOS] …` rows (B, T). For text
        alone nothing here depends on trained parameters, so training computes it once per
        caption and reuses it every step (see `TextPrefix.select`). Rows with image slots
        (`image_features`: (n, F) for the n images in row-major order) read them through the
        current visual map, as constants: the retrieval pass trains only `[RET]` and the
        retrieval maps, and the captioning pass trains the visual map. `loss_at_end_only`: the
        LM loss reads only the last position (the one that predicts `[RET]`), and the frozen
        vocabulary logits are computed there alone (contexts: the loss that matters is emitting
        `[RET]` after the request; the (B, T, V) logits would be a fifth of their cost)."""
        ret_id = self.ret_token_id
        position_ids = (prefix_mask.long().cumsum(1) - 1).clamp_min(0)
        out = self.forward(
            prefix_ids,
            prefix_mask,
            image_features,
            position_ids=position_ids,
            use_cache=True,
            compute_logits=False,
        )
        # Each token predicts the next; the last real token (left padding: the last column)
        # predicts [RET]. Image slots neither predict nor are predicted in the LM loss.
        targets = torch.cat([prefix_ids[:, 1:], torch.full_like(prefix_ids[:, :1], ret_id)], 1)
        predicts = prefix_mask.bool() & (prefix_ids != IMAGE_TOKEN_ID) & (targets != IMAGE_TOKEN_ID)
        if loss_at_end_only:
            predicts = torch.zeros_like(predicts)
            predicts[:, -1] = True
        # The (B, T, V) vocabulary logits are reduced a few rows at a time: whole, they would
        # be the largest tensor of training (0.3 GB for 64 captions of a 49k vocabulary).
        lse, frozen_target = [], []
        # With the loss at the end only, logits are computed for the last column; the other
        # columns hold zeros that no loss reads.
        hidden = out.last_hidden[:, -1:] if loss_at_end_only else out.last_hidden
        for start in range(0, prefix_ids.shape[0], 8):
            frozen = self.lm.logits(hidden[start : start + 8]).float()  # (8, T or 1, V)
            rows = targets[start : start + 8, -hidden.shape[1] :].clamp(0, frozen.shape[2] - 1)
            lse.append(frozen.logsumexp(-1))
            frozen_target.append(frozen.gather(2, rows.unsqueeze(2))[..., 0])
        if loss_at_end_only:
            width = prefix_ids.shape[1]
            lse = [torch.nn.functional.pad(x, (width - 1, 0)) for x in lse]
            frozen_target = [torch.nn.functional.pad(x, (width - 1, 0)) for x in frozen_target]
        keys = torch.stack([layer.keys for layer in out.cache.layers])  # (L, B, H, T, hd)
        values = torch.stack([layer.values for layer in out.cache.layers])
        return TextPrefix(
            mask=prefix_mask,
            predicts=predicts,
            targets=targets,
            last_hidden=out.last_hidden,
            frozen_lse=torch.cat(lse),
            frozen_target_logit=torch.cat(frozen_target),
            keys=keys,
            values=values,
        )

    def retrieval_from_prefix(self, prefix: TextPrefix) -> RetrievalPass:
        """The trainable part of the retrieval pass: the `[RET]` logit at every prefix position
        and one `[RET]` step on top of the cached keys/values."""
        from transformers import DynamicCache

        predicting = prefix.predicts  # (B, T)
        hidden = prefix.last_hidden[predicting]  # (N, d)
        ret_logit = self.ret_logits(hidden)  # (N,): gradient reaches the [RET] output row
        cache = DynamicCache()
        for layer in range(prefix.keys.shape[0]):
            cache.update(prefix.keys[layer], prefix.values[layer], layer)
        batch = prefix.mask.shape[0]
        ret_ids = torch.full((batch, 1), self.ret_token_id, dtype=torch.long, device=prefix.mask.device)
        mask = torch.cat([prefix.mask, torch.ones_like(prefix.mask[:, :1])], 1)
        step = self.forward(
            ret_ids,
            mask,
            position_ids=prefix.mask.long().sum(1, keepdim=True),
            cache=cache,
            compute_logits=False,
        )
        flat_targets = prefix.targets[predicting]
        return RetrievalPass(
            ret_hidden=step.ret_hidden[:, 0],
            frozen_lse=prefix.frozen_lse[predicting],
            frozen_target_logit=prefix.frozen_target_logit[predicting],
            ret_logit=ret_logit,
            target_is_ret=flat_targets == self.ret_token_id,
        )

    def retrieval_forward(self, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor) -> RetrievalPass:
        """Retrieval pass on left-padded text prefixes `[BOS] caption` (B, T); `[RET]` is
        appended here. Nothing before `[RET]` is trainable, so the prefix runs without autograd
        and keeps its keys/values; only the `[RET]` step and the `[RET]` logit carry gradients.
        Equal to running `[BOS] caption [RET]` through `forward` (tested)."""
        return self.retrieval_from_prefix(self.encode_text_prefix(prefix_ids, prefix_mask))

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the trained tensors and the config (checkpoint.py's format)."""
        checkpoint.save_model(self, directory)

    @classmethod
    def from_pretrained(
        cls,
        name: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        load_encoder: bool = True,
        lm_quantization: str | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> FromageModel:
        """The model a checkpoint holds: a local directory, or a Hub repository id (`user/model`,
        at `revision`), its frozen backbones loaded from their source."""
        directory = checkpoint.resolve(name, revision, cache_dir, local_files_only, token)
        return checkpoint.load_model(
            cls,
            directory,
            device=device,
            dtype=dtype,
            load_encoder=load_encoder,
            lm_quantization=lm_quantization,
        )

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
        """Upload the trained tensors, the config and a model card to a Hub repository."""
        return checkpoint.push_to_hub(self, repo_id, private=private, token=token)


def _check_dim(config: ModelConfig, name: str, actual: int) -> None:
    """Fill a derived dimension, or fail naming both numbers when a checkpoint disagrees."""
    recorded = getattr(config, name)
    if recorded and actual and recorded != actual:
        raise ValueError(f"config says {name}={recorded} but the backbone has {actual}")
    if actual:
        setattr(config, name, actual)
