"""Growing an index without copying what it holds (ImageIndex.extend): the row blocks and
chained metadata against their naive twins (np.concatenate, list +), and the grown FAISS index
against a fresh build over the same rows."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest

from fromage.index import search as search_module
from fromage.index.jsonl_rows import ChainedRows, JsonlRows, row_of_digest, write_rows
from fromage.index.row_blocks import RowBlocks
from fromage.index.search import brute_force_search
from fromage.index.store import ImageIndex

from .test_index import _clustered, _unit


def _meta(n: int, start: int = 0) -> list[dict]:
    return [
        {"path": f"img{i}.png", "caption": f"thing {i}", "digest": hashlib.sha1(str(i).encode()).hexdigest()}
        for i in range(start, start + n)
    ]


def test_row_blocks_read_like_the_concatenated_matrix(tmp_path):
    parts = [_unit(37, seed=1), _unit(0, seed=2), _unit(5, seed=3), _unit(60, seed=4)]
    np.save(tmp_path / "first.npy", parts[0])
    parts[0] = np.load(tmp_path / "first.npy", mmap_mode="r")  # a saved index's rows are a memmap
    blocks = RowBlocks([RowBlocks(parts[:2]), *parts[2:]])  # nested blocks are flattened
    whole = np.concatenate([np.asarray(p) for p in parts])
    assert blocks.shape == whole.shape == (102, 16) and len(blocks.blocks) == 3
    for s in [
        slice(0, 102),
        slice(30, 45),
        slice(36, 38),
        slice(41, 42),
        slice(90, 500),
        slice(-10, None),
        slice(5, 5),
    ]:
        np.testing.assert_array_equal(blocks[s], whole[s])
    rng = np.random.default_rng(0)
    for rows in [
        rng.integers(-102, 102, 300),
        np.sort(rng.choice(102, 40, replace=False)),
        rng.integers(0, 102, (4, 6)),
    ]:
        np.testing.assert_array_equal(blocks[rows], whole[rows])
    np.testing.assert_array_equal(np.asarray(blocks), whole)
    with pytest.raises(IndexError, match="out of range for 102 rows"):
        blocks[np.array([3, 102])]
    with pytest.raises(IndexError, match="step 1"):
        blocks[::2]
    with pytest.raises(ValueError, match="one width"):
        RowBlocks([_unit(3), _unit(3, dim=8)])


def test_chained_rows_read_like_the_joined_list(tmp_path):
    first, added, more = _meta(30), _meta(4, start=30), _meta(3, start=2)  # `more` repeats rows 2-4
    # A file whose last line has no newline: written out after it, the next rows must not join it.
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in first))
    chained = ChainedRows([ChainedRows([JsonlRows(tmp_path / "m.jsonl"), added]), more])
    joined = first + added + more
    assert len(chained) == 37 and len(chained.parts) == 3
    assert list(chained) == joined and chained[-1] == joined[-1] and chained[28:33] == joined[28:33]
    for i in range(37):
        assert chained[i] == joined[i]
    for row in joined + _meta(2, start=100):  # a digest in two parts: the first row wins
        naive = next((i for i, r in enumerate(joined) if r["digest"] == row["digest"]), None)
        assert chained.row_of_digest(row["digest"]) == row_of_digest(joined, row["digest"]) == naive
    # Written out, then read back: the same rows.
    out = io.BytesIO()
    write_rows(chained, out)
    (tmp_path / "again.jsonl").write_bytes(out.getvalue())
    assert list(JsonlRows(tmp_path / "again.jsonl")) == joined


def test_a_grown_flat_index_answers_like_one_built_over_all_rows(tmp_path):
    old, new = _unit(300, seed=1), _unit(40, seed=2)
    ImageIndex.build(old, _meta(300), "e", "c", "flat").save(tmp_path / "idx")
    loaded = ImageIndex.load(tmp_path / "idx")
    grown = loaded.extend(new, _meta(40, start=300))
    # Nothing already indexed was copied: the saved rows and metadata are still the mapped files.
    assert isinstance(grown.embeddings, RowBlocks) and grown.embeddings.blocks[0] is loaded.embeddings
    assert isinstance(grown.metadata, ChainedRows) and grown.metadata.parts[0] is loaded.metadata
    assert len(loaded) == 300  # the index it grew from is unchanged
    queries = _unit(20, seed=3)
    want = brute_force_search(np.concatenate([old, new]), queries, 10)
    for got, expected in zip(grown.search(queries, 10), want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert grown.row_of_digest(_meta(1, start=310)[0]["digest"]) == 310
    grown.save(tmp_path / "idx")
    again = ImageIndex.load(tmp_path / "idx")
    np.testing.assert_array_equal(np.asarray(again.embeddings), np.concatenate([old, new]))
    assert list(again.metadata) == _meta(340)
    for got, expected in zip(again.search(queries, 10), want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_a_grown_ivfpq_index_adds_rows_to_its_trained_lists(tmp_path):
    data = _clustered(12_000)
    options = {"nlist": 64, "pq_bytes": 8, "train_rows": 4_000}
    ImageIndex.build(data[:10_000], _meta(10_000), "e", "c", "ivfpq", options).save(tmp_path / "idx")
    loaded = ImageIndex.load(tmp_path / "idx", mmap=True)  # a mapped FAISS index is copied, then grown
    grown = loaded.extend(data[10_000:], _meta(2_000, start=10_000))
    assert grown.manifest.index_type == "ivfpq" and grown.faiss_index.ntotal == 12_000
    assert grown.manifest.params == loaded.manifest.params  # same lists, same settings: not retrained
    centroids = [
        search_module.load_faiss().downcast_index(i.faiss_index.quantizer).reconstruct_n(0, 64)
        for i in (loaded, grown)
    ]
    np.testing.assert_array_equal(*centroids)
    assert loaded.faiss_index.ntotal == 10_000
    # The new rows are found (each is its own nearest neighbour), and recall was measured again.
    _, ids = grown.search(data[10_000:10_200], 10)
    assert np.mean([row in found for row, found in zip(range(10_000, 10_200), ids, strict=True)]) >= 0.99
    _, want = brute_force_search(data, _clustered(100, seed=9), 10)
    _, got = grown.search(_clustered(100, seed=9), 10)
    assert np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)]) >= 0.9
    assert grown.manifest.recall is not None and grown.manifest.recall["recall"] >= 0.9
    grown.save(tmp_path / "idx")
    assert ImageIndex.load(tmp_path / "idx").faiss_index.ntotal == 12_000


def test_an_index_is_rebuilt_when_it_outgrows_its_lists_or_its_type(tmp_path, monkeypatch):
    data = _clustered(9_000)
    options = {"nlist": 16, "pq_bytes": 8, "train_rows": 2_000}
    small = ImageIndex.build(data[:4_000], _meta(4_000), "e", "c", "ivfpq", options)
    assert small.manifest.params["trained_for"] == 4_000
    kept = small.extend(data[4_000:8_000], _meta(4_000, start=4_000))  # exactly 2x: still added
    assert kept.manifest.params["trained_for"] == 4_000 and kept.manifest.params["nlist"] == 16
    rebuilt = kept.extend(data[8_000:], _meta(1_000, start=8_000))  # past 2x: trained again
    assert rebuilt.manifest.params["trained_for"] == 9_000 and rebuilt.manifest.params["nlist"] != 16
    assert rebuilt.faiss_index.ntotal == 9_000 and list(rebuilt.metadata) == _meta(9_000)
    # `auto` outgrowing an exact index switches type (the limit lowered to keep this small).
    monkeypatch.setattr(search_module, "EXACT_LIMIT", 100)
    flat = ImageIndex.build(data[:80], _meta(80), "e", "c", "auto")
    assert flat.manifest.index_type == "flat"
    assert flat.extend(data[80:90], _meta(10, start=80)).manifest.index_type == "flat"
    assert flat.extend(data[80:300], _meta(220, start=80)).manifest.index_type == "hnsw"


def test_extend_copies_the_new_rows_and_grows_hnsw_in_place(tmp_path):
    data = _unit(500, seed=5)
    index = ImageIndex.build(data[:400], _meta(400), "e", "c", "hnsw")
    new = data[400:].copy()
    grown = index.extend(new, _meta(100, start=400))
    new[:] = 0  # the caller reuses its buffer: the index keeps what it was given
    assert grown.manifest.index_type == "hnsw" and grown.faiss_index.ntotal == 500
    np.testing.assert_array_equal(grown.embeddings[400:], data[400:])
    _, ids = grown.search(data[400:], 1)
    assert (ids[:, 0] == np.arange(400, 500)).mean() >= 0.95
    assert index.faiss_index.ntotal == 400


def test_a_rebuild_keeps_settings_it_was_given_and_rederives_defaults(monkeypatch):
    # Re-ranking depth by size, as above 2M rows by default, with the threshold at 3,000 rows.
    monkeypatch.setattr(search_module, "default_rerank", lambda n: 10 if n <= 3_000 else 20)
    data = _clustered(6_000)
    sizes = {"nlist": 16, "train_rows": 2_000}
    given = ImageIndex.build(
        data[:2_000], _meta(2_000), "e", "c", "ivfpq", {**sizes, "pq_bytes": 2, "rerank": 3}
    )
    default = ImageIndex.build(data[:2_000], _meta(2_000), "e", "c", "ivfpq", sizes)
    assert default.manifest.params["rerank"] == 10 and default.manifest.params["pq_bytes"] == 8
    for index, pq_bytes, rerank in ((given, 2, 3), (default, 8, 20)):
        params = index.extend(data[2_000:], _meta(4_000, start=2_000)).manifest.params
        assert (params["trained_for"], params["pq_bytes"], params["rerank"]) == (6_000, pq_bytes, rerank)
    # A manifest written before `chosen` was recorded, with an old default of 12: derived anew
    # (it used to be kept, as it differed from the default of its day's code).
    given.manifest.params["rerank"], given.manifest.chosen = 12, None
    params = given.extend(data[2_000:], _meta(4_000, start=2_000)).manifest.params
    assert (params["pq_bytes"], params["rerank"]) == (8, 20)


def test_extend_names_what_does_not_fit():
    index = ImageIndex.build(_unit(10), _meta(10), "e", "c", "flat")
    with pytest.raises(ValueError, match=r"shape \(2, 8\), the index holds rows of dim 16"):
        index.extend(_unit(2, dim=8), _meta(2, start=10))
    with pytest.raises(ValueError, match="3 new embeddings but 2 metadata rows"):
        index.extend(_unit(3), _meta(2, start=10))
