"""BLEU / CIDEr-D / tokenisation against hand-worked examples and pycocoevalcap's own numbers."""

import math

import pytest

from fromage.evaluate.textmetrics import bleu, cider, tokenize

# Pairs produced by coco-caption's tokenizer itself: pycocoevalcap 1.2's PTBTokenizer (Stanford
# CoreNLP 3.4.1 under Java, -lowerCase) followed by its punctuation filter.
PTB_PAIRS = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("The dog's ball is red, isn't it?", "the dog 's ball is red is n't it"),
    (
        'Two people (a man and a woman) standing "near" the colour-coded sign!',
        "two people -lrb- a man and a woman -rrb- standing near the colour-coded sign",
    ),
    ("I can't believe it's $5.50 -- or 50% off...", "i ca n't believe it 's $ 5.50 or 50 % off"),
    ("She said: 'hello'; then left.", "she said hello then left"),
    (
        "A black-and-white photo of the U.S. flag at 3:00 pm.",
        "a black-and-white photo of the u.s. flag at 3:00 pm",
    ),
    (
        "They're gonna eat pizza & drink soda, won't they?",
        "they 're gon na eat pizza & drink soda wo n't they",
    ),
    ("Mr. Smith's 2 cats ran away", "mr. smith 's 2 cats ran away"),
    ("He cannot go. We'll see.", "he can not go we 'll see"),
    ("I'd go, you'd've gone", "i 'd go you 'd 've gone"),
    ("what is that?!", "what is that ?!"),
    ("wow!!! really?? ok!?", "wow !!! really ?? ok !?"),
    ("[a] {b}", "-lsb- a -rsb- -lcb- b -rcb-"),
    ("1,000 people and 3.5 cats at 10.30", "1,000 people and 3.5 cats at 10.30"),
    ("rock 'n' roll at 5 o'clock in the '90s", "rock 'n' roll at 5 o'clock in the '90s"),
    ("caf\u00e9 \u2014 em dash\u2026 ellipsis", "caf\u00e9 em dash ellipsis"),
    ("x--y co-op a.b end .", "x y co-op a.b end"),
    ("it's the dogs' bone", "it 's the dogs bone"),
    ("\"quoted\" and ''double'' and ``latex''", "quoted and double and latex"),
    ("it is 5'10\" tall", "it is 5 10 tall"),
    ("Smith & Wesson's AT&T", "smith & wesson 's at&t"),
    ("USA. U.S.A. u.s", "usa u.s.a. u.s"),
    ("N.Y.C. subway at 5 p.m.", "n.y.c. subway at 5 p.m."),
    ("A pizza w/ cheese and a/b 1/2", "a pizza w / cheese and a/b 1/2"),
    ("the cats' toys near the St. Louis arch", "the cats toys near the st. louis arch"),
    ("#1 fan", "# 1 fan"),
]


@pytest.mark.parametrize("text, expected", PTB_PAIRS)
def test_tokenize_matches_the_java_ptb_tokenizer(text, expected):
    assert " ".join(tokenize(text)) == expected


def test_tokenize_known_difference_symbol_led_words():
    # PTB keeps "#hashtag" and "@user" whole; we split the symbol off (documented in tokenize).
    assert tokenize("#hashtag @user") == ["#", "hashtag", "@", "user"]


