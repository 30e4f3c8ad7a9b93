import shutil

import numpy as np
import pytest
from PIL import Image

from fromage.index import BadIndex, ImageIndex
from fromage.indexing import index_collection

from .test_train import tiny_config, tiny_world  # noqa: F401  (fixture)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FROMAGE_HOME", str(tmp_path / "home"))


def _train(world, out, seed=0):
    from fromage.model import FromageModel
    from fromage.train import train

    result = train(tiny_config(world, out, max_steps=2, refine_steps=0, seed=seed))
    return FromageModel.from_pretrained(result.checkpoint).eval(), result.checkpoint


@pytest.fixture
def trained(tiny_world, tmp_path):  # noqa: F811
    return _train(tiny_world, tmp_path / "run")


def test_index_grows_incrementally_and_matches_direct_embedding(trained, tiny_world, tmp_path):  # noqa: F811
    model, ckpt = trained
    folder = tmp_path / "photos"
    shutil.copytree(tiny_world / "images", folder, ignore=shutil.ignore_patterns("*.tsv"))
    first = index_collection(str(folder), ckpt, tmp_path / "idx")
    n = len(list(folder.glob("*.png")))
    assert (first.total, first.added, first.skipped) == (n, n, 0)

    again = index_collection(str(folder), ckpt, tmp_path / "idx")
    assert (again.total, again.added, again.skipped) == (n, 0, n)

    Image.new("RGB", (16, 16), (10, 200, 30)).save(folder / "new.png")
    grown = index_collection(str(folder), ckpt, tmp_path / "idx")
    assert (grown.total, grown.added, grown.skipped) == (n + 1, 1, n)

    index = ImageIndex.load(tmp_path / "idx", dim=model.config.retrieval_dim)
    assert index.metadata[-1]["path"].endswith("new.png")
    # The stored embedding is the model's image embedding of that file.
    from fromage.validation import embed_images

    feats = model.encoder.encode([Image.open(folder / "new.png").convert("RGB")])
    np.testing.assert_allclose(index.embeddings[-1], embed_images(model, feats)[0].numpy(), atol=1e-5)


def test_index_of_another_checkpoint_is_refused(trained, tiny_world, tmp_path):  # noqa: F811
    _, ckpt = trained
    source = str(tiny_world / "images" / "data.tsv")
    index_collection(source, ckpt, tmp_path / "idx")
    _, other = _train(tiny_world, tmp_path / "other", seed=1)
    with pytest.raises(BadIndex, match="index built with checkpoint"):
        index_collection(source, other, tmp_path / "idx")


def test_unreadable_images_are_counted_and_limit_enforced(trained, tiny_world, tmp_path):  # noqa: F811
    from fromage.data.readers import TooManyBadInputs

    _, ckpt = trained
    folder = tmp_path / "photos"
    shutil.copytree(tiny_world / "images", folder, ignore=shutil.ignore_patterns("*.tsv"))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.raises(TooManyBadInputs):
        index_collection(str(folder), ckpt, tmp_path / "idx")
    assert not (tmp_path / "idx").exists()  # nothing half-written
    report = index_collection(str(folder), ckpt, tmp_path / "idx", max_bad_fraction=0.5)
    assert "1" in report.bad and report.total == len(list(folder.glob("*.png"))) - 1
