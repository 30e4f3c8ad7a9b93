"""The checkpoint format: a directory with `config.json` (the model's config, plus a `_fromage`
section with the training step and recipe) and `model.safetensors` holding only the trained
tensors (the maps, `[RET]`, the temperature and the feature statistics).

Importing this module costs no torch: indexing, feature extraction and evaluation read names,
configs and digests from it without loading a model. torch and safetensors are imported inside
the functions that read or write tensors.

Loading rebuilds the frozen backbones from the names in the config, then checks the trained
tensors' names and shapes exactly (no `strict=False`). Device and dtype are the caller's.
Writes are atomic (fileio.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .config import EncoderConfig, ModelConfig, from_dict, to_dict
from .fileio import atomic_write, atomic_write_bytes, sha256_files

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
FILES = (CONFIG_NAME, WEIGHTS_NAME)
FORMAT_VERSION = 1
"""Written in config.json's `_fromage` section; a checkpoint of a newer format is refused.
Checkpoints written before the field existed are version 1."""

SHIPPED = Path(__file__).parent / "weights" / "default"
"""The shipped default model (fromage/weights/default/README.md says how it was trained)."""


class Trained(Protocol):
    """What a checkpoint is written from (FromageModel, without importing it)."""

    config: ModelConfig

    def trained_state_dict(self) -> dict[str, torch.Tensor]: ...


M = TypeVar("M")


def _config_json(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {directory} a fromage checkpoint?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a JSON config ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not the config object")
    return data


def load_config(directory: str | Path) -> ModelConfig:
    data = _config_json(directory)
    record = data.pop("_fromage", None) or {}
    version = record.get("format_version", 1) if isinstance(record, dict) else 1
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{Path(directory) / CONFIG_NAME} is checkpoint format {version!r}; this fromage reads "
            f"formats up to {FORMAT_VERSION}: upgrade fromage"
        )
    try:
        return from_dict(ModelConfig, data)
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise ValueError(f"{Path(directory) / CONFIG_NAME}: not a fromage model config ({error})") from None


def load_encoder_config(directory: str | Path | None = None) -> EncoderConfig:
    """The image encoder a checkpoint (default: the shipped model) was trained with."""
    directory = directory or SHIPPED
    encoder = _config_json(directory).get("encoder")
    if not isinstance(encoder, dict):
        raise ValueError(f"{Path(directory) / CONFIG_NAME}: no `encoder` section")
    return from_dict(EncoderConfig, encoder)


def training_record(directory: str | Path) -> dict[str, Any]:
    """The `_fromage` section: training step and the full training config (empty if absent)."""
    return dict(_config_json(directory).get("_fromage", {}))


def checkpoint_digest(directory: str | Path) -> str:
    """SHA-256 over the checkpoint's config and trained tensors: an index belongs to exactly
    this model (backbone names, dimensions and weights)."""
    return sha256_files(Path(directory) / name for name in FILES)


def save_model(model: Trained, directory: str | Path, extra: dict[str, Any] | None = None) -> None:
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in model.trained_state_dict().items()}
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"refusing to save non-finite values in {name}")
    atomic_write(
        directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "fromage"})
    )
    record = {"format_version": FORMAT_VERSION, **(extra or {})}
    payload = {**to_dict(model.config), "_fromage": record}
    atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(payload, indent=2) + "\n").encode())
    atomic_write_bytes(directory / CARD_NAME, model_card(model.config, record).encode())


def model_card(config: ModelConfig, record: dict[str, Any]) -> str:
    """The Hub model card: YAML metadata (license, library, both backbones as base models,
    tags) and what the checkpoint is, with its training step and recipe when it has them."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        license="apache-2.0",
        library_name="fromage",
        base_model=[config.lm.name, config.encoder.name],
        tags=["fromage", "image-text-retrieval", "image-to-text", "multimodal"],
        pipeline_tag="image-text-to-text",
    )
    train = record.get("train_config") or {}
    lines = [
        "# fromage checkpoint",
        "",
        "FROMAGe (Koh, Salakhutdinov and Fried, ICML 2023): a frozen causal LM and a frozen image",
        "encoder joined by three trained linear maps and one new token, `[RET]`. This directory holds",
        "only the trained tensors (`model.safetensors`) and the config; the frozen backbones load",
        "from their own sources.",
        "",
        f"- LM: `{config.lm.name}`; image encoder: `{config.encoder.name}` ({config.encoder.image_size} px)",
        f"- visual tokens per image: {config.num_visual_tokens}; retrieval space: {config.retrieval_dim}",
    ]
    if "step" in record:
        lines.append(f"- trained for {record['step']} steps")
    if train:
        data_config = train.get("data", {})
        lines.append(f"- data: {', '.join(map(str, data_config.get('sources', [])))}")
    lines += [
        "",
        "```python",
        "from fromage import Fromage",
        'bot = Fromage.from_pretrained("THIS_DIRECTORY_OR_HUB_ID", index="my-index")',
        "```",
    ]
    return ModelCard.from_template(
        data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines) + "\n"
    ).content


def resolve(
    name: str | Path,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """A checkpoint directory for `name`: a local directory as it is, else a Hub repository id
    (`user/model`), fetched at `revision` (branch, tag or commit) into the Hub cache (only the
    config, the trained tensors and the card)."""
    if Path(name).is_dir():
        if revision is not None:
            raise ValueError(f"{name} is a local directory: a revision ({revision}) names a Hub version")
        return Path(name)
    if Path(name).exists() or str(name).startswith((".", "/")) or str(name).count("/") != 1:
        raise FileNotFoundError(f"{name}: no such checkpoint directory (nor a Hub id `user/model`)")
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            repo_id=str(name),
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            allow_patterns=[*FILES, CARD_NAME],
        )
    )


def push_to_hub(model: Trained, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload the checkpoint (trained tensors, config, card) to a Hub repository; → its URL."""
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, tmp)
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message="fromage checkpoint")
    return str(getattr(info, "commit_url", info))


def load_trained_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """The trained tensors; a file that is not safetensors, or holds a NaN or infinity, is
    refused naming the file (and the tensor): such a model answers every request with nothing."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{path}: tensor {name!r} holds {bad} non-finite values (NaN or infinity)")
    return tensors


def load_model(
    cls: type[M],
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    load_encoder: bool = True,
    lm_quantization: str | None = None,
) -> M:
    """Rebuild the model class `cls` (FromageModel) a checkpoint was trained with; the frozen
    weights come from their source. `lm_quantization` (8bit / 4bit, CUDA + bitsandbytes) loads
    the frozen LM quantized. `FromageModel.from_pretrained` is this."""
    import torch

    from .backbones import load_encoder as _load_encoder
    from .backbones import load_lm

    config = load_config(directory)
    if dtype is not None:
        names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
        config.lm.dtype = names[dtype]
    if lm_quantization is not None:
        config.lm.quantization = lm_quantization
        config.lm.__post_init__()
    lm, _ = load_lm(config.lm, device=device)
    encoder = _load_encoder(config.encoder, device=device) if load_encoder else None
    model = cls(config, lm, encoder, feature_dim=config.feature_dim)  # type: ignore[call-arg]
    model.load_trained_state_dict(load_trained_tensors(directory))  # type: ignore[attr-defined]
    return model.to(device)  # type: ignore[attr-defined]
