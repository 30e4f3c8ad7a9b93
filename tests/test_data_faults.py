"""Data faults (issue #7 item 3): every broken image and malformed row is either read correctly
or counted by kind with its file; nothing is dropped silently."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fromage.data.images import MAX_PIXELS, ImageError, load_image
from fromage.data.readers import BadInputLog, read_jsonl, read_tsv
from fromage.tokens import tokenize_captions


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _write_faulty_images(root: Path) -> dict[str, Path]:
    """One file per fault; returns name → path."""
    root.mkdir(parents=True, exist_ok=True)
    red = Image.new("RGB", (16, 16), (200, 30, 30))
    files = {}

    def put(name: str, data: bytes) -> None:
        (root / name).write_bytes(data)
        files[name] = root / name

    put("zero.png", b"")
    put("truncated.png", _png(red)[:60])
    put("not_an_image.png", b"caption\timage\n")
    buf = io.BytesIO()
    Image.new("CMYK", (16, 16), (0, 200, 200, 0)).save(buf, format="JPEG")
    put("cmyk.jpg", buf.getvalue())
    ramp = np.tile(np.linspace(0, 40000, 16).astype(np.uint16), (16, 1))  # darker to the left
    sixteen = Image.fromarray(ramp)
    put("sixteen_bit.png", _png(sixteen))
    palette = red.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.info["transparency"] = 0
    buf = io.BytesIO()
    palette.save(buf, format="PNG", transparency=0)
    put("palette.png", buf.getvalue())
    put("rgba.png", _png(Image.new("RGBA", (16, 16), (0, 0, 255, 0))))
    frames = [Image.new("RGB", (16, 16), c) for c in ((0, 200, 0), (200, 0, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    put("animated.gif", buf.getvalue())
    # A decompression bomb: a tiny file that claims more pixels than the limit.
    side = int(MAX_PIXELS**0.5) + 64
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    put("bomb.png", buf.getvalue())
    (root / "a_directory.png").mkdir()
    files["a_directory.png"] = root / "a_directory.png"
    os.symlink(root / "loop_b.png", root / "loop_a.png")
    os.symlink(root / "loop_a.png", root / "loop_b.png")
    files["loop_a.png"] = root / "loop_a.png"
    return files


READABLE = {"cmyk.jpg", "sixteen_bit.png", "palette.png", "rgba.png", "animated.gif"}
REFUSED = {
    "zero.png": "cannot decode",
    "truncated.png": "cannot decode",
    "not_an_image.png": "cannot decode",
    "bomb.png": "limit",
    "a_directory.png": "is a directory",
    "loop_a.png": "loop_a.png",
}


def test_each_image_fault_decodes_to_rgb_or_is_refused_by_name(tmp_path):
    files = _write_faulty_images(tmp_path / "img")
    assert set(files) == READABLE | set(REFUSED)
    for name in READABLE:
        image = load_image(files[name])
        assert image.mode == "RGB" and image.size == (16, 16), name
    assert load_image(files["rgba.png"]).getpixel((0, 0)) == (255, 255, 255)  # on white
    assert load_image(files["animated.gif"]).getpixel((0, 0))[1] > 150  # the first frame
    sixteen = load_image(files["sixteen_bit.png"])  # scaled to 8 bits, not clipped to white
    assert sixteen.getpixel((15, 0)) == (255, 255, 255) and sixteen.getpixel((0, 0)) == (0, 0, 0)
    assert 100 < sixteen.getpixel((8, 0))[0] < 160
    for name, says in REFUSED.items():
        with pytest.raises(ImageError, match=says) as err:
            load_image(files[name])
        assert name in str(err.value)


def test_training_features_count_every_bad_image_by_kind(tmp_path):
    from fromage.data.dataset import extract_features
    from fromage.data.examples import Example
    from fromage.data.feature_cache import FeatureCache

    files = _write_faulty_images(tmp_path / "img")
    examples = [Example(str(p), f"caption {n}", "faults") for n, p in sorted(files.items())]
    examples.append(Example(str(tmp_path / "img" / "missing.png"), "gone", "faults"))
    examples.append(Example(str(files["rgba.png"]), "a duplicate image", "faults"))

    class Encoder:
        encoder_id = "fake"

        def encode(self, images):
            return torch.stack([torch.tensor(np.asarray(i, dtype=np.float32).mean((0, 1))) for i in images])

    bad = BadInputLog()
    cache = FeatureCache(tmp_path / "cache", "fake")
    split = extract_features(examples, Encoder(), bad, cache=cache)  # type: ignore[arg-type]
    kept = {Path(e.image).name for e in split.examples}
    assert kept == READABLE  # the duplicate is kept as its own example (a second caption)
    assert len(split) == len(READABLE) + 1
    # Missing files, directories and symlink loops cannot even be read; the rest cannot decode.
    assert bad.counts == {"unreadable image": 3, "undecodable image": 4}
    assert bad.total == len(examples) - len(split)
    assert any("bomb.png" in m and "limit" in m for m in bad.messages)  # each says why
    with pytest.raises(Exception, match=r"7 of 13 inputs are bad"):
        bad.check(len(examples), 0.01)


def test_tsv_faults_are_counted_with_file_and_line(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    rows = [
        "\ufeffcaption\timage",  # BOM on the header
        'a "quoted" caption\ta.png',  # quotes are text in the published format
        "a caption\twith a tab\ta.png",  # tab inside the caption: three fields
        "only one column",
        "extra\ta.png\tcolumn",
        "\ta.png",  # empty caption
        "a caption\t",  # empty image
        "",  # blank line: not a row
        "plain caption\ta.png",
    ]
    data = ("\r\n".join(rows) + "\r\n").encode() + b"caf\xe9\ta.png\r\n"  # CRLF; a Latin-1 line
    path = tmp_path / "pairs.tsv"
    path.write_bytes(data)
    bad = BadInputLog()
    examples = read_tsv(path, None, bad)
    assert [e.caption for e in examples] == ['a "quoted" caption', "plain caption"]
    assert examples[0].image == str(tmp_path / "a.png")  # no stray \r
    assert bad.counts == {"malformed row": 5, "not utf-8": 1}
    assert any("pairs.tsv:3:" in m for m in bad.messages) and any("pairs.tsv:10:" in m for m in bad.messages)


def test_jsonl_faults_are_counted(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        '{"image": "a.png", "caption": "ok"}\n'
        '{"image": "a.png"}\n'
        '["a.png", "list"]\n'
        '{"image": "a.png", "caption": "   "}\n'
        "{not json\n"
        '{"image": 3, "caption": "number"}\n'
    )
    bad = BadInputLog()
    assert [e.caption for e in read_jsonl(path, None, bad)] == ["ok"]
    assert bad.counts == {"malformed row": 5}


def test_a_very_long_caption_is_truncated_and_ret_still_follows_it():
    from fromage.data.collate import retrieval_prefix_batch
    from fromage.tokens import SpecialTokens

    from .conftest import build_model

    class Tok:
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[5 + (i % 7) for i, _ in enumerate(t.split())] for t in texts]}

    ids = tokenize_captions(Tok(), ["word " * 500, "two words"], max_tokens=24)
    assert [len(t) for t in ids] == [24, 2]
    model = build_model().eval()
    prefix_ids, mask = retrieval_prefix_batch(ids, SpecialTokens(1, 2, 0))
    prefix = model.encode_text_prefix(prefix_ids, mask)
    # The last real position of every row predicts [RET], however long the caption was.
    assert (prefix.targets[:, -1] == model.ret_token_id).all()


def test_hostile_jsonl_lines_are_counted_and_skipped_naming_the_line(tmp_path):
    """Issue #18 item 7: each of these aborted a whole run (RecursionError, ValueError, or a
    crash writing the index metadata later) instead of being counted."""
    from fromage.data.readers import BadInputLog, read_jsonl

    lines = [
        '{"image": "a.png", "caption": "fine"}',
        "[" * 100_000 + "]" * 100_000,
        '{"image": "b.png", "caption": "x", "n": ' + "9" * 5000 + "}",
        '{"image": "c.png", "caption": "bad \\ud800 text"}',
        '{"image": "d.png", "caption": "also fine"}',
    ]
    path = tmp_path / "hostile.jsonl"
    path.write_text("\n".join(lines) + "\n")
    bad = BadInputLog()
    rows = read_jsonl(path, None, bad)
    assert [r.caption for r in rows] == ["fine", "also fine"]
    assert bad.counts["malformed row"] == 3
    for number, words in ((2, "nested too deeply"), (3, "unreadable JSON value"), (4, "lone surrogate")):
        assert any(m.startswith(f"{path}:{number}:") and words in m for m in bad.messages), (
            number,
            bad.messages,
        )


def test_a_phone_photo_is_loaded_upright(tmp_path):
    """Issue #16: the EXIF orientation tag was ignored, so a phone photo arrived sideways."""
    from PIL import Image

    from fromage.data.images import load_image

    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    path = tmp_path / "phone.jpg"
    wide.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40)  # shown upright: taller than wide
    r, g, b = loaded.getpixel((10, 2))  # the blue band is now at the top
    assert b > 200 and r < 60
    plain = tmp_path / "plain.png"
    wide.save(plain)
    assert load_image(plain).size == (40, 20)  # no tag: unchanged


