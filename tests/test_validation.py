import pytest
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
    # Against recall counted by hand from the embeddings (R@10 over 7 images with 3 groups is
    # 1 by construction, so R@1 and R@5 are what can be wrong).
    from fromage.embed import embed_images

    model.eval()
    scores = embed_texts(model, texts, special) @ embed_images(model, split.features[0]).T  # (7, 7)
    groups = [e.group for e in split.examples]
    for k in (1, 5):
        hits = [
            any(groups[j] == groups[q] for j in scores[q].topk(k).indices.tolist())
            for q in range(len(groups))
        ]
        assert metrics[f"t2i_R@{k}"] == pytest.approx(sum(hits) / len(hits)), k
        hits_i2t = [
            any(groups[j] == groups[q] for j in scores.T[q].topk(k).indices.tolist())
            for q in range(len(groups))
        ]
        assert metrics[f"i2t_R@{k}"] == pytest.approx(sum(hits_i2t) / len(hits_i2t)), k


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
