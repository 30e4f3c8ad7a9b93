import json

import numpy as np
import pytest

from fromage.index import BadIndex, ImageIndex, brute_force_search


def _unit(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _meta(n: int, start: int = 0) -> list[dict]:
    return [
        {"path": f"img{i}.png", "caption": f"thing {i}", "digest": f"d{i}"} for i in range(start, start + n)
    ]


def _built(tmp_path, n=200, index_type="flat"):
    index = ImageIndex.build(_unit(n), _meta(n), "enc@224", "ckpt123", index_type)
    index.save(tmp_path / "idx")
    return tmp_path / "idx"


def test_exact_index_returns_the_brute_force_top_k(tmp_path):
    directory = _built(tmp_path)
    index = ImageIndex.load(directory, encoder_id="enc@224", checkpoint_digest="ckpt123", dim=16)
    assert index.manifest.index_type == "flat" and len(index) == 200
    queries = _unit(25, seed=1)
    scores, ids = index.search(queries, 10)
    want_scores, want_ids = brute_force_search(np.asarray(index.embeddings), queries, 10)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)


def test_excluded_rows_are_never_returned(tmp_path):
    index = ImageIndex.load(_built(tmp_path))
    queries = np.asarray(index.embeddings[:3])  # each query's best match is itself
    _, ids = index.search(queries, 5, exclude={0, 1, 2})
    assert not set(ids.ravel()) & {0, 1, 2}
    _, top = index.search(queries, 1)
    assert top[:, 0].tolist() == [0, 1, 2]


def test_approximate_index_finds_most_exact_neighbours():
    data = _unit(3000, dim=32)
    exact = ImageIndex.build(data, _meta(3000), "e", "c", "flat")
    queries = _unit(50, dim=32, seed=2)
    _, want = exact.search(queries, 10)
    for kind in ("hnsw", "ivf"):
        approx = ImageIndex.build(data, _meta(3000), "e", "c", kind)
        _, got = approx.search(queries, 10)
        recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)])
        assert recall > 0.8, (kind, recall)


def test_index_for_another_model_is_refused_naming_both(tmp_path):
    directory = _built(tmp_path)
    with pytest.raises(BadIndex, match=r"encoder 'enc@224', this model has 'other@224'"):
        ImageIndex.load(directory, encoder_id="other@224")
    with pytest.raises(BadIndex, match=r"dimension 16, this model has 256"):
        ImageIndex.load(directory, dim=256)


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip"])
def test_damaged_files_are_detected_from_the_manifest(tmp_path, damage):
    directory = _built(tmp_path)
    target = directory / "index.faiss"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
        match = "bytes, the manifest says"
    elif damage == "delete":
        target.unlink()
        match = "index.faiss is missing"
    else:
        blob = bytearray(target.read_bytes())
        blob[-5] ^= 0xFF
        target.write_bytes(bytes(blob))
        match = "checksum"
    with pytest.raises(BadIndex, match=match):
        ImageIndex.load(directory)


def test_extend_appends_rows_and_save_replaces_atomically(tmp_path):
    directory = _built(tmp_path, n=50)
    index = ImageIndex.load(directory)
    grown = index.extend(_unit(30, seed=9), _meta(30, start=50))
    grown.save(directory)
    again = ImageIndex.load(directory)
    assert len(again) == 80 and again.metadata[79]["path"] == "img79.png"
    assert json.loads((directory / "manifest.json").read_text())["count"] == 80
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_readers_during_incremental_adds_see_the_old_or_the_new_index_never_a_torn_one(tmp_path):
    """Issue #7 item 4: one writer grows the index (40+ saves) while two readers load it in a
    loop; every load succeeds and is one whole saved version (rows, metadata and FAISS agree)."""
    import threading
    import time

    directory = _built(tmp_path, n=500)
    versions = {500}
    done = threading.Event()
    seen: list[int] = []
    failures: list[str] = []

    def writer():
        try:
            index = ImageIndex.load(directory)
            # At least 40 saves, and on until the readers have overlapped enough of them
            # (how many loads fit between saves depends on the machine).
            for step in range(400):
                if step >= 40 and len(seen) >= 20:
                    break
                index = index.extend(_unit(5, seed=step + 1), _meta(5, start=index.manifest.count))
                versions.add(index.manifest.count)
                index.save(directory)
                time.sleep(0.01)  # a busy writer, not one that never lets go
        finally:
            done.set()

    def reader():
        while not done.is_set():
            try:
                index = ImageIndex.load(directory)
            except Exception as err:  # any escape is a failure, not a silently dead thread
                failures.append(f"{type(err).__name__}: {err}")
                continue
            count = index.manifest.count
            if not (len(index.metadata) == index.embeddings.shape[0] == index.faiss_index.ntotal == count):
                failures.append(f"torn: manifest {count}, rows {index.embeddings.shape[0]}")
            if index.metadata[-1]["digest"] != f"d{count - 1}":
                failures.append(f"torn: metadata of another version under manifest {count}")
            seen.append(count)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert failures == []
    assert len(seen) >= 20 and len(set(seen)) >= 3 and set(seen) <= versions
