"""Typed configuration: model, training and data settings with a JSON round-trip.

This module imports nothing from the package. Every config is a dataclass validated in
``__post_init__``; names of backbones are strings, never classes, so a config saved next to
the weights can rebuild the model anywhere.

Every setting of the package has its one default here (the CLI's flags, the web demo and the
server read them from these classes). That is why this file is over 400 lines: splitting it
would put settings in several places again.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

WeightStorage = Literal["float32", "bfloat16", "int8"]
"""How the frozen LM's linear weights are held (backbones/lm.py): float32 (exact), bfloat16,
or int8 rows with per-row scales."""
WEIGHT_STORAGES: tuple[str, ...] = get_args(WeightStorage)

T = TypeVar("T")

MAX_BAD_FRACTION = 0.01
"""Share of a collection's rows that may be unreadable before training, indexing, feature
extraction or evaluation stops with an error (the default everywhere)."""
FEATURE_BATCH_SIZE = 32
"""Images the frozen encoder takes at once (`fromage features`, evaluation)."""

# Names that resolve to the offline defaults shipped through package registries (DESIGN §7).
EMBEDDED_LM = "smollm2-135m"
EMBEDDED_ENCODER = "efficientnet-lite0"


@dataclass
class LMConfig:
    """The frozen causal language model."""

    name: str = EMBEDDED_LM
    """`smollm2-135m` (embedded, offline), a Hugging Face model id or a local directory."""
    dtype: str = "float32"
    """Weights dtype of the frozen LM: float32, bfloat16 or float16."""
    quantization: str = "none"
    """none, 8bit or 4bit (NF4): load the frozen LM's linear layers quantized with bitsandbytes
    (needs a CUDA GPU and `pip install bitsandbytes`); for inference with large LMs."""
    revision: str = ""
    """Which weights: a Hub commit, branch or tag, or the package version of the embedded LM. Training records the one it used (a commit hash when known); loading a checkpoint refuses other weights, which the trained maps do not fit."""

    def __post_init__(self) -> None:
        _check_choice("lm.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _check_choice("lm.quantization", self.quantization, ("none", "8bit", "4bit"))


@dataclass
class EncoderConfig:
    """The frozen image encoder; it turns one image into one pooled feature vector."""

    name: str = EMBEDDED_ENCODER
    """`efficientnet-lite0` (embedded), or a Hugging Face vision model id / local directory
    (CLIP vision tower, SigLIP, DINOv2, ViT: anything with a pooled output)."""
    image_size: int = 224
    """Side of the square the image is resized to (embedded encoder only; HF encoders use
    their own processor settings unless this is set explicitly for them)."""
    revision: str = ""
    """Which weights, as for the LM (`LMConfig.revision`)."""

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"encoder.image_size must be >= 8, got {self.image_size}")


@dataclass
class ModelConfig:
    """FROMAGe: frozen LM + frozen encoder + three linear maps, `[RET]` and a temperature."""

    lm: LMConfig = field(default_factory=LMConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    num_visual_tokens: int = 4
    """k: LM input embeddings produced per image (paper: 1)."""
    retrieval_dim: int = 256
    """Size of the shared retrieval space."""
    ret_layer: int = -1
    """Which LM hidden state feeds the text→retrieval map: -1 is the last layer (paper);
    a layer number n uses the output of decoder layer n passed through the final norm."""
    feature_dropout: float = 0.0
    """Dropout on (standardised) image features before the retrieval map, in training."""
    logit_scale_init: float = math.log(1 / 0.07)
    ret_norm_rescale: bool = True
    """After each step, rescale `[RET]`'s embedding to the mean norm of the frozen rows."""
    activation_checkpointing: bool = False
    """Recompute the frozen LM's decoder blocks in the backward pass instead of keeping their
    activations (captioning pass): less memory for one more forward (BENCHMARKS.md, "Training
    step vs the published algorithm"). Same loss and gradients."""
    activation_checkpointing_share: float = 1.0
    """With activation checkpointing on, the share of the decoder blocks (the first ones) that
    are recomputed: memory saved and time spent both scale with it (BENCHMARKS.md)."""
    # Filled in when the model is built from real backbones; checked when a checkpoint loads.
    feature_dim: int = 0
    hidden_size: int = 0
    vocab_size: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.lm, dict):
            self.lm = _from_dict(LMConfig, self.lm)
        if isinstance(self.encoder, dict):
            self.encoder = _from_dict(EncoderConfig, self.encoder)
        _check_type("lm", self.lm, LMConfig)
        _check_type("encoder", self.encoder, EncoderConfig)
        if self.num_visual_tokens < 1:
            raise ValueError(f"num_visual_tokens must be >= 1, got {self.num_visual_tokens}")
        if self.retrieval_dim < 1:
            raise ValueError(f"retrieval_dim must be >= 1, got {self.retrieval_dim}")
        if not 0.0 <= self.activation_checkpointing_share <= 1.0:
            raise ValueError(
                f"activation_checkpointing_share must be in [0, 1], got {self.activation_checkpointing_share}"
            )
        if not 0.0 <= self.feature_dropout < 1.0:
            raise ValueError(f"feature_dropout must be in [0, 1), got {self.feature_dropout}")