# Four corpora scored by pycocoevalcap 1.2 (pip wheel, run once in a throwaway venv with Java):
# its PTBTokenizer on the raw captions, then Bleu(4).compute_score and Cider().compute_score. We
# tokenise with our own tokenize, which yields the same tokens for these captions, so the
# comparison is end to end. "guitar" is the example corpus of helloMickey/caption_eval's README.
PYCOCOEVALCAP_1_2 = {
    "guitar": (
        [
            ["the man is playing a guitar", "a man is playing a guitar"],
            [
                "a woman is slicing cucumbers",
                "the woman is slicing cucumbers",
                "a woman is cutting cucumbers",
            ],
        ],
        ["man is playing guitar", "a woman is cutting vegetables"],
        [0.711766580212326, 0.638042834868279, 0.5804707570883624, 0.47799953528030814],
        4.016678075227614,
    ),
    "coco_like": (
        [
            [
                "A man riding a wave on top of a surfboard.",
                "A surfer rides a large wave in the ocean.",
                "a person on a surfboard riding a wave",
                "A man surfing on a big wave.",
            ],
            [
                "Two dogs playing in the snow.",
                "A couple of dogs running through the snow!",
                "two brown dogs play together outside in snow",
            ],
            [
                "A plate of food with broccoli, rice and meat.",
                "A dinner plate with rice, meat and some broccoli.",
                "Food on a white plate: broccoli, rice, and beef.",
                "a plate with meat , rice and vegetables",
                "A meal of rice and broccoli.",
            ],
            ["A cat sitting on top of a TV.", "The cat's lying on the television.", "a cat on a tv"],
            [
                "A yellow fire hydrant next to the street.",
                "A fire hydrant on a sidewalk near a road.",
                "yellow hydrant by the road",
            ],
        ],
        [
            "A man riding a wave on a surfboard.",
            "two dogs dogs dogs in the snow",
            "A plate of rice and broccoli.",
            "A cat that's sitting on a TV.",
            "A red car parked on the street.",
        ],
        [0.8333333332870371, 0.7332355750643885, 0.5913408790723012, 0.4454906578150249],
        2.109478285038044,
    ),
    "empty_and_short": (
        [
            ["a dog on a couch", "a brown dog sleeping on a sofa"],
            ["a red bus", "a big red bus on the road"],
            ["people at a market", "many people shopping in a market"],
        ],
        ["", "bus", "people shopping in a busy market"],
        [0.3153252351997149, 0.2638200196415194, 0.23393597120610954, 0.19905304269281307],
        1.5243111980813875,
    ),
    "shared_ngrams": (
        [
            ["a photo of a cat", "a photo of a small cat on a bed"],
            ["a photo of a dog", "a photo of two dogs"],
            ["a photo of a bird in a tree", "a photo of a bird"],
            ["a photo of a car"],
        ],
        ["a photo of a cat on a bed", "a photo of a cat", "a bird in a tree", "a photo of a red car parked"],
        [0.8799999999648, 0.8440266301003388, 0.7952094659389009, 0.7213562978253383],
        2.9166873591812124,
    ),
}


@pytest.mark.parametrize("name", sorted(PYCOCOEVALCAP_1_2))
def test_scores_match_pycocoevalcap(name):
    raw_refs, raw_hyps, expected_bleu, expected_cider = PYCOCOEVALCAP_1_2[name]
    refs = [[" ".join(tokenize(r)) for r in rs] for rs in raw_refs]
    hyps = [" ".join(tokenize(h)) for h in raw_hyps]
    scores = bleu(refs, hyps)
    assert [scores[f"BLEU-{n}"] for n in (1, 2, 3, 4)] == pytest.approx(expected_bleu, rel=1e-12)
    assert cider(refs, hyps) == pytest.approx(expected_cider, rel=1e-12)


def test_published_perfect_and_disjoint_examples():
    # irisml-tasks-training 0.0.102, test/test_evaluate_captioning.py (a pycocoevalcap wrapper):
    # exact captions score BLEU 1 and CIDEr 10, disjoint ones 0.
    refs = [["hello world good bye"], ["this is perfect test", "this is perfect test"]]
    perfect = bleu(refs, [" ".join(tokenize("Hello World Good bye")), "this is perfect test"])
    assert all(v == pytest.approx(1.0) for v in perfect.values())
    assert cider(refs, ["hello world good bye", "this is perfect test"]) == pytest.approx(10.0)
    wrong = ["how are you today", "only wrong words here"]
    assert all(v == pytest.approx(0.0, abs=1e-12) for v in bleu(refs, wrong).values())
    assert cider(refs, wrong) == 0.0


def test_bleu_missing_orders_are_smoothed_not_zero():
    # hyp "the cat sat", refs of length 6 and 3: closest is 3, so no brevity penalty.
    # p1 = 3/3, p2 = 2/2, p3 = 1/1; there is no 4-gram, so p4 = (0 + 1e-15) / (0 + 1e-9) = 1e-6.
    scores = bleu([["the cat sat on the mat", "a cat sat"]], ["the cat sat"])
    assert scores["BLEU-1"] == pytest.approx(1.0, rel=1e-8)
    assert scores["BLEU-3"] == pytest.approx(1.0, rel=1e-8)
    assert scores["BLEU-4"] == pytest.approx(1e-6**0.25, rel=1e-8)


def test_bleu_clips_counts_and_applies_brevity_penalty():
    # "the" x4 against one "the cat is on the mat": clipped unigram matches 2 of 4, so p1 = 1/2;
    # length 4 vs 6 gives BP = exp(1 - 6/4).
    scores = bleu([["the cat is on the mat"]], ["the the the the"])
    assert scores["BLEU-1"] == pytest.approx(0.5 * math.exp(-0.5), rel=1e-8)
    assert scores["BLEU-2"] < 1e-7  # no bigram matches: p2 = 1e-15 / 3


