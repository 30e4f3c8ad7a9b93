"""Tiny benchmark files in the official VIST and VisDial v1.0 formats, for loader and CLI tests.

Field names and nesting are those of the published files (sources in
`fromage/evaluate/formats.py`), extra official fields included; the values are synthetic and
deterministic. Every image is a 32 px drawing of one coloured shape on light grey, and the
captions, questions and answers name that colour and shape, so a model could in principle
solve the tasks. Each writer also leaves out one image so that skip counting is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 32
BACKGROUND = (235, 235, 235)
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
    "black": (20, 20, 20),
    "pink": (240, 120, 180),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("square", "circle", "triangle")


def draw_shape(colour: str, shape: str) -> Image.Image:
    """A (32, 32) RGB image of one filled shape."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    if shape == "square":
        draw.rectangle((6, 6, 25, 25), fill=fill)
    elif shape == "circle":
        draw.ellipse((5, 5, 26, 26), fill=fill)
    else:
        draw.polygon([(16, 4), (28, 27), (4, 27)], fill=fill)
    return image


def _scene(n: int) -> tuple[str, str]:
    # Distinct (colour, shape) for the first 24 images, then it repeats.
    return COLOUR_NAMES[n % len(COLOUR_NAMES)], SHAPES[(n // len(COLOUR_NAMES)) % len(SHAPES)]


# --------------------------------------------------------------------------- VIST


def vist_scene(story: int, position: int) -> tuple[str, str]:
    """(colour, shape) of the image at 0-based `position` of fixture story number `story`."""
    return _scene(5 * story + position)


def vist_story_id(story: int) -> str:
    return str(45530 + story)


def vist_photo_id(story: int, position: int) -> str:
    return str(1741642 + 10 * story + position)


def write_vist_fixture(tmp_path: Path, n_stories: int = 3) -> tuple[Path, Path]:
    """Write a VIST val split: `(json_path, image_dir)`.

    `json_path` is `tmp_path/vist/sis/val.story-in-sequence.json`; images are
    `tmp_path/vist/images/{photo_flickr_id}.jpg` (the last image of story 0 is a `.png`).
    The file holds `n_stories` complete stories plus one more (number `n_stories`) whose
    third image is not written. Each story's storylets are listed out of order, so a loader
    must sort by "worker_arranged_photo_order". Story `s`, position `k` shows
    `vist_scene(s, k)`; "original_text" reads "We saw a red square." and "text" is the VIST
    lower-cased, tokenised form "we saw a red square ."
    """
    root = Path(tmp_path) / "vist"
    sis_dir, image_dir = root / "sis", root / "images"
    sis_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)

    albums, images, annotations = [], [], []
    for s in range(n_stories + 1):
        album_id = str(44277 + s)
        albums.append(
            {
                "description": f"Synthetic album {s} of coloured shapes.",
                "title": f"Shapes {s}",
                "farm": "1",
                "date_update": "1396811566",
                "primary": vist_photo_id(s, 0),
                "server": "2",
                "date_create": album_id,
                "photos": "5",
                "secret": "3f374c96e5",
                "owner": "37996585435@N01",
                "vist_label": "shapes",
                "id": album_id,
            }
        )
        for k in range(5):
            colour, shape = vist_scene(s, k)
            photo = vist_photo_id(s, k)
            ext = ".png" if (s, k) == (0, 4) else ".jpg"
            images.append(
                {
                    "datetaken": f"2004-11-27 10:4{k}:46",
                    "license": "1",
                    "title": f"{colour} {shape}",
                    "text": "",
                    "album_id": album_id,
                    "longitude": "-0.212688",
                    "url_o": f"https://farm1.staticflickr.com/2/{photo}_81837e8e9e_o{ext}",
                    "secret": "81837e8e9e",
                    "media": "photo",
                    "latitude": "51.920449",
                    "id": photo,
                    "tags": f"{colour} {shape}",
                }
            )
            if not (s == n_stories and k == 2):
                draw_shape(colour, shape).save(image_dir / f"{photo}{ext}")
        # List the storylets in the order 0, 3, 1, 4, 2 (shifted per story), not sorted.
        for k in ((3 * j + s) % 5 for j in range(5)):
            colour, shape = vist_scene(s, k)
            annotations.append(
                [
                    {
                        "original_text": f"We saw a {colour} {shape}.",
                        "album_id": album_id,
                        "photo_flickr_id": vist_photo_id(s, k),
                        "setting": "first-2-pick-and-tell",
                        "worker_id": "FJROI8NWDRIPAM1",
                        "story_id": vist_story_id(s),
                        "tier": "story-in-sequence",
                        "worker_arranged_photo_order": k,
                        "text": f"we saw a {colour} {shape} .",
                        "storylet_id": str(227650 + 5 * s + k),
                    }
                ]
            )
    sis = {
        "info": {"version": "1", "date_created": "2016-04-01"},
        "images": images,
        "albums": albums,
        "type": "story_in_sequence",
        "annotations": annotations,
    }
    json_path = sis_dir / "val.story-in-sequence.json"
    json_path.write_text(json.dumps(sis, indent=1))
    return json_path, image_dir


# --------------------------------------------------------------------------- VisDial


def visdial_scene(dialog: int) -> tuple[str, str]:
    """(colour, shape) of fixture dialogue number `dialog`."""
    return _scene(dialog)


def visdial_image_id(dialog: int) -> int:
    return 185565 + dialog


def visdial_dense_round_id(dialog: int, rounds: int = 10) -> int:
    """The 1-based `round_id` the dense file annotates for fixture dialogue `dialog`."""
    return (3 * dialog + 4) % rounds + 1


def _visdial_round(r: int, colour: str, shape: str, other: str) -> tuple[str, str]:
    """(question without "?", answer) for round r of a dialogue about one shape."""
    return [
        ("what colour is the shape", colour),
        (f"is it a {shape}", "yes"),
        (f"is it {other}", "no"),
        ("what shape is it", f"a {shape}"),
        ("is there anything else in the picture", f"no , only the {shape}"),
        ("what colour is the background", "light grey"),
        (f"is the {shape} large", "yes , it fills most of the picture"),
        ("is the picture in colour", "yes"),
        ("how many shapes are there", "one"),
        ("is it a photo", "no , a drawing"),
    ][r]


def write_visdial_fixture(
    tmp_path: Path, n_dialogs: int = 3, rounds: int = 10, options: int = 100
) -> tuple[Path, Path, Path]:
    """Write a VisDial v1.0 val split: `(json_path, image_dir, dense_json_path)`.

    Files: `tmp_path/visdial/visdial_1.0_val.json`,
    `tmp_path/visdial/VisualDialog_val2018/VisualDialog_val2018_{image_id:012d}.jpg`, and
    `tmp_path/visdial/visdial_1.0_val_dense_annotations.json`. There are `n_dialogs`
    dialogues with images plus one more (number `n_dialogs`) whose image is not written; each
    has `rounds` rounds (at most 10) of `options` answer options, the true one at
    `gt_index`. The dense file, aligned with the dialogues as in the official release,
    annotates the 1-based round `visdial_dense_round_id(d, rounds)` of dialogue `d` with
    "gt_relevance" 1.0 for the true option, 0.4 for the option after it, 0.0 elsewhere.
    """
    if not 1 <= rounds <= 10:
        raise ValueError(f"VisDial dialogues have 1..10 rounds, got {rounds}")
    if options < 2:
        raise ValueError(f"need at least 2 answer options, got {options}")
    root = Path(tmp_path) / "visdial"
    image_dir = root / "VisualDialog_val2018"
    image_dir.mkdir(parents=True, exist_ok=True)

    questions: list[str] = []
    answers: list[str] = []

    def index(table: list[str], text: str) -> int:
        if text not in table:
            table.append(text)
        return table.index(text)

    scripts = []
    for d in range(n_dialogs + 1):
        colour, shape = visdial_scene(d)
        other = COLOUR_NAMES[(COLOUR_NAMES.index(colour) + 1) % len(COLOUR_NAMES)]
        qa = [_visdial_round(r, colour, shape, other) for r in range(rounds)]
        scripts.append([(index(questions, q), index(answers, a)) for q, a in qa])
    for name in COLOUR_NAMES + SHAPES:
        index(answers, name)
    filler = 0
    while len(answers) < options:  # distractors, so every round can have `options` distinct ones
        index(answers, f"i can not tell , sorry ({filler})")
        filler += 1

    dialogs, dense = [], []
    for d, script in enumerate(scripts):
        colour, shape = visdial_scene(d)
        image_id = visdial_image_id(d)
        turns, gt_indices = [], []
        for r, (q, a) in enumerate(script):
            start = (11 * d + 5 * r) % len(answers)
            ring = [(start + j) % len(answers) for j in range(len(answers))]
            distractors = [i for i in ring if i != a][: options - 1]
            gt_index = (7 * d + 3 * r) % options
            answer_options = distractors[:gt_index] + [a] + distractors[gt_index:]
            turns.append({"question": q, "answer": a, "answer_options": answer_options, "gt_index": gt_index})
            gt_indices.append(gt_index)
        dialogs.append(
            {"image_id": image_id, "caption": f"a {colour} {shape} on a grey background", "dialog": turns}
        )
        round_id = visdial_dense_round_id(d, rounds)
        dense_gt = gt_indices[round_id - 1]
        relevance = [0.0] * options
        relevance[dense_gt] = 1.0
        relevance[(dense_gt + 1) % options] = 0.4
        dense.append({"image_id": image_id, "round_id": round_id, "gt_relevance": relevance})
        if d < n_dialogs:
            draw_shape(colour, shape).save(image_dir / f"VisualDialog_val2018_{image_id:012d}.jpg")

    visdial = {
        "version": "1.0",
        "split": "val2018",  # as the official file says it
        "data": {"questions": questions, "answers": answers, "dialogs": dialogs},
    }
    json_path = root / "visdial_1.0_val.json"
    json_path.write_text(json.dumps(visdial))
    dense_path = root / "visdial_1.0_val_dense_annotations.json"
    dense_path.write_text(json.dumps(dense))
    return json_path, image_dir, dense_path