def test_a_symlink_loop_in_a_folder_is_counted_not_walked_forever(tmp_path):
    """Issue #18 item 9: symlink loops were skipped without being counted."""
    from PIL import Image

    from fromage.data.readers import BadInputLog
    from fromage.data.sources import read_source

    root = tmp_path / "photos"
    (root / "inner").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "a.png")
    Image.new("RGB", (8, 8)).save(root / "inner" / "b.png")
    (root / "inner" / "loop").symlink_to(root, target_is_directory=True)
    bad = BadInputLog()
    images = read_source(str(root), None, bad)
    assert sorted(Path(e.image).name for e in images) == ["a.png", "b.png"]
    assert bad.counts["symlink loop"] == 1 and "loop" in bad.messages[0]


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("caption\timage\n".encode("utf-16"), ":1: the file is UTF-16"),
        (b"capti\xffon\timage\n", ":1: the file is not UTF-8"),
        (b"caption\tcaption\timage\na\tb\tc.png\n", "header names 'caption' more than once"),
    ],
)
def test_a_bad_tsv_header_is_reported_at_line_1_saying_why(tmp_path, content, words):
    """Issue #18 item 9: a UTF-16 or non-UTF-8 header was reported at the wrong line, and a
    duplicated header name marked every row malformed without saying why."""
    from fromage.data.readers import BadInputLog, read_tsv

    path = tmp_path / "pairs.tsv"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=words):
        read_tsv(path, None, BadInputLog())


def test_trailing_tabs_in_a_tsv_header_and_rows_are_ignored(tmp_path):
    from fromage.data.readers import BadInputLog, read_tsv

    path = tmp_path / "pairs.tsv"
    path.write_text("caption\timage\t\na red apple\tapple.png\nbanana\tbanana.png\t\n")
    bad = BadInputLog()
    rows = read_tsv(path, None, bad)
    assert [r.caption for r in rows] == ["a red apple", "banana"] and bad.total == 0
