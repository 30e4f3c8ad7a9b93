import json

import numpy as np
import pytest

from fromage.index.search import brute_force_search
from fromage.index.store import BadIndex, ImageIndex


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


# ---------------------------------------------------------------- issue #6: indexes of millions


def _clustered(n: int, dim: int = 32, clusters: int = 200, seed: int = 0) -> np.ndarray:
    """Unit vectors around `clusters` centres (real embeddings cluster; uniform ones do not)."""
    rng = np.random.default_rng(1234)  # the same centres for every seed: queries share the data's clusters
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[np.random.default_rng(seed).integers(0, clusters, n)]
    x = x + 0.3 * np.random.default_rng(seed + 1).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want, strict=True)]))


@pytest.fixture(scope="module")
def pq_data() -> np.ndarray:
    return _clustered(20_000)


def test_ivfpq_finds_the_brute_force_neighbours_of_held_out_queries(pq_data):
    index = ImageIndex.build(pq_data, _meta(len(pq_data)), "e", "c", "ivfpq")
    assert index.manifest.params["rerank"] == 20 and index.manifest.params["pq_bytes"] == 8
    queries = _clustered(200, seed=7)  # not indexed
    scores, got = index.search(queries, 10)
    want_scores, want = brute_force_search(pq_data, queries, 10)
    assert _recall(got, want) >= 0.95
    # Re-ranked scores are exact inner products of the rows returned.
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, pq_data[got]), rtol=1e-5, atol=1e-6)
    # Without re-ranking the 8-byte codes alone rank clearly worse: the exact pass is doing work.
    index.manifest.params["rerank"] = 0
    assert _recall(index.search(queries, 10)[1], want) < _recall(got, want)


def test_chunked_build_from_a_memmap_equals_the_in_memory_build(tmp_path, pq_data):
    from fromage.index.search import build_faiss

    np.save(tmp_path / "e.npy", pq_data)
    mapped = np.load(tmp_path / "e.npy", mmap_mode="r")
    whole, kind, params = build_faiss(pq_data, "ivfpq", chunk_rows=len(pq_data))
    chunked, _, params2 = build_faiss(mapped, "ivfpq", chunk_rows=1_000)
    assert kind == "ivfpq" and params == params2 and whole.ntotal == chunked.ntotal == len(pq_data)
    queries = _clustered(50, seed=3)
    s1, i1 = whole.search(queries, 20)
    s2, i2 = chunked.search(queries, 20)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_memory_mapped_load_answers_like_a_normal_load(tmp_path, pq_data, kind):
    n = 5_000 if kind == "flat" else len(pq_data)
    ImageIndex.build(pq_data[:n], _meta(n), "e", "c", kind).save(tmp_path / "idx")
    plain = ImageIndex.load(tmp_path / "idx", mmap=False)
    mapped = ImageIndex.load(tmp_path / "idx", mmap=True)
    assert isinstance(mapped.embeddings, np.memmap)
    queries = _clustered(30, seed=5)
    for a, b in zip(plain.search(queries, 10), mapped.search(queries, 10), strict=True):
        np.testing.assert_array_equal(a, b)


