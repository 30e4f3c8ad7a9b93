"""The lazily parsed metadata rows of an index (fromage/index/jsonl_rows.py) against the naive twin:
every line parsed up front."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest

from fromage.index import jsonl_rows
from fromage.index.jsonl_rows import JsonlRows
from fromage.index.store import ImageIndex


def _digest(i: int) -> str:
    return hashlib.sha1(str(i).encode()).hexdigest()


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    captions = ["a red circle", "line\u2028separator", "next\u0085line", 'tab\tand "quotes"', "日本語 🧀", ""]
    return [
        {"path": f"img{i}.png", "caption": rng.choice(captions), "digest": _digest(rng.randrange(n // 2))}
        for i in range(n)
    ]


def _write(path, rows: list[dict], newline: str = "\n") -> None:
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + newline for r in rows).encode())


def _naive(path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().decode().split("\n") if line.strip()]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("chunk", [7, 64 << 20])  # a scan chunk ends mid-line, or holds the file
def test_rows_match_parsing_every_line(tmp_path, monkeypatch, newline, chunk):
    monkeypatch.setattr(jsonl_rows, "SCAN_CHUNK", chunk)
    rows = _rows(200)
    path = tmp_path / "metadata.jsonl"
    _write(path, rows, newline)
    with path.open("ab") as f:
        f.write(b"\n\n  \t \n \r\n")  # blank lines, and lines of spaces and tabs, are not rows
    lazy = JsonlRows(path)
    assert len(lazy) == 200
    assert list(lazy) == _naive(path) == rows
    assert lazy[0] == rows[0] and lazy[-1] == rows[-1] and lazy[10:20:3] == rows[10:20:3]
    with pytest.raises(IndexError):
        lazy[200]


def test_empty_file_has_no_rows(tmp_path):
    (tmp_path / "m.jsonl").write_bytes(b"")
    rows = JsonlRows(tmp_path / "m.jsonl")
    assert len(rows) == 0 and list(rows) == [] and rows.row_of_digest(_digest(1)) is None


def test_row_of_digest_is_the_first_row_with_that_digest(tmp_path):
    rows = _rows(300, seed=1)
    # Two digests that share their first 16 hex digits: the table's key collides and the
    # candidates must be told apart by the whole digest.
    twin_a, twin_b = "0123456789abcdef" + "0" * 24, "0123456789abcdef" + "1" * 24
    rows[40]["digest"], rows[41]["digest"], rows[7]["digest"] = twin_b, twin_a, twin_b
    rows[55]["caption"] = 'fake "digest": "' + "f" * 40  # a caption quoting the key is not a key
    _write(tmp_path / "m.jsonl", rows)
    lazy = JsonlRows(tmp_path / "m.jsonl")
    for digest in {r["digest"] for r in rows} | {_digest(10_000), "f" * 40, twin_a[:-1] + "2"}:
        naive = next((i for i, r in enumerate(rows) if r["digest"] == digest), None)
        assert lazy.row_of_digest(digest) == naive, digest
    assert lazy.row_of_digest("not-a-digest") is None and lazy.row_of_digest("") is None


def test_a_broken_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"path": "a"}\n{"path": \n[1, 2]\n')
    rows = JsonlRows(path)
    assert rows[0] == {"path": "a"}
    with pytest.raises(ValueError, match=r"m\.jsonl: row 2 \(byte 14\) is not valid JSON"):
        rows[1]
    with pytest.raises(ValueError, match=r"row 3 \(byte 24\) is a JSON list, not an object"):
        rows[2]


def test_digests_are_found_whatever_the_json_spacing_or_hex_case(tmp_path):
    """Metadata written by another tool (`jq -c`, upper-case hex, a non-hex id) is found just as
    a list of the same rows finds it."""
    upper = _digest(2).upper()
    rows = [{"path": "a", "digest": _digest(1)}, {"path": "b", "digest": upper}, {"digest": "photo-7"}]
    lines = [
        json.dumps(rows[0], separators=(",", ":")),
        f'{{"path" : "b" , "digest" :  "{upper}"}}',
        json.dumps(rows[2]),
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    lazy = JsonlRows(tmp_path / "m.jsonl")
    for digest in (_digest(1), upper, "photo-7", _digest(2), "photo-8"):
        naive = next((i for i, r in enumerate(rows) if r["digest"] == digest), None)
        assert lazy.row_of_digest(digest) == naive, digest


def test_the_vectorised_digest_scan_finds_what_the_regex_finds(tmp_path, monkeypatch):
    rows = _rows(500, seed=3)
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines[3] = json.dumps(rows[3], separators=(",", ":"))  # compact: not the tail `save` writes
    lines[9] = json.dumps({"digest": rows[9]["digest"], "path": "first"})  # digest not last
    lines[17] = json.dumps({"path": "x", "nested": {"digest": _digest(5)}})  # ends in "}}"
    lines[21] = json.dumps({"path": "x", "digest": rows[21]["digest"].upper()})
    lines[30] = json.dumps({"path": "x", "digest": "zz" + rows[30]["digest"][2:]})  # not hex
    lines[44] = json.dumps({"digest": _digest(1)[:16] + "-short"})  # 16 hex digits, then not
    (tmp_path / "m.jsonl").write_text("\r\n".join(lines) + "\n")
    monkeypatch.setattr(jsonl_rows, "TABLE_CHUNK", 64)  # lines in several chunks
    lazy = JsonlRows(tmp_path / "m.jsonl")
    tables = [lazy._digest_table(), lazy._digest_table(vectorised=False)]
    (fast_keys, fast_rows), (keys, rows) = [(k[np.lexsort((r, k))], r[np.lexsort((r, k))]) for k, r in tables]
    assert len(keys) == 500 - 1  # row 30's value is not hex
    np.testing.assert_array_equal(fast_keys, keys)
    np.testing.assert_array_equal(fast_rows, rows)


def test_a_verified_load_parses_every_row(tmp_path):
    from fromage.index.store import BadIndex

    emb = np.eye(3, 8, dtype=np.float32)
    ImageIndex.build(emb, _rows(3), "enc", "ckpt").save(tmp_path / "idx")
    path = tmp_path / "idx" / "metadata.jsonl"
    text = path.read_bytes()
    path.write_bytes(text.replace(b'{"path": "img1.png"', b'{"path": "img1.png"]', 1)[: len(text)])
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    manifest["files"]["metadata.jsonl"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))  # a broken row, checksums agree
    lazy = ImageIndex.load(tmp_path / "idx")  # found only when that row is read...
    with pytest.raises(ValueError, match="row 2"):
        lazy.metadata[1]
    with pytest.raises(BadIndex, match="row 2 .* not valid JSON"):  # ...or at once, when verifying
        ImageIndex.load(tmp_path / "idx", verify=True)


def test_an_index_round_trips_captions_with_unicode_line_breaks(tmp_path):
    """`str.splitlines` (the loader before) split these captions into two rows."""
    rows = _rows(12)
    emb = np.random.default_rng(0).standard_normal((12, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    built = ImageIndex.build(emb, rows, "enc", "ckpt")
    built.save(tmp_path / "idx")
    loaded = ImageIndex.load(tmp_path / "idx")
    assert list(loaded.metadata) == rows
    for r in rows:  # the loaded (lazy) and the built (list) index agree on every lookup
        assert loaded.row_of_digest(r["digest"]) == built.row_of_digest(r["digest"])
    assert loaded.row_of_digest(_digest(999)) is None is built.row_of_digest(_digest(999))
    # Saving a loaded index copies the mapped metadata bytes (the built one re-serialises rows):
    # the same rows either way, also after the original directory is replaced.
    built.save(tmp_path / "again")
    ImageIndex.build(emb[:2], rows[:2], "enc", "ckpt").save(tmp_path / "idx")
    loaded.save(tmp_path / "copy")
    assert (
        list(ImageIndex.load(tmp_path / "copy").metadata)
        == rows
        == list(ImageIndex.load(tmp_path / "again").metadata)
    )
