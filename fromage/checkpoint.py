"""Checkpoints: a directory with `config.json` and `model.safetensors` holding only the
trained tensors (the maps, `[RET]`, the temperature and the feature statistics).

Loading rebuilds the frozen backbones from the names in the config, then checks the trained
tensors' names and shapes exactly (no `strict=False`). Device and dtype are the caller's.
Writes are atomic: a temporary name, fsync, rename.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig, from_dict, to_dict
from .model import FromageModel

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: FromageModel, directory: str | Path, extra: dict[str, Any] | None = None) -> None:
    directory = Path(directory)
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in model.trained_state_dict().items()}
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"refusing to save non-finite values in {name}")
    atomic_save_tensors(tensors, directory / WEIGHTS_NAME, {"format": "fromage"})
    payload = to_dict(model.config)
    if extra:
        payload = {**payload, "_fromage": extra}
    atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(payload, indent=2) + "\n").encode())


def load_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {directory} a fromage checkpoint?")
    data = json.loads(path.read_text())
    data.pop("_fromage", None)
    return from_dict(ModelConfig, data)


def load_trained_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    return load_file(str(path))


def load_model(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    load_encoder: bool = True,
    lm_quantization: str | None = None,
) -> FromageModel:
    """Rebuild the model a checkpoint was trained with; frozen weights come from their source.
    `lm_quantization` (8bit / 4bit, CUDA + bitsandbytes) loads the frozen LM quantized."""
    from .backbones import load_encoder as _load_encoder
    from .backbones import load_lm

    config = load_config(directory)
    if dtype is not None:
        config.lm.dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[
            dtype
        ]
    if lm_quantization is not None:
        config.lm.quantization = lm_quantization
        config.lm.__post_init__()
    lm, _ = load_lm(config.lm, device=device)
    encoder = _load_encoder(config.encoder, device=device) if load_encoder else None
    model = FromageModel(config, lm, encoder, feature_dim=config.feature_dim)
    model.load_trained_state_dict(load_trained_tensors(directory))
    return model.to(device)