def test_bleu_is_corpus_level_and_closest_length_ties_go_short():
    # hyp 1 "a b c d": refs of length 3 and 5 are equally close, coco takes 3 -> no penalty
    # (taking 5 would give exp(1 - 9/6) overall). Matches 4/4, 3/3, 2/2, 1/1.
    # hyp 2 "x y" vs "x z": 1/2 unigrams, 0/1 bigrams, nothing longer.
    # Summed: p1 = 5/6, p2 = 3/4, p3 = 2/2, p4 = 1/1; hyp length 6 >= ref length 3 + 2.
    scores = bleu([["a b c", "a b c d e"], ["x z"]], ["a b c d", "x y"])
    p = 5 / 6 * 3 / 4
    assert [scores[f"BLEU-{n}"] for n in (1, 2, 3, 4)] == pytest.approx(
        [5 / 6, p ** (1 / 2), p ** (1 / 3), p ** (1 / 4)], rel=1e-8
    )
    assert list(bleu([["a b"]], ["a b"], max_n=2)) == ["BLEU-1", "BLEU-2"]


def test_bleu_empty_hypothesis_only_adds_reference_length():
    # "a b" matches fully; the empty hypothesis adds its closest ref length (3) and no n-grams:
    # BP = exp(1 - 5/2), p1 = p2 = 1, p3 = p4 = 1e-6.
    scores = bleu([["a b"], ["c d e"]], ["a b", ""])
    assert scores["BLEU-1"] == pytest.approx(math.exp(-1.5), rel=1e-8)
    assert scores["BLEU-2"] == pytest.approx(math.exp(-1.5), rel=1e-8)
    assert scores["BLEU-3"] == pytest.approx(math.exp(-1.5) * 1e-2, rel=1e-6)
    assert bleu([["a b"]], [""]) == {"BLEU-1": 0.0, "BLEU-2": 0.0, "BLEU-3": 0.0, "BLEU-4": 0.0}


def test_cider_hand_worked_two_image_corpus():
    # Two images, so idf = log(2) - log(df) = log 2 =: l for every n-gram in one image's refs.
    # Image 1, "a b" vs "a b": unigram and bigram cosines 1; no 3-/4-grams on either side -> 0.
    #   mean over the 4 orders = 0.5, x10 = 5 (a perfect 2-word caption gets 5, not 10).
    # Image 2, "c e" vs "c d": unigram cosine l^2 / (sqrt2 l * sqrt2 l) = 1/2, bigrams 0 -> 1.25.
    assert cider([["a b"], ["c d"]], ["a b", "c e"]) == pytest.approx((5 + 1.25) / 2, rel=1e-12)


def test_cider_idf_zero_and_length_penalty():
    # "a" is in both images' refs: idf 0, so it carries no weight. Image 1 "a x" = its ref -> 5.
    # Image 2 "a y z w" vs "a y": unigram vectors {y, z, w} vs {y} -> 1/sqrt3; bigrams {a y, y z, z w}
    # vs {a y} -> 1/sqrt3; trigrams only on the hypothesis side -> 0. Length 4 vs 2 gives the
    # Gaussian penalty exp(-2^2 / (2 * 6^2)). Score = 10 * (2/sqrt3) / 4 * exp(-1/18).
    expected = (5 + 5 / math.sqrt(3) * math.exp(-1 / 18)) / 2
    assert cider([["a x"], ["a y"]], ["a x", "a y z w"]) == pytest.approx(expected, rel=1e-12)


def test_cider_clips_repeated_words():
    # Image 1 "a a b" vs "a b": hyp unigram weights {a: 2l, b: l}, ref {a: l, b: l}. Clipped dot
    # min(2l, l) l + l l = 2 l^2 -> cosine 2 / (sqrt5 sqrt2); unclipped it would be 3 / sqrt10.
    # Bigrams {a a, a b} vs {a b} -> 1/sqrt2. Length 3 vs 2 -> penalty exp(-1/72). Image 2 -> 5.
    image_1 = 10 * (2 / math.sqrt(10) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert cider([["a b"], ["c d"]], ["a a b", "c d"]) == pytest.approx((image_1 + 5) / 2, rel=1e-12)


def test_cider_is_zero_on_a_single_image_corpus():
    # idf = log(1) - log(1) = 0 for every n-gram: CIDEr needs several images to mean anything.
    assert cider([["a b c d e"]], ["a b c d e"]) == 0.0


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="2 reference lists but 1 hypotheses"):
        bleu([["a"], ["b"]], ["a"])
    with pytest.raises(ValueError, match="2 reference lists but 3 hypotheses"):
        cider([["a"], ["b"]], ["a", "b", "c"])
    with pytest.raises(ValueError, match="no hypotheses"):
        cider([], [])
    with pytest.raises(ValueError, match="hypothesis 1 has no references"):
        bleu([["a"], []], ["a", "b"])
    with pytest.raises(TypeError, match=r"references\[0\] is a string"):
        bleu(["a dog"], ["a dog"])
    with pytest.raises(ValueError, match="max_n"):
        bleu([["a"]], ["a"], max_n=0)
