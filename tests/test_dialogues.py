"""easy-VQA labels (questions and pixels), dialogues built from them, and how the recipe uses
them (captioning-pass questions, retrieval-refinement dialogues)."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image, ImageDraw

from fromage.data.builtin import QAFacts, determined_by, pixel_color_shape, qa_facts
from fromage.data.dialogues import determining_dialogue, format_round, format_rounds, random_dialogue

QA = (
    ("what is the color of the shape?", "red"),
    ("does the image contain a circle?", "no"),
    ("is there a blue shape?", "no"),
    ("is there not a black shape?", "yes"),
)


@pytest.mark.parametrize(
    ("question", "answer", "facts"),
    [
        ("what color is the triangle?", "teal", QAFacts(color="teal", shape="triangle")),
        ("what is the blue shape?", "circle", QAFacts(color="blue", shape="circle")),
        ("is there a red shape?", "yes", QAFacts(color="red")),
        ("is there a red shape?", "no", QAFacts(not_color="red")),
        ("is there not a circle in the image?", "yes", QAFacts(not_shape="circle")),
        ("does the image not contain a gray shape?", "no", QAFacts(color="gray")),
        # The form the earlier parser missed: "is no X present?" is negated too.
        ("is no blue shape present?", "yes", QAFacts(not_color="blue")),
        ("is no rectangle present?", "no", QAFacts(shape="rectangle")),
    ],
)
def test_every_easyvqa_question_form_is_parsed(question, answer, facts):
    assert qa_facts(question, answer) == facts


def test_answers_determine_colour_and_shape_also_through_exclusions():
    assert determined_by(QA) == ("red", None)  # only the circle is ruled out
    assert determined_by([*QA, ("is no triangle present?", "yes")]) == ("red", "rectangle")
    assert determined_by([*QA, ("is there a rectangle?", "yes")]) == ("red", "rectangle")
    only_exclusions = [("is there a circle?", "no"), ("is no triangle present?", "yes")]
    assert determined_by(only_exclusions) == (None, "rectangle")
    with pytest.raises(ValueError, match="unknown easy-VQA answer"):
        qa_facts("what is it?", "purple")


def _draw(colour, shape, size=64):
    image = Image.new("RGB", (size, size), (240, 245, 238))
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((10, 14, 40, 44), fill=colour)
    elif shape == "rectangle":
        draw.rectangle((12, 8, 50, 30), fill=colour)
    else:
        draw.polygon([(32, 6), (58, 50), (6, 50)], fill=colour)
    return image


@pytest.mark.parametrize(
    ("rgb", "name", "shape"),
    [
        ((255, 0, 0), "red", "circle"),
        ((0, 128, 128), "teal", "rectangle"),
        ((165, 42, 42), "brown", "triangle"),
    ],
)
def test_pixels_give_colour_and_shape(tmp_path, rgb, name, shape):
    path = tmp_path / "shape.png"
    _draw(rgb, shape).save(path)
    assert pixel_color_shape(path) == (name, shape)


def test_an_image_without_a_palette_colour_is_refused(tmp_path):
    path = tmp_path / "odd.png"
    _draw((12, 34, 56), "circle").save(path)
    with pytest.raises(ValueError, match="no easy-VQA palette colour"):
        pixel_color_shape(path)


def test_determining_dialogues_pin_the_image_down_in_two_to_four_rounds():
    qa = (*QA, ("is there a rectangle?", "yes"), ("what shape is present?", "rectangle"))
    rng = random.Random(0)
    for _ in range(50):
        dialogue = determining_dialogue(qa, rng)
        assert dialogue is not None and 2 <= len(dialogue.rounds) <= 4
        assert determined_by(dialogue.rounds) == ("red", "rectangle")
        assert set(dialogue.rounds) <= set(qa)
    assert determining_dialogue(QA, rng) is None  # the shape is never settled


def test_round_format_is_the_visdial_query_form():
    assert format_round("what color is it", "red") == "Q: what color is it? A: red."
    assert format_rounds([("is it big?", "no"), ("what shape?", "circle")]) == (
        "Q: is it big? A: no. Q: what shape? A: circle."
    )
    rng = random.Random(1)
    assert all(len(random_dialogue(QA, rng, max_rounds=1).rounds) == 1 for _ in range(10))
    with pytest.raises(ValueError, match="no question/answer pairs"):
        random_dialogue((), rng)


def test_captioning_pass_reads_questions_at_the_configured_share():
    from fromage.training.step import pick_caption_texts

    texts = [[1], [2], [3]]
    forms = [[[10], [11]], [], [[30]]]
    context = [[5, 6], [], [7]]
    generator = torch.Generator().manual_seed(0)
    idx = [0, 1, 2] * 200
    never, skip = pick_caption_texts(texts, forms, idx, 0.0, generator, context)
    assert never == [texts[i] for i in idx] and skip == [0] * len(idx)
    always, skip = pick_caption_texts(texts, forms, idx, 1.0, generator, context)
    assert all(t in forms[i] for t, i in zip(always, idx, strict=True) if forms[i])
    assert [t for t, i in zip(always, idx, strict=True) if i == 1] == [[2]] * 200  # no forms: caption
    assert {tuple(t) for t, i in zip(always, idx, strict=True) if i == 0} == {(10,), (11,)}
    # Each dialogue comes with its own context length; captions have none.
    expected = {10: 5, 11: 6, 30: 7, 2: 0}
    assert all(n == expected[t[0]] for t, n in zip(always, skip, strict=True))
    half, _ = pick_caption_texts(texts, forms, idx, 0.5, generator)
    share = sum(t != texts[i] for t, i in zip(half, idx, strict=True) if i == 2) / 200
    assert 0.35 < share < 0.65


def test_answer_only_dialogues_predict_the_last_answer_as_a_prompt_tokenises_it():
    from fromage.backbones import load_tokenizer
    from fromage.config import LMConfig
    from fromage.data.dialogues import Dialogue
    from fromage.training.texts import _dialogue_ids

    tokenizer = load_tokenizer(LMConfig())
    d = Dialogue((("what color is the shape?", "red"), ("is there a circle?", "no")))
    (ids,), (n,) = _dialogue_ids(tokenizer, [d], True, 64)
    prompt = "Q: what color is the shape? A: red. Q: is there a circle? A:"
    assert ids[:n] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[n:]) == " no."
    whole, none = _dialogue_ids(tokenizer, [d], False, 64)
    assert none == [0] and tokenizer.decode(whole[0]) == d.text()
    (cut,), (m,) = _dialogue_ids(tokenizer, [d], True, 8)  # the context is cut from the left
    assert cut[m:] == ids[n:] and cut[:m] == ids[n - 8 : n]


def test_refinement_reads_dialogues_for_images_with_questions_and_requests_otherwise():
    from fromage.config import TrainConfig
    from fromage.data.examples import Example
    from fromage.training.texts import retrieval_variants

    class Tok:
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[len(w) for w in t.split()] for t in texts]}

    qa = (*QA, ("is there a rectangle?", "yes"))
    config = TrainConfig()
    config.data.qa_retrieval_forms = 3
    config.data.request_forms = 1
    examples = [
        Example("a.png", "a red rectangle", "easyvqa", "x", qa),
        Example("b.png", "red apple", "emoji"),
    ]
    variants, shares = retrieval_variants(examples, Tok(), config)
    assert len(variants[0]) == 3 and shares[0] == config.data.qa_retrieval_share
    assert len(variants[1]) == 1 and shares[1] == config.data.request_share


@pytest.mark.slow
def test_pixel_labels_agree_with_every_question_labelled_easyvqa_image():
    from fromage.data.builtin import easyvqa_images

    checked = 0
    for split in ("train", "test"):
        for item in easyvqa_images(split):
            if determined_by(item.qa) == (item.color, item.shape):  # the questions settle both
                assert pixel_color_shape(item.image) == (item.color, item.shape), item.image
                checked += 1
    assert checked > 4400  # of 5,000; the rest are labelled from pixels alone
