"""Webdataset tar shards: listing, bad-input kinds, tar references, and `fromage features`."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fromage.config import DataConfig, EncoderConfig
from fromage.data.digest import file_digest
from fromage.data.images import ImageError, load_image
from fromage.data.readers import BadInputLog
from fromage.data.shards import expand_braces, read_shards, shard_paths, split_tar_ref, tar_ref

from .test_train import tiny_config, tiny_world  # noqa: F401  (fixture)

COLORS = [(220, 20, 20), (20, 200, 20), (20, 20, 220), (200, 200, 20), (20, 200, 200), (200, 20, 200)]


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FROMAGE_HOME", str(tmp_path / "home"))


@pytest.fixture
def clip(tiny_world) -> Path:  # noqa: F811
    """A tiny random CLIP vision tower saved as a directory: the encoder `load_encoder` builds."""
    return tiny_world / "clip"


def _png(i: int, size: int = 16) -> bytes:
    """A small distinct picture: a coloured square at an offset that depends on `i`."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    x = i % (size // 2)
    image.paste(COLORS[i % len(COLORS)], (x, 2, x + size // 2, 2 + size // 2))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """samples: (key, {extension: bytes}) as img2dataset writes them (members grouped by key)."""
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for extension, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _good(shard: int, i: int) -> tuple[str, dict[str, bytes]]:
    key = f"{shard:05d}/{shard:05d}{i:04d}"
    meta = {"key": key, "status": "success", "caption": f"json caption {i}"}
    return key, {
        "jpg": _png(shard * 100 + i),
        "txt": f"a picture {shard} {i}".encode(),
        "json": json.dumps(meta).encode(),
    }


def _shards(root: Path, count: int = 3, per: int = 4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for s in range(count):
        _write_shard(root / f"{s:05d}.tar", [_good(s, i) for i in range(per)])
    return root


def test_brace_expansion():
    assert expand_braces("d/{000..002}.tar") == ["d/000.tar", "d/001.tar", "d/002.tar"]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    assert expand_braces("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    assert expand_braces("x{y}.tar") == ["x{y}.tar"]  # not a range or list: literal, as in the shell
    with pytest.raises(ValueError, match="runs backwards"):
        expand_braces("{5..2}.tar")


def test_brace_and_glob_patterns_read_the_same_samples(tmp_path):
    root = _shards(tmp_path / "data")
    bad = BadInputLog()
    by_brace = read_shards(str(root / "{00000..00002}.tar"), bad)
    by_glob = read_shards(str(root / "*.tar"), bad)
    assert bad.total == 0
    assert by_brace == by_glob and len(by_brace) == 12
    first = by_brace[0]
    assert first.image == f"{root / '00000.tar'}#00000/000000000.jpg"
    assert first.caption == "a picture 0 0" and first.source == "00000.tar"
    with pytest.raises(FileNotFoundError, match="matches no file"):
        shard_paths(str(tmp_path / "nothing-*.tar"))


def test_every_bad_kind_is_counted(tmp_path, clip):
    from fromage.data.dataset import extract_features
    from fromage.data.feature_cache import FeatureCache

    root = tmp_path / "data"
    root.mkdir()
    samples = [
        _good(0, 0),
        ("k/no-image", {"txt": b"a caption", "json": b"{}"}),
        ("k/empty-caption", {"png": _png(1), "txt": b"   "}),
        ("k/json-caption", {"png": _png(2), "json": json.dumps({"caption": "from json"}).encode()}),
        ("k/bad-json", {"png": _png(3), "txt": b"fine", "json": b"{not json"}),
        ("k/latin1", {"png": _png(4), "txt": "caf\xe9".encode("latin-1")}),
        ("k/broken-image", {"jpg": b"\xff\xd8 not a jpeg", "txt": b"broken"}),
    ]
    _write_shard(root / "00000.tar", samples)
    (root / "00002.tar").write_bytes(b"this is not a tar archive" * 100)
    bad = BadInputLog()
    examples = read_shards(str(root / "{00000..00002}.tar"), bad)  # 00001.tar does not exist
    assert dict(bad.counts) == {
        "missing image": 1,
        "missing caption": 1,
        "malformed json": 1,
        "caption not utf-8": 1,
        "missing shard": 1,
        "unreadable tar": 1,
    }
    assert [e.caption for e in examples] == ["a picture 0 0", "from json", "broken"]
    # Undecodable bytes are found where every reader's are: when the image is decoded.
    from fromage.backbones import load_encoder

    encoder = load_encoder(EncoderConfig(name=str(clip), image_size=16))
    split = extract_features(
        examples, encoder, bad, cache=FeatureCache(tmp_path / "cache", encoder.encoder_id)
    )
    assert bad.counts["undecodable image"] == 1 and len(split) == 2


@pytest.mark.parametrize("cut", ["mid-data", "member-boundary", "mid-header", "tiny"])
def test_truncated_shard_is_counted_and_keeps_complete_samples(tmp_path, cut):
    root = tmp_path / "data"
    root.mkdir()
    good = _write_shard(root / "00000.tar", [_good(0, i) for i in range(3)])
    shard = _write_shard(root / "00001.tar", [_good(1, i) for i in range(5)])
    with tarfile.open(shard) as tar:
        last_image = [m for m in tar.getmembers() if m.name.endswith(".jpg")][-1]
        last_json = tar.getmembers()[-1]
    raw = shard.read_bytes()
    end = {
        "mid-data": last_image.offset_data + last_image.size // 2,
        "member-boundary": last_json.offset_data + 512,  # after the last member, no end blocks
        "mid-header": last_image.offset + 100,
        "tiny": 100,
    }[cut]
    shard.write_bytes(raw[:end])
    bad = BadInputLog()
    examples = read_shards(str(root / "*.tar"), bad)
    assert bad.counts["truncated tar"] == 1 and bad.total == 1
    # A cut through a member's data drops its sample; a cut between members drops the last
    # sample (members after the cut might have belonged to it).
    expected_kept = {"mid-data": 4, "member-boundary": 4, "mid-header": 3, "tiny": 0}[cut]
    assert len(examples) == 3 + expected_kept
    assert good.name in {e.source for e in examples}
    for example in examples:  # everything listed is readable
        assert load_image(example.image).size == (16, 16)


def test_member_digest_and_pixels_equal_the_extracted_file(tmp_path):
    root = _shards(tmp_path / "data", count=1)
    member = "00000/000000002.jpg"
    ref = tar_ref(root / "00000.tar", member)
    with tarfile.open(root / "00000.tar") as tar:
        tar.extract(member, tmp_path / "out", filter="data")
    plain = tmp_path / "out" / member
    assert file_digest(ref) == file_digest(plain)
    np.testing.assert_array_equal(np.asarray(load_image(ref)), np.asarray(load_image(plain)))
    with pytest.raises(ImageError, match="no member"):
        load_image(tar_ref(root / "00000.tar", "00000/missing.jpg"))


def test_paths_with_hash_stay_plain_paths(tmp_path):
    root = _shards(tmp_path / "data", count=1)
    # An existing file wins even when the part before `#` is a real shard.
    odd = root / "00000.tar#00000" / "000000002.jpg"
    odd.parent.mkdir()
    odd.write_bytes(_png(5))
    assert split_tar_ref(odd) is None
    assert file_digest(odd) == file_digest_of_bytes(_png(5))
    # `#` in a name with no shard before it is an ordinary file name.
    other = tmp_path / "photo#1.png"
    other.write_bytes(_png(6))
    assert split_tar_ref(other) is None and load_image(other).size == (16, 16)
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing#1.png")


def file_digest_of_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha1(data).hexdigest()


def test_training_examples_from_shards_hold_out_a_stable_share(tmp_path):
    from fromage.data.dataset import build_examples

    root = tmp_path / "a" / "data"
    root.mkdir(parents=True)
    # 400 tiny samples: the ~1% holdout is non-empty.
    for s in range(2):
        _write_shard(
            root / f"{s:05d}.tar",
            [(f"{s}/{i:05d}", {"png": _png(i), "txt": f"c {s} {i}".encode()}) for i in range(200)],
        )
    train, val = build_examples(DataConfig(sources=[str(root / "{00000..00001}.tar")]), BadInputLog())
    ((name, held),) = val.items()
    assert name == "shards-data" and 0 < len(held) < 20
    assert len(train) + len(held) == 400 and not {e.image for e in held} & {e.image for e in train}
    # The same shards elsewhere hold out the same samples.
    moved = tmp_path / "b" / "data"
    shutil.copytree(root, moved)
    _, val_moved = build_examples(DataConfig(sources=[str(moved / "*.tar")]), BadInputLog())
    assert [e.caption for e in val_moved["shards-data"]] == [e.caption for e in held]


def test_shard_features_share_the_cache_with_plain_files(tmp_path, clip):
    from fromage.backbones import load_encoder
    from fromage.data.dataset import extract_features
    from fromage.data.feature_cache import FeatureCache

    root = _shards(tmp_path / "data", count=1)
    with tarfile.open(root / "00000.tar") as tar:
        tar.extractall(tmp_path / "out", filter="data")
    encoder = load_encoder(EncoderConfig(name=str(clip), image_size=16))
    cache = FeatureCache(tmp_path / "cache", encoder.encoder_id)
    bad = BadInputLog()
    from_shard = extract_features(read_shards(str(root / "*.tar"), bad), encoder, bad, cache=cache)
    assert len(cache) == 4
    from fromage.data.examples import Example

    plain = [Example(str(p), "x", "files") for p in sorted((tmp_path / "out").rglob("*.jpg"))]
    from_files = extract_features(plain, encoder, bad, cache=cache)
    assert len(cache) == 4 and bad.total == 0  # nothing new: the same images, the same keys
    direct = encoder.encode([load_image(e.image) for e in plain])
    torch.testing.assert_close(from_shard.features[0], from_files.features[0])
    torch.testing.assert_close(from_shard.features[0], direct, atol=1e-5, rtol=1e-4)


def _cache_contents(home: Path, encoder_id: str) -> dict[str, torch.Tensor]:
    from fromage.data.feature_cache import FeatureCache

    cache = FeatureCache(home / "features", encoder_id)
    keys = sorted(cache._where)
    return dict(zip(keys, cache.get(keys), strict=True))


def test_features_command_fills_the_cache_once(tmp_path, capsys, clip):
    from fromage.backbones import load_encoder
    from fromage.cli import main

    root = _shards(tmp_path / "data", count=3, per=3)
    args = ["features", str(root / "{00000..00002}.tar"), "--encoder", str(clip), "--image-size", "16"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "workers: 1" in out and "images 9;" in out and "encoded 9, cached 0" in out
    cached = _cache_contents(tmp_path / "home", f"hf:{clip}@16")
    encoder = load_encoder(EncoderConfig(name=str(clip), image_size=16))
    examples = read_shards(str(root / "*.tar"), BadInputLog())
    direct = encoder.encode([load_image(e.image) for e in examples])
    stored = torch.stack([cached[f"{file_digest(e.image)}:0"] for e in examples])
    torch.testing.assert_close(stored, direct, atol=1e-5, rtol=1e-4)
    assert main(args) == 0
    assert "encoded 0, cached 9" in capsys.readouterr().out


@pytest.mark.slow  # two spawned workers each import torch and transformers: ~30-60 s on 2 busy cores
def test_features_command_two_processes_write_what_one_does(tmp_path, monkeypatch, capsys, clip):
    from fromage.cli import main

    root = _shards(tmp_path / "data", count=3, per=3)
    pattern = str(root / "{00000..00002}.tar")
    args = ["features", pattern, "--encoder", str(clip), "--image-size", "16", "--views", "1"]
    homes = {}
    for processes in (1, 2):
        homes[processes] = tmp_path / f"home{processes}"
        monkeypatch.setenv("FROMAGE_HOME", str(homes[processes]))
        assert main([*args, "--num-processes", str(processes)]) == 0
        out = capsys.readouterr().out
        assert f"workers: {processes}" in out and "encoded 18, cached 0" in out
    encoder_id = f"hf:{clip}@16"
    one, two = _cache_contents(homes[1], encoder_id), _cache_contents(homes[2], encoder_id)
    assert len(one) == 18 and one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key])
    # Each worker wrote its own cache shards (workers 0 and 1 took shards 0, 2 and 1).
    assert len(list((homes[2] / "features").rglob("*.safetensors"))) >= 2


def test_train_and_index_from_shards(tiny_world, tmp_path):  # noqa: F811
    from fromage.apps.indexing import index_collection
    from fromage.index.store import ImageIndex
    from fromage.training.loop import train

    root = tiny_world / "images"
    samples = []
    for i, png in enumerate(sorted(root.glob("*.png"))):
        caption = "a " + png.stem.replace("_", " ")
        samples.append((f"0/{i:03d}", {"png": png.read_bytes(), "txt": caption.encode()}))
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "00000.tar", samples[:3])
    _write_shard(shards / "00001.tar", samples[3:])
    pattern = str(shards / "{00000..00001}.tar")
    config = tiny_config(tiny_world, tmp_path / "run", max_steps=2, refine_steps=0)
    config.data.sources = [pattern]
    result = train(config)
    from fromage.checkpoint import load_encoder_config as encoder_of_checkpoint

    assert encoder_of_checkpoint(result.checkpoint) == config.model.encoder
    assert encoder_of_checkpoint().name == "efficientnet-lite0"  # the shipped model's
    report = index_collection(pattern, result.checkpoint, tmp_path / "idx")
    assert (report.total, report.added) == (6, 6)
    index = ImageIndex.load(tmp_path / "idx")
    refs = [m["path"] for m in index.metadata]
    assert all(split_tar_ref(r) is not None for r in refs)
    # The index's digests are those of the plain files the shards were made from.
    assert sorted(m["digest"] for m in index.metadata) == sorted(file_digest(p) for p in root.glob("*.png"))
