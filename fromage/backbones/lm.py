"""A frozen Hugging Face causal LM behind the small interface FROMAGe needs.

Any `AutoModelForCausalLM` works (OPT, GPT-2, Llama/SmolLM2, Qwen, …), tied or untied head.
The wrapper never trains: parameters have `requires_grad=False` and the module stays in eval
mode whatever `.train()` is called with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import WEIGHT_STORAGES

WEIGHT_STORAGE = dict(zip(WEIGHT_STORAGES, (torch.float32, torch.bfloat16, torch.int8), strict=True))
"""How the frozen LM's linear weights may be stored for inference (`FrozenLM.store_weights`):
each storage name (config.WeightStorage) → the dtype its products hold."""

# Attribute names of the final norm on the decoder stack, per architecture family.
_FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f", "final_layernorm", "norm_f")


@dataclass
class LMOutput:
    last_hidden: torch.Tensor
    """(B, T, d) last layer, after the final norm: what the output head reads."""
    selected_hidden: torch.Tensor
    """(B, T, d) the `ret_layer` hidden state after the final norm (== last_hidden for -1)."""
    cache: Any
    """Key/value cache to continue decoding from (None unless asked for)."""


class FrozenLM(nn.Module):
    revision: str = ""
    """Which weights loaded (a Hub commit, a package version), when known (backbones.load_lm)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.base = model.base_model  # decoder stack without the head
        embeddings = model.get_input_embeddings()
        head = model.get_output_embeddings()
        if embeddings is None or head is None:
            raise ValueError(f"{type(model).__name__} has no input embeddings or output head")
        self.embeddings: nn.Embedding = embeddings  # type: ignore[assignment]
        self.head: nn.Module = head
        self.tied = head.weight.data_ptr() == embeddings.weight.data_ptr()
        config = model.config
        self.hidden_size = int(embeddings.weight.shape[1])
        self.vocab_size = int(embeddings.weight.shape[0])
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 0
        self.num_layers = int(layers)
        self.final_norm = _find_final_norm(self.base)
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.max_positions: int | None = int(positions) if positions else None
        """The longest sequence the LM was built for (prompt + answer), when its config says."""
        self.stepper: Any = None  # set by enable_fast_decode
        self.checkpointing = False  # set by set_activation_checkpointing
        self.checkpoint_blocks = 0
        # Some heads (OPT-350m) read a projected hidden state; we only support heads that read
        # the hidden size directly, which is every model that ties input and output.
        head_weight: torch.Tensor = head.weight  # type: ignore[assignment]
        head_in = int(head_weight.shape[1])
        if head_in != self.hidden_size:
            raise ValueError(f"output head reads {head_in}-d states but hidden size is {self.hidden_size}")

    def enable_fast_decode(self, ret_layer: int, dtype: torch.dtype = torch.bfloat16) -> bool:
        """Decode token by token with the lean Llama step (backbones/fast_llama.py) when the
        architecture allows; returns whether it does."""
        from .fast_llama import LlamaStepper, supports

        self.stepper = LlamaStepper(self.model, ret_layer, dtype) if supports(self.model) else None
        return self.stepper is not None

    def store_weights(self, kind: str, ret_layer: int) -> bool:
        """Store the frozen linear weights as `kind` ("bfloat16" or "int8"; "float32" leaves
        them as they are and the Hugging Face layers decode) and decode token by token with
        the lean step on them where the architecture allows; returns whether it does."""
        if kind not in WEIGHT_STORAGE:
            raise ValueError(f"LM weight storage must be one of {', '.join(WEIGHT_STORAGE)}; got {kind!r}")
        if kind == "float32":
            return False
        if kind == "bfloat16":
            self.store_weights_bf16()
        else:
            self.store_weights_int8()
        return self.enable_fast_decode(ret_layer, WEIGHT_STORAGE[kind])

    def store_weights_bf16(self) -> int:
        """Keep the frozen linear weights in bfloat16 (activations stay float32): ~2× faster
        token-by-token decoding on CPU (backbones/bf16_weights.py). Returns layers replaced."""
        from .bf16_weights import BF16WeightLinear

        return self._store_weights(BF16WeightLinear.for_this_cpu)  # row limit per CPU

    def store_weights_int8(self) -> int:
        """Keep the frozen linear weights as int8 rows with one scale each (activations stay
        float32): half the bytes of bf16 for each decoded token (backbones/int8_weights.py).
        Returns layers replaced."""
        from .int8_weights import Int8WeightLinear

        return self._store_weights(Int8WeightLinear.for_this_cpu)  # prompt path per CPU

    def _store_weights(self, kind: Callable[[nn.Linear], nn.Module]) -> int:
        """Replace every `nn.Linear` of the LM (in place) by `kind(linear)`. Tied weights are
        copied: an embedding that shares the output head's weight keeps its own float32 copy."""
        if self.dtype != torch.float32:
            raise ValueError(f"weight storage needs a float32 LM, this one is {self.dtype}")
        replaced = 0
        for parent in list(self.model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, kind(child))
                    replaced += 1
        self.head = self.model.get_output_embeddings()  # the replaced module
        return replaced

    def train(self, mode: bool = True) -> FrozenLM:
        # Frozen by construction: dropout never switches on.
        super().train(False)
        return self

    def decoder_layers(self) -> nn.ModuleList:
        """The stack of decoder blocks, whatever the architecture calls it."""
        for module in self.base.modules():
            if isinstance(module, nn.ModuleList) and len(module) == self.num_layers:
                return module
        raise ValueError(f"{type(self.model).__name__}: no list of {self.num_layers} decoder layers found")

    def shard_layers(self) -> int:
        """Shard every decoder block's frozen weights over the initialised process group
        (PyTorch FSDP2 `fully_shard`): each process keeps 1/N of them and gathers one block's
        weights only for its forward and backward. Embeddings and head stay whole (FROMAGe
        reads them directly). Every process must then run the same LM calls. Returns the
        number of blocks sharded."""
        from torch.distributed.fsdp import fully_shard

        layers = self.decoder_layers()
        for layer in layers:
            fully_shard(layer)
        return len(layers)

    def set_activation_checkpointing(self, enabled: bool, share: float = 1.0) -> int:
        """Activation checkpointing of the frozen decoder blocks: under autograd each chosen
        block keeps only its input and is recomputed in the backward pass (non-reentrant
        `torch.utils.checkpoint`), for one extra forward of it. `share` picks the first
        round(share x L) blocks: memory and recompute both scale with it. Same loss and
        gradients (tested). Blocks that read or write a KV cache are never checkpointed (a
        recompute would append to the cache twice), nor is anything run without autograd.
        Returns the number of blocks checkpointed."""
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"checkpointing share must be in [0, 1], got {share}")
        layers = self.decoder_layers()
        self.checkpointing = enabled
        self.checkpoint_blocks = round(share * len(layers)) if enabled else 0
        for index, layer in enumerate(layers):
            if not getattr(layer, "_fromage_checkpointable", False):
                # An instance attribute: module hooks (FSDP2) stay outside the checkpoint.
                layer.forward = _checkpointable(layer.forward, self, index)
                layer._fromage_checkpointable = True
        return self.checkpoint_blocks

    @property
    def embedding_weight(self) -> torch.Tensor:
        return self.embeddings.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids → (B, T, d) frozen input embeddings."""
        return self.embeddings(input_ids)

    def head_linear(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight (V, d), bias or None) when the output head is a plain linear layer (what a
        fused loss can read directly), else None."""
        if type(self.head) is nn.Linear:
            return self.head.weight, self.head.bias
        return None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(…, d) normed hidden states → (…, V) frozen vocabulary logits."""
        return self.head(hidden)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool = False,
        ret_layer: int = -1,
    ) -> LMOutput:
        want_layer = ret_layer not in (-1, self.num_layers)
        if want_layer and not 0 < ret_layer < self.num_layers:
            raise ValueError(f"ret_layer must be -1 or in 1..{self.num_layers}, got {ret_layer}")
        if want_layer and self.final_norm is None:
            raise ValueError(
                f"{type(self.model).__name__}: cannot find the final norm to read layer {ret_layer}"
            )
        kwargs: dict[str, Any] = {
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "use_cache": use_cache,
            "output_hidden_states": want_layer,
        }
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if cache is not None:
            kwargs["cache"] = cache
        out = self.base(**kwargs)
        last = out.last_hidden_state
        selected = last
        if want_layer:
            assert self.final_norm is not None
            # hidden_states[0] is the embedding output; [n] is decoder layer n's output.
            selected = self.final_norm(out.hidden_states[ret_layer])
        return LMOutput(last, selected, getattr(out, "cache", None) if use_cache else None)


def _checkpointable(forward: Any, owner: FrozenLM, index: int) -> Any:
    """`forward` of decoder block `index`, checkpointed while `owner.checkpointing` is on and
    the block is among its first `owner.checkpoint_blocks`."""
    from torch.utils.checkpoint import checkpoint
    from transformers.cache_utils import Cache

    def run(*args: Any, **kwargs: Any) -> Any:
        # Architectures pass the cache by keyword or by position (GPT-2): look at every argument.
        uses_cache = bool(kwargs.get("use_cache")) or any(
            isinstance(a, Cache) for a in (*args, *kwargs.values())
        )
        chosen = owner.checkpointing and index < owner.checkpoint_blocks
        if chosen and torch.is_grad_enabled() and not uses_cache:
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


def _find_final_norm(base: nn.Module) -> nn.Module | None:
    for holder in (base, getattr(base, "decoder", None)):
        if holder is None:
            continue
        for name in _FINAL_NORM_NAMES:
            module = getattr(holder, name, None)
            if isinstance(module, nn.Module):
                return module
    return None
