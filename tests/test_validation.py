import torch

from fromage.data.dataset import Split
from fromage.data.examples import Example
from fromage.embed import embed_texts
from fromage.training.validate import validate

from .conftest import build_model


def _split(n: int) -> tuple[Split, list[list[int]]]:
    torch.manual_seed(0)
    examples = [Example(f"{i}.png", f"caption {i % 3}", "t", f"g{i % 3}") for i in range(n)]
    texts = [[5 + i % 3, 9] for i in range(n)]
    return Split(examples, torch.randn(1, n, 24)), texts


def test_validate_reports_both_directions_and_captions(special):
    model = build_model()
    split, texts = _split(7)
    metrics = validate(model, "toy", split, texts, special, tokenizer=None)
    assert {"t2i_R@1", "t2i_R@10", "i2t_R@1", "caption_token_acc"} <= set(metrics)
    # Groups: with 3 groups among 7 images, R@10 must be 1 in both directions.
    assert metrics["t2i_R@10"] == 1.0 and metrics["i2t_R@10"] == 1.0


def test_shared_state_cache_and_subsampling_do_not_change_retrieval(special):
    model = build_model()
    split, texts = _split(9)
    plain = validate(model, "toy", split, texts, special)
    cache: dict = {}
    first = validate(model, "toy", split, texts, special, states=cache, max_token_accuracy=4)
    assert len(cache) == 3  # one [RET] state per distinct text
    again = validate(model, "toy", split, texts, special, states=cache, max_token_accuracy=4)
    for key in ("t2i_R@1", "t2i_R@5", "i2t_R@1"):
        assert plain[key] == first[key] == again[key]


def test_cached_states_give_the_same_text_embeddings(special):
    model = build_model().eval()
    texts = [[5, 9], [6, 9, 7], [5, 9]]
    cache: dict = {}
    fresh = embed_texts(model, texts, special, states=cache)
    # A poisoned entry proves the cache is read rather than recomputed.
    reused = embed_texts(model, texts, special, states=cache)
    torch.testing.assert_close(fresh, reused)
    cache[(5, 9)] = torch.zeros_like(cache[(5, 9)])
    assert not torch.allclose(embed_texts(model, texts, special, states=cache)[0], fresh[0])