@dataclass
class DataConfig:
    """What to train on."""

    sources: list[str] = field(default_factory=lambda: ["emoji", "easyvqa"])
    """Built-in sets (`emoji`, `easyvqa`) and/or paths to a TSV (`caption<TAB>image`) or JSONL file."""
    image_dir: str = ""
    """Directory that relative image paths of TSV/JSONL files resolve against (default: the file's)."""
    max_caption_tokens: int = 24
    max_bad_fraction: float = MAX_BAD_FRACTION
    """Stop with an error when more than this share of examples is unreadable."""
    heldout_concept_fraction: float = 0.1
    """Emoji concepts never trained on (held out for evaluation)."""
    easyvqa_per_class: int = 20
    """easy-VQA training images kept per (colour, shape) caption; 0 keeps all 4,000."""
    augment_views: int = 3
    """Extra augmented renderings per training image whose features are cached too."""
    request_forms: int = 1
    """Request sentences per caption ("show me a red apple", data/requests.py) that retrieval
    refinement trains on beside the caption; 0 = captions only."""
    request_share: float = 0.25
    """Share of refinement samples that read a request instead of the caption. One linear map
    serves both forms: more requests cost caption recall (measured in BENCHMARKS.md)."""

    qa_caption_forms: int = 0
    """Dialogues per image with question/answer pairs (easy-VQA) for the captioning pass, of
    up to `qa_caption_rounds` rounds, `Q: q A: a.` (data/dialogues.py): teaches answering questions about the image
    (answer selection). One round keeps rows as short as captions: the captioning pass pays
    for its longest row. 0 (the default) = captions only: on 2 CPU cores the 14-minute
    budget cannot afford it (BENCHMARKS.md, "Dialogue recipe"); try 4."""
    qa_caption_share: float = 0.5
    """Share of captioning samples of such images that read a dialogue instead of the caption."""
    qa_caption_rounds: int = 1
    """Rounds per such dialogue, at most (1..rounds drawn): earlier rounds are context, as in
    answer selection (evaluate/offline.py)."""
    qa_answer_only: bool = False
    """The captioning pass predicts only a dialogue's last answer; its questions and earlier
    rounds are context, as a user's question is at inference (the ship recipe's second stage).
    False (what older configs ran) predicts the whole text: the model then learns to write
    `Q: …` after an image, and greedy easy-VQA captions were questions for at least a third of images
    (BENCHMARKS.md, "The shipped model")."""
    qa_retrieval_forms: int = 0
    """Dialogues per such image whose answers determine it, added to retrieval refinement
    (dialogue → image retrieval); each costs one LM pass over ~40 tokens, once. 0 (the
    default) = none; 2 lifts easy-VQA dialogue retrieval from R@1 0.06 to 0.59 at the cost of
    ~2 minutes and 0.03 Twitter-emoji R@1 (BENCHMARKS.md)."""
    qa_retrieval_share: float = 0.6
    """Share of refinement samples of such images that read a dialogue instead of the caption."""
    emoji_styles: list[str] = field(default_factory=lambda: ["google"])
    """Drawing styles the `emoji` family trains on: `google` and the freely licensed extra styles
    `fluent-3d`, `noto`, `fluent-flat` (data/emoji_styles.py). `twitter` is never trained on."""

    def __post_init__(self) -> None:
        for name in ("qa_caption_share", "qa_retrieval_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("qa_caption_forms", "qa_retrieval_forms"):
            if not 0 <= getattr(self, name) <= 16:
                raise ValueError(f"{name} must be in 0..16, got {getattr(self, name)}")
        if not 1 <= self.qa_caption_rounds <= 8:
            raise ValueError(f"qa_caption_rounds must be in 1..8, got {self.qa_caption_rounds}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if not 0.0 <= self.heldout_concept_fraction < 1.0:
            raise ValueError(
                f"heldout_concept_fraction must be in [0, 1), got {self.heldout_concept_fraction}"
            )
        if not 0.0 <= self.request_share <= 1.0:
            raise ValueError(f"request_share must be in [0, 1], got {self.request_share}")
        if not 0 <= self.request_forms <= 8:
            raise ValueError(f"request_forms must be in 0..8, got {self.request_forms}")
        if not self.sources:
            raise ValueError("data.sources is empty: name at least one dataset")
        allowed = ("google", "fluent-3d", "noto", "fluent-flat")
        for style in self.emoji_styles:
            if style not in allowed:
                raise ValueError(
                    f"data.emoji_styles: {style!r} is not a training style (one of {', '.join(allowed)}; "
                    "twitter stays unseen)"
                )
        if not self.emoji_styles:
            raise ValueError("data.emoji_styles is empty: name at least one style")


@dataclass
class TaskMix:
    """Retrieval-pass contexts drawn fresh each step beside the captions (training/tasks.py):
    prompts that end in a request, so `[RET]` learns to read the request in its context. The
    kind shares are relative weights."""

    batch_size: int = 0
    """Contexts per step in the retrieval pass (0 = none: the quick recipe's captions only)."""
    request: float = 0.3
    """One request sentence in a training template ("can you show me an apple?")."""
    dialogue: float = 0.15
    """easy-VQA rounds whose answers settle the image."""
    story: float = 0.15
    """Four `name. [image]` pairs of an emoji family, then the fifth name without the family word."""
    category: float = 0.15
    """Two images of a category, then "show me another fruit"."""
    chat: float = 0.25
    """Earlier turns of a conversation (images, answers), then a request."""
    alias_share: float = 0.3
    """Share of emoji requests that name the emoji by a shortcode ("apple") instead of its name."""
    refer_share: float = 0.4
    """Share of chat requests that refer to the image just shown ("show me another animal")."""

    def __post_init__(self) -> None:
        if self.batch_size < 0:
            raise ValueError(f"tasks.batch_size must be >= 0, got {self.batch_size}")
        kinds = ("request", "dialogue", "story", "category", "chat")
        if any(getattr(self, k) < 0 for k in kinds) or not any(getattr(self, k) for k in kinds):
            raise ValueError("task shares must be >= 0 with at least one above 0")
        for name in ("alias_share", "refer_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"tasks.{name} must be in [0, 1], got {getattr(self, name)}")


def embedded_recipe_model() -> ModelConfig:
    """The default recipe's model: SmolLM2-135M + EfficientNet-Lite0, k = 4, `[RET]` read from
    layer 25 of 30 (beat the last layer here, DESIGN §7), dropout on image features."""
    return ModelConfig(num_visual_tokens=4, ret_layer=25, feature_dropout=0.7)


@dataclass
class TrainConfig:
    """The training run. Defaults are the offline recipe (`fromage train` with no arguments)."""

    model: ModelConfig = field(default_factory=embedded_recipe_model)
    data: DataConfig = field(default_factory=DataConfig)
    tasks: TaskMix = field(default_factory=TaskMix)
    output_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 100_000
    max_minutes: float = 14.0
    """Wall-time budget of the whole run (features, training, final validation); 0 = none.
    The learning-rate schedule decays over the budget."""
    stop_at_step: int = 0
    """Stop (and save) at this step without changing the schedule (staged runs); 0 = off."""
    final_eval_reserve_minutes: float = 6.0
    """Part of `max_minutes` kept for retrieval refinement and the final validation."""
    batch_size: int = 32
    """Captioning-pass batch."""
    retrieval_batch_size: int = 64
    """Retrieval-pass (contrastive) batch of the joint loop; its prefix runs without autograd,
    so it can be larger than the captioning batch. Refinement has its own batch size."""
    grad_accum_steps: int = 1
    refine_steps: int = 4000
    """Steps of retrieval-map refinement on cached `[RET]` states after the joint loop
    (batch `refine_batch_size`; 0 = off). See training/refine.py."""
    refine_batch_size: int = 512
    refine_contexts: int = 0
    """Context prompts (stories, chats, categories, ...) drawn once from the task mix (`tasks`)
    for refinement, their `[RET]` states computed after the loop; 0 = captions and their
    variants only. Without them refinement re-fits the maps to lone texts and can undo what
    the loop learned about context (BENCHMARKS.md, "Stage 2")."""
    refine_context_share: float = 0.25
    """Share of each refinement batch taken by those context prompts."""
    refine_max_examples: int = 200_000
    """Refinement reads the cached `[RET]` state of every training caption; above this many
    examples it uses a random sample of them (the state table is examples x hidden size)."""
    prefix_cache_mb: float = 4096.0
    """The frozen `[BOS] caption` part of the retrieval pass is computed once per caption and
    kept (keys/values of every layer) while this table fits in this many MB; a larger
    collection computes it in each step instead (no autograd either way). Same losses."""
    refine_lr: float = 2e-3
    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 30
    grad_clip: float = 1.0
    interleave_prob: float = 0.5
    """Probability per step of packing consecutive caption pairs into one sequence."""
    caption_loss_weight: float = 1.0
    retrieval_lm_loss_weight: float = 1.0
    contrastive_loss_weight: float = 1.0
    precision: str = "auto"
    """auto (bf16 on CUDA with bf16 support, else fp32), fp32 or bf16."""
    device: str = "auto"
    num_processes: int = 1
    """Data-parallel training processes on this machine (`fromage train --num-processes N`;
    `accelerate launch` sets its own). `batch_size` and `retrieval_batch_size` are the global
    batches, split evenly over the processes: the result matches one process (tested)."""
    shard_lm: bool = False
    """With several processes, shard the frozen LM's decoder blocks over them (FSDP2): each
    process holds 1/N of the LM's weights (for LMs too big to replicate). Needs eval_every 0."""
    eval_every: int = 0
    """Validate every N steps (0: only at the end)."""
    max_nonfinite_steps: int = 10
    """Stop with an error after this many steps in a row with a NaN/inf loss or gradient (each
    such update is skipped and counted in summary.json)."""
    save_every: int = 100
    log_every: int = 10
    resume: bool = True
    """Continue from `output_dir/train_state` when it exists."""
    init_from: str = ""
    """A checkpoint whose trained tensors (maps, `[RET]`, statistics) this run starts from, with
    its own schedule and mix (the ship recipe's second stage continues the first); its model
    config must be this run's. A run that resumes its own state ignores it."""

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = _from_dict(ModelConfig, self.model)
        if isinstance(self.data, dict):
            self.data = _from_dict(DataConfig, self.data)
        if isinstance(self.tasks, dict):
            self.tasks = _from_dict(TaskMix, self.tasks)
        _check_type("model", self.model, ModelConfig)
        _check_type("data", self.data, DataConfig)
        _check_type("tasks", self.tasks, TaskMix)
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        _check_choice("precision", self.precision, ("auto", "fp32", "bf16"))
        if self.refine_steps < 0:
            raise ValueError(f"refine_steps must be >= 0, got {self.refine_steps}")
        if self.refine_contexts < 0:
            raise ValueError(f"refine_contexts must be >= 0, got {self.refine_contexts}")
        if not 0.0 <= self.refine_context_share < 1.0:
            raise ValueError(f"refine_context_share must be in [0, 1), got {self.refine_context_share}")
        for name in (
            "max_steps",
            "batch_size",
            "retrieval_batch_size",
            "grad_accum_steps",
            "refine_batch_size",
            "max_nonfinite_steps",
            "num_processes",
            "refine_max_examples",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.interleave_prob <= 1.0:
            raise ValueError(f"interleave_prob must be in [0, 1], got {self.interleave_prob}")
        if self.shard_lm and self.eval_every:
            raise ValueError(
                f"shard_lm needs eval_every 0 (got {self.eval_every}): validation runs in one "
                "process, and a sharded LM runs only in all of them together"
            )
        for name in ("batch_size", "retrieval_batch_size"):
            if getattr(self, name) % self.num_processes:
                raise ValueError(
                    f"{name} {getattr(self, name)} does not split evenly over "
                    f"num_processes {self.num_processes}"
                )


@dataclass
class ServeConfig:
    """Limits and settings of `fromage serve` (apps/serve/)."""

    model_id: str = "fromage-default"
    """The model name `/v1/models` reports."""
    max_body_bytes: int = 8 * 1024 * 1024
    """Largest request body accepted (413 above)."""
    max_image_pixels: int = 16_000_000
    """Largest image (width × height) accepted in a request."""
    max_images_per_request: int = 4
    """Images a request may send in."""
    max_prompt_tokens: int = 1024
    """Longest prompt (text tokens plus image slots) accepted."""
    max_tokens_limit: int = 256
    """Largest `max_tokens` a request may ask for."""
    default_max_tokens: int = 64
    """`max_tokens` of a chat completion that names none."""
    api_key: str = ""
    """When set, every /v1 request needs `Authorization: Bearer <api_key>`. `fromage serve` also reads it from the FROMAGE_API_KEY environment variable, which, unlike a flag, other users cannot see in `ps`."""
    allowed_image_hosts: tuple[str, ...] = ()
    """Hosts whose http(s) image URLs are fetched; any other remote URL is refused."""
    fetch_timeout_s: float = 10.0
    """Seconds to fetch an allow-listed image URL."""
    body_timeout_s: float = 30.0
    """A client that has not sent its whole request body after this long gets a 408 and its
    connection is closed (slow clients cannot hold a worker forever)."""
    max_connections: int = 256
    """Concurrent connections `serve` accepts; more get a 503 at once instead of queueing."""
    max_connections_per_client: int = 32
    """Connections one client address may hold open; more are closed at once."""
    head_timeout_s: float = 10.0
    """A connection that has not sent a whole request line and headers this long after it opened (or after its last response) is closed: idle connections cannot starve the others."""
    batch_size: int = 16
    """Most retrieve/caption requests run together; 1 = one at a time."""
    batch_wait_ms: float = 5.0
    """How long a retrieve/caption request waits for others to batch with."""
    chat_batch_size: int = 16
    """Most chat completions decoded together (continuous batching: a new one joins at the next decoding step); 1 = one at a time."""
    threads: int = 0
    """Threads the model's products use; 0 = one fewer than the CPUs (at least 1), so the HTTP side keeps a core: on 2 cores under 32 clients, one model thread served 20–27% more requests/s than two, whose every parallel product waited on a thread the event loop had preempted (BENCHMARKS.md, issue #17)."""
    lm_weights: WeightStorage = "bfloat16"
    """How the frozen LM's linear weights are stored: bfloat16 (the server's default: 16 rows decoded together cost about what 1 does, while the int8 kernel's cost grows with the rows); int8 (one stream decodes ~1.5× faster, weights rounded to 8 bits: the chat's default); float32 (exact, slowest). BENCHMARKS.md, issue #17."""


@dataclass
class GenerationConfig:
    """How an answer is decoded (generate.py)."""

    max_new_tokens: int = 32
    """Longest answer, in tokens."""
    temperature: float = 0.0
    """0 = greedy; otherwise sample from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Sample only from the smallest set of tokens whose probability reaches top_p."""
    ret_scale_factor: float = 1.0
    """Multiplies the probability of `[RET]` (then renormalised): >1 more images, <1 fewer."""
    min_word_tokens: int = 0
    """No `[RET]` before this many tokens have been generated."""
    max_rets: int = 1
    """At most this many `[RET]`s per answer (0: text only)."""
    images_per_ret: int = 1
    """Images retrieved at each `[RET]` (the best ones not already in the conversation)."""
    stop: tuple[str, ...] = ()
    """The answer ends before the first occurrence of any of these strings (not included)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.ret_scale_factor < 0:
            raise ValueError(f"ret_scale_factor must be >= 0, got {self.ret_scale_factor}")
        if self.images_per_ret < 1:
            raise ValueError(f"images_per_ret must be >= 1, got {self.images_per_ret}")
        if isinstance(self.stop, str):  # a lone string is one stop string, not its characters
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


@dataclass
class ChatConfig(GenerationConfig):
    """A conversation's settings (`fromage chat`, the web demo, the scripted demo): the
    generation settings, tuned for chat, plus how much of the conversation each prompt reads."""

    ret_scale_factor: float = 1e4
    """Multiplies the probability of `[RET]`: a chat answers requests with an image, and the small shipped LM gives `[RET]` a low probability even where an image belongs."""
    memory: int = 0
    """Earlier exchanges (user + answer) each prompt includes; -1: every one that fits the LM's context with the answer (the oldest are dropped first). 0 by default: the shipped model retrieves worse after earlier turns (held-out request forms R@1 0.52 alone, 0.30 after one unrelated exchange; the scripted demo passes 6/7 checks without memory, 5/7 with it; BENCHMARKS.md)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.memory < -1:
            raise ValueError(f"memory must be >= -1 (-1: as many as fit), got {self.memory}")

    def generation(self) -> dict[str, Any]:
        """The `GenerationConfig` settings of this chat."""
        settings = dataclasses.asdict(self)
        settings.pop("memory")
        return settings


def _check_type(name: str, value: Any, cls: type) -> None:
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__} (or its JSON object), got {type(value).__name__}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain JSON-able values."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _from_dict(cls: type[T], data: dict[str, Any]) -> T:
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__} expects a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    # JSON has no tuples: a tuple field (stop strings, allowed hosts) comes back as a list.
    tuples = {f.name for f in dataclasses.fields(cls) if isinstance(f.default, tuple)}  # type: ignore[arg-type]
    return cls(**{k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in data.items()})


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a config from a dict; unknown keys are an error (they are usually typos)."""
    return _from_dict(cls, data)


def save_json(config: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(config), indent=2) + "\n")


def load_json(cls: type[T], path: str | Path) -> T:
    return from_dict(cls, json.loads(Path(path).read_text()))
