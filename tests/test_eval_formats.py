"""Benchmark file loaders on tiny files written in the official formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fromage.evaluate.formats import (
    FormatError,
    load_visdial,
    load_visdial_dense,
    load_vist,
)
from tests.eval_fixtures import (
    visdial_dense_round_id,
    visdial_image_id,
    visdial_scene,
    vist_photo_id,
    vist_scene,
    vist_story_id,
    write_visdial_fixture,
    write_vist_fixture,
)


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------- VIST


def test_vist_loads_stories_sorted_by_photo_order(tmp_path):
    json_path, image_dir = write_vist_fixture(tmp_path, n_stories=3)
    raw = json.loads(json_path.read_text())["annotations"]
    file_order = [a[0]["worker_arranged_photo_order"] for a in raw[:5]]
    assert file_order != sorted(file_order)  # the fixture really lists them shuffled

    data = load_vist(json_path, image_dir)
    assert [s.story_id for s in data.stories] == [vist_story_id(s) for s in range(3)]
    for s, story in enumerate(data.stories):
        assert story.captions == tuple("we saw a {} {} .".format(*vist_scene(s, k)) for k in range(5))
        assert story.image_ids == tuple(vist_photo_id(s, k) for k in range(5))
        assert [p.stem for p in story.images] == list(story.image_ids)
        assert all(p.is_file() for p in story.images)
    assert data.stories[0].images[4].suffix == ".png"  # found by trying extensions


def test_vist_counts_the_story_with_a_missing_image(tmp_path):
    data = load_vist(*write_vist_fixture(tmp_path, n_stories=3))
    assert data.skipped == {"stories_missing_image": 1, "images_missing": 1}
    story_skips = sum(n for reason, n in data.skipped.items() if reason.startswith("stories_"))
    assert len(data.stories) + story_skips == 4  # every story in the file is accounted for
    # FROMAGe's pool: every referenced image on disk, the skipped story's four included.
    assert len(data.candidates) == 4 * 5 - 1
    assert vist_photo_id(3, 0) in data.candidates
    assert vist_photo_id(3, 2) not in data.candidates


def test_vist_text_field_switch(tmp_path):
    json_path, image_dir = write_vist_fixture(tmp_path, n_stories=1)
    data = load_vist(json_path, image_dir, text_field="original_text")
    assert data.stories[0].captions[0] == "We saw a {} {}.".format(*vist_scene(0, 0))
    with pytest.raises(ValueError, match="text_field"):
        load_vist(json_path, image_dir, text_field="caption")


def test_vist_wrong_length_and_bad_order_are_counted(tmp_path):
    json_path, image_dir = write_vist_fixture(tmp_path, n_stories=3)

    def change(sis):
        story0 = [a for a in sis["annotations"] if a[0]["story_id"] == vist_story_id(0)]
        sis["annotations"].remove(story0[0])
        for a in sis["annotations"]:
            if a[0]["story_id"] == vist_story_id(1):
                a[0]["worker_arranged_photo_order"] = 0

    _edit(json_path, change)
    data = load_vist(json_path, image_dir)
    assert [s.story_id for s in data.stories] == [vist_story_id(2)]
    assert data.skipped == {
        "stories_wrong_length": 1,
        "stories_bad_order": 1,
        "stories_missing_image": 1,
        "images_missing": 1,
    }


def test_vist_split_subfolder_and_extension_preference(tmp_path):
    json_path, image_dir = write_vist_fixture(tmp_path, n_stories=1)
    (image_dir / "val").mkdir()
    moved = image_dir / f"{vist_photo_id(0, 1)}.jpg"
    moved.rename(image_dir / "val" / moved.name)
    first = image_dir / f"{vist_photo_id(0, 0)}.jpg"
    (image_dir / f"{vist_photo_id(0, 0)}.gif").write_bytes(first.read_bytes())

    story = load_vist(json_path, image_dir).stories[0]
    assert story.images[1] == image_dir / "val" / moved.name
    assert story.images[0] == first


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sis: sis.pop("annotations"), "missing key 'annotations'"),
        (lambda sis: sis["annotations"].__setitem__(0, sis["annotations"][0][0]), r"annotations\[0\]"),
        (lambda sis: sis["annotations"][1].append({}), r"annotations\[1\].*length 2"),
        (lambda sis: sis["annotations"][2][0].pop("photo_flickr_id"), "missing key 'photo_flickr_id'"),
        (lambda sis: sis["annotations"][0][0].__setitem__("worker_arranged_photo_order", "0"), "integer"),
    ],
)
def test_vist_malformed_files_raise_naming_the_file(tmp_path, change, message):
    json_path, image_dir = write_vist_fixture(tmp_path, n_stories=1)
    _edit(json_path, change)
    with pytest.raises(FormatError, match=message) as info:
        load_vist(json_path, image_dir)
    assert str(json_path) in str(info.value)


def test_vist_bad_json_and_missing_image_dir(tmp_path):
    json_path, image_dir = write_vist_fixture(tmp_path, n_stories=1)
    with pytest.raises(NotADirectoryError):
        load_vist(json_path, tmp_path / "nowhere")
    json_path.write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        load_vist(json_path, image_dir)


# --------------------------------------------------------------------------- VisDial


def test_visdial_loads_dialogues_and_counts_the_missing_image(tmp_path):
    json_path, image_dir, _ = write_visdial_fixture(tmp_path, n_dialogs=3)
    data = load_visdial(json_path, image_dir)
    assert data.split == "val2018"  # as the official file says it
    assert data.skipped == {"dialogs_missing_image": 1}
    assert [d.image_id for d in data.dialogs] == [visdial_image_id(d) for d in range(3)]
    for d, dialog in enumerate(data.dialogs):
        colour, shape = visdial_scene(d)
        assert dialog.image.name == f"VisualDialog_val2018_{dialog.image_id:012d}.jpg"
        assert colour in dialog.caption and shape in dialog.caption
        assert len(dialog.rounds) == 10
        assert dialog.rounds[0].answer == colour
        for rnd in dialog.rounds:
            assert len(rnd.options) == 100 and len(set(rnd.options)) == 100
            assert rnd.options[rnd.gt_index] == rnd.answer
            assert not rnd.question.endswith("?")


def test_visdial_fixture_sizes(tmp_path):
    json_path, image_dir, dense_path = write_visdial_fixture(tmp_path, n_dialogs=2, rounds=3, options=5)
    data = load_visdial(json_path, image_dir)
    assert [len(d.rounds) for d in data.dialogs] == [3, 3]
    assert {len(r.options) for d in data.dialogs for r in d.rounds} == {5}
    assert {len(v) for v in load_visdial_dense(dense_path).values()} == {5}


def test_visdial_rounds_without_ground_truth_skip_the_dialogue(tmp_path):
    json_path, image_dir, _ = write_visdial_fixture(tmp_path, n_dialogs=3)

    def change(vd):  # the test split: last round has options but no answer, no gt_index
        vd["split"] = "val"
        last = vd["data"]["dialogs"][0]["dialog"][-1]
        del last["answer"], last["gt_index"]

    _edit(json_path, change)
    data = load_visdial(json_path, image_dir)
    assert len(data.dialogs) == 2
    assert data.skipped == {"dialogs_without_ground_truth": 1, "dialogs_missing_image": 1}


def test_visdial_image_names_pattern_and_train_split(tmp_path):
    json_path, image_dir, _ = write_visdial_fixture(tmp_path, n_dialogs=2)
    for p in image_dir.iterdir():
        image_id = int(p.stem.rsplit("_", 1)[1])
        p.rename(image_dir / f"{image_id}.jpg")
    assert load_visdial(json_path, image_dir).skipped == {"dialogs_missing_image": 3}
    data = load_visdial(json_path, image_dir, image_pattern="{image_id}.jpg")
    assert len(data.dialogs) == 2
    with pytest.raises(ValueError, match="image_id"):
        load_visdial(json_path, image_dir, image_pattern="fixed.jpg")

    # train: COCO names, in a train2014/ or val2014/ sub-folder of the image directory.
    _edit(json_path, lambda vd: vd.__setitem__("split", "train"))
    (image_dir / "train2014").mkdir()
    (image_dir / f"{visdial_image_id(0)}.jpg").rename(
        image_dir / "train2014" / f"COCO_train2014_{visdial_image_id(0):012d}.jpg"
    )
    (image_dir / f"{visdial_image_id(1)}.jpg").rename(
        image_dir / f"COCO_val2014_{visdial_image_id(1):012d}.jpg"
    )
    data = load_visdial(json_path, image_dir)
    assert [d.image.parent.name for d in data.dialogs] == ["train2014", image_dir.name]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda vd: vd.pop("data"), "missing key 'data'"),
        (lambda vd: vd["data"]["dialogs"].__setitem__(0, []), r"data.dialogs\[0\]: expected an object"),
        (
            lambda vd: vd["data"]["dialogs"][1]["dialog"][2].__setitem__("answer", 10**6),
            "outside data.answers",
        ),
        (lambda vd: vd["data"]["dialogs"][0]["dialog"][0].pop("question"), "missing key 'question'"),
        (
            lambda vd: vd["data"]["dialogs"][0]["dialog"][3].__setitem__(
                "gt_index", (vd["data"]["dialogs"][0]["dialog"][3]["gt_index"] + 1) % 100
            ),
            "but the round's answer",
        ),
    ],
)
def test_visdial_malformed_files_raise_naming_the_file(tmp_path, change, message):
    json_path, image_dir, _ = write_visdial_fixture(tmp_path, n_dialogs=2)
    _edit(json_path, change)
    with pytest.raises(FormatError, match=message) as info:
        load_visdial(json_path, image_dir)
    assert str(json_path) in str(info.value)


# --------------------------------------------------------------------------- dense


def test_visdial_dense_round_id_is_one_based(tmp_path):
    json_path, image_dir, dense_path = write_visdial_fixture(tmp_path, n_dialogs=3)
    dense = load_visdial_dense(dense_path)
    assert len(dense) == 4  # aligned with every dialogue, the image-less one too
    dialogs = {d.image_id: d for d in load_visdial(json_path, image_dir).dialogs}
    for d in range(3):
        r = visdial_dense_round_id(d) - 1
        relevance = dense[(visdial_image_id(d), r)]
        assert len(relevance) == 100
        assert relevance[dialogs[visdial_image_id(d)].rounds[r].gt_index] == 1.0


def test_visdial_dense_train_key_and_errors(tmp_path):
    _, _, dense_path = write_visdial_fixture(tmp_path, n_dialogs=1)
    _edit(dense_path, lambda dense: [e.__setitem__("relevance", e.pop("gt_relevance")) for e in dense])
    assert set(load_visdial_dense(dense_path)) == {
        (visdial_image_id(d), visdial_dense_round_id(d) - 1) for d in range(2)
    }

    for change, message in [
        (lambda dense: dense[0].__setitem__("round_id", 0), r"\[0\].round_id: 0 outside 1..10"),
        (lambda dense: dense[1].pop("relevance"), "missing key 'gt_relevance' or 'relevance'"),
        (lambda dense: dense.append(dict(dense[0])), "second entry"),
        (lambda dense: dense[0]["relevance"].__setitem__(3, "high"), r"relevance\[3\]: expected a number"),
    ]:
        _, _, dense_path = write_visdial_fixture(tmp_path, n_dialogs=1)
        _edit(dense_path, lambda dense: [e.__setitem__("relevance", e.pop("gt_relevance")) for e in dense])
        _edit(dense_path, change)
        with pytest.raises(FormatError, match=message) as info:
            load_visdial_dense(dense_path)
        assert str(dense_path) in str(info.value)


def test_fixtures_are_deterministic(tmp_path):
    for write in (write_vist_fixture, write_visdial_fixture):
        first, second = write(tmp_path / "a"), write(tmp_path / "b")
        for a, b in zip(first, second, strict=True):
            files_a = sorted(p for p in a.rglob("*") if p.is_file()) if a.is_dir() else [a]
            files_b = sorted(p for p in b.rglob("*") if p.is_file()) if b.is_dir() else [b]
            assert [p.name for p in files_a] == [p.name for p in files_b]
            assert all(x.read_bytes() == y.read_bytes() for x, y in zip(files_a, files_b, strict=True))
