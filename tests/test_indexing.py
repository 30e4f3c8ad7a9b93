import shutil

import numpy as np
import pytest
from PIL import Image

from fromage.apps.indexing import index_collection
from fromage.index.store import BadIndex, ImageIndex

from .test_train import tiny_config, tiny_world  # noqa: F401  (fixture)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FROMAGE_HOME", str(tmp_path / "home"))


def _train(world, out, seed=0):
    from fromage.model import FromageModel
    from fromage.training.loop import train

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
    from fromage.embed import embed_images

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


def test_indexing_in_small_blocks_gives_the_same_index(trained, tiny_world, tmp_path, monkeypatch):  # noqa: F811
    """`fromage index` embeds new images BLOCK at a time into a scratch directory (bounded RAM
    for any collection size): blocks of 5 give the rows and metadata of one whole block."""
    from fromage.apps import indexing

    _, ckpt = trained
    folder = tmp_path / "photos"
    shutil.copytree(tiny_world / "images", folder, ignore=shutil.ignore_patterns("*.tsv"))
    (folder / "broken.png").write_bytes(b"not an image")  # dropped from its block, counted as bad
    whole = index_collection(str(folder), ckpt, tmp_path / "whole", max_bad_fraction=0.5)
    monkeypatch.setattr(indexing, "BLOCK", 5)
    blocks = index_collection(str(folder), ckpt, tmp_path / "blocks", max_bad_fraction=0.5)
    assert whole.total == blocks.total == whole.added == len(list(folder.glob("*.png"))) - 1
    a, b = ImageIndex.load(tmp_path / "whole"), ImageIndex.load(tmp_path / "blocks")
    assert list(a.metadata) == list(b.metadata)
    np.testing.assert_allclose(np.asarray(a.embeddings), np.asarray(b.embeddings), atol=1e-6)
    assert not list(tmp_path.glob(".*adding-*"))  # the scratch directory is gone


def test_a_killed_runs_scratch_is_cleared_and_a_live_ones_kept(trained, tiny_world, tmp_path):  # noqa: F811
    import os

    _, ckpt = trained
    gone = tmp_path / ".idx.adding-999999999"  # no such process
    live = tmp_path / f".idx.adding-{os.getppid()}"  # a running process (pytest's parent)
    for path in (gone, live):
        path.mkdir()
        (path / "rows.f32").write_bytes(b"\0" * 64)
    index_collection(str(tiny_world / "images" / "data.tsv"), ckpt, tmp_path / "idx")
    assert not gone.exists() and live.exists()