def test_recall_is_the_hand_computed_overlap_with_exact_search():
    from fromage.index.search import measure_recall

    rows = np.eye(4, dtype=np.float32)[[0, 0, 1, 1, 2, 3]] * np.array([[1.0], [0.9], [1.0], [0.8], [1], [1]])
    queries = np.eye(4, dtype=np.float32)[[0, 1]]  # exact top-2: {0, 1} and {2, 3}

    def fake(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((2, k)), np.array([[0, 4], [5, 3]])[:, :k]  # 1 of 2, then 1 of 2

    assert measure_recall(fake, rows, queries, k=2) == pytest.approx(0.5)
    # As indexed rows 0 and 2, each query's own row leaves both lists: exact top-1 is then
    # row 1 (for query 0) and row 3 (for query 1); fake's lists hold 4 and 5 for k + 1 = 2
    # after dropping own rows → query 0: [4] (miss), query 1: [5] (miss); k=1.
    assert measure_recall(fake, rows, queries, k=1, query_rows=np.array([0, 2])) == 0.0

    def finds_own_then_neighbour(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((2, k)), np.array([[0, 1], [5, 2]])[:, :k]  # query 0: [1] hit; query 1: [5] miss

    assert measure_recall(finds_own_then_neighbour, rows, queries, k=1, query_rows=np.array([0, 2])) == 0.5


def test_exact_search_in_row_chunks_equals_brute_force():
    from fromage.index.search import exact_search, rescore

    data, queries = _unit(1_000, seed=4), _unit(20, seed=5)
    want_s, want_i = brute_force_search(data, queries, 7)
    got_s, got_i = exact_search(data, queries, 7, chunk_rows=64)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-6)
    # rescore over candidate lists that contain the true top-7 (plus noise and gaps) finds it.
    candidates = np.concatenate([want_i[:, ::-1], np.full((20, 2), -1), np.tile(np.arange(5), (20, 1))], 1)
    s, i = rescore(data, queries, candidates, 7, block=3)
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_allclose(s, want_s, rtol=1e-5, atol=1e-6)
    # Blocks on threads (7 blocks here) give exactly what one block on this thread gives.
    one_s, one_i = rescore(data, queries, candidates, 7, block=len(queries))
    np.testing.assert_array_equal(i, one_i)
    np.testing.assert_array_equal(s, one_s)


def test_manifest_carries_the_measured_recall(tmp_path, pq_data):
    ImageIndex.build(pq_data, _meta(len(pq_data)), "e", "c", "ivfpq").save(tmp_path / "idx")
    stored = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert stored["format_version"] == 2 and stored["params"]["nprobe"] >= 1
    assert stored["recall"]["k"] == 10 and stored["recall"]["queries"] == 1_000
    again = ImageIndex.load(tmp_path / "idx")
    assert again.measure_recall() == stored["recall"] and stored["recall"]["recall"] >= 0.9
    assert json.loads((_built(tmp_path / "flat") / "manifest.json").read_text())["recall"] is None


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"pq_bytes": 7}, r"2 × pq_bytes \(4-bit sub-quantizers\) divides the dimension 32; got 7"),
        ({"nlist": 100, "nprobe": 101}, r"nprobe must be between 1 and nlist \(100\); got 101"),
        ({"nlist": 30_000}, r"nlist <= rows; got nlist 30000 for 20000 rows"),
        ({"train_rows": 100}, r"between max\(nlist, 256\) = 256 and all 20000 rows; got train_rows 100"),
        ({"rerank": -1}, r"rerank must be >= 0"),
    ],
)
def test_bad_ivfpq_settings_are_refused_naming_both_numbers(pq_data, options, match):
    with pytest.raises(ValueError, match=match):
        ImageIndex.build(pq_data, _meta(len(pq_data)), "e", "c", "ivfpq", {"nlist": 100, **options})


def test_ivfpq_settings_on_another_type_and_unknown_types_are_refused():
    with pytest.raises(ValueError, match=r"nprobe only apply to index_type 'ivfpq', not 'hnsw'"):
        ImageIndex.build(_unit(50), _meta(50), "e", "c", "hnsw", {"nprobe": 4})
    with pytest.raises(ValueError, match=r"auto, flat, hnsw, ivf or ivfpq; got 'pq'"):
        ImageIndex.build(_unit(50), _meta(50), "e", "c", "pq")


def test_large_files_are_size_checked_always_and_hashed_on_demand(tmp_path, monkeypatch):
    import fromage.index.store as index_module

    directory = _built(tmp_path)
    path = directory / "embeddings.npy"
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x01  # same size, different bytes
    path.write_bytes(bytes(blob))
    with pytest.raises(BadIndex, match="embeddings.npy does not match its checksum"):
        ImageIndex.load(directory)  # small file: hashed by default
    monkeypatch.setattr(index_module, "HASH_LIMIT", 100)  # now every file counts as large
    assert len(ImageIndex.load(directory)) == 200
    with pytest.raises(BadIndex, match="embeddings.npy does not match its checksum"):
        ImageIndex.load(directory, verify=True)


def test_format_1_indexes_still_load_and_unknown_formats_are_refused(tmp_path):
    directory = _built(tmp_path)
    manifest = json.loads((directory / "manifest.json").read_text())
    old = {k: v for k, v in manifest.items() if k not in ("params", "recall")} | {"format_version": 1}
    (directory / "manifest.json").write_text(json.dumps(old))
    assert len(ImageIndex.load(directory)) == 200
    (directory / "manifest.json").write_text(json.dumps(old | {"format_version": 3}))
    with pytest.raises(BadIndex, match="index format 3, this version reads 1 or 2"):
        ImageIndex.load(directory)
