"""The checkpoint format (checkpoint.py): what loading refuses, naming the file."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fromage import checkpoint


def _checkpoint(tmp_path, tensors):
    (tmp_path / checkpoint.CONFIG_NAME).write_text(json.dumps({}))
    save_file(tensors, str(tmp_path / checkpoint.WEIGHTS_NAME))
    return tmp_path


def test_a_checkpoint_with_nan_is_refused_naming_the_tensor_and_file(tmp_path):
    """Issue #18 item 5: `save_model` refused non-finite tensors but loading took them, and a
    NaN model answered every request with nothing (retrieve [], chat "", all 200)."""
    directory = _checkpoint(tmp_path, {"text_ret_map.weight": torch.tensor([[1.0, float("nan")]])})
    with pytest.raises(
        ValueError, match=r"model\.safetensors: tensor 'text_ret_map\.weight' holds 1 non-finite"
    ):
        checkpoint.load_trained_tensors(directory)


def test_finite_tensors_load_unchanged(tmp_path):
    tensors = {"a": torch.randn(3, 2), "steps": torch.tensor([3], dtype=torch.int64)}
    loaded = checkpoint.load_trained_tensors(_checkpoint(tmp_path, tensors))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert load_file(str(tmp_path / checkpoint.WEIGHTS_NAME)).keys() == tensors.keys()


def test_a_file_that_is_not_safetensors_is_refused_naming_it(tmp_path):
    (tmp_path / checkpoint.WEIGHTS_NAME).write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        checkpoint.load_trained_tensors(tmp_path)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"{not json", "is not a JSON config"),
        (b"[1, 2]", "holds a JSON list, not the config object"),
        (b'{"lm": 3}', "not a fromage model config"),
        (b"\xff\xfe{}", "is not a JSON config"),
    ],
)
def test_a_broken_config_is_refused_naming_the_file(tmp_path, content, words):
    (tmp_path / checkpoint.CONFIG_NAME).write_bytes(content)
    with pytest.raises(ValueError, match=words) as error:
        checkpoint.load_config(tmp_path)
    assert str(tmp_path / checkpoint.CONFIG_NAME) in str(error.value)
