import torch

from fromage.losses import contrastive_loss
from fromage.model import FromageModel
from fromage.training.refine import refine_retrieval

from .conftest import build_model


def _task(model: FromageModel, n: int = 24, views: int = 2):
    torch.manual_seed(0)
    d, f = model.lm.hidden_size, model.config.feature_dim
    states = torch.randn(n, d)
    features = torch.randn(views, n, f)
    return states, torch.arange(n), features, torch.arange(n)


def _loss(model, states, text_of_example, features, groups) -> float:
    model.eval()
    with torch.no_grad():
        text = model.text_embeddings(states[text_of_example])
        image = model.image_embeddings(features[0])
        return float(contrastive_loss(text, image, model.logit_scale, groups)[0])


def test_refinement_lowers_the_contrastive_loss_and_touches_only_the_retrieval_head():
    model = build_model(dropout=0.2)
    task = _task(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = _loss(model, *task)
    result = refine_retrieval(model, *task, steps=150, batch_size=12, lr=1e-2, progress=False)
    assert result.last_loss < result.first_loss
    assert _loss(model, *task) < 0.5 * start
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {
        "text_ret_map.weight",
        "text_ret_map.bias",
        "image_ret_map.weight",
        "image_ret_map.bias",
        "logit_scale",
    }


def test_refinement_is_deterministic_given_the_seed():
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        model = build_model(dropout=0.3)
        refine_retrieval(model, *_task(model), steps=5, batch_size=8, seed=3, progress=False)
        runs.append(model.image_ret_map.weight.clone())
    assert torch.equal(runs[0], runs[1])


def test_pick_texts_draws_variants_at_the_requested_share():
    from fromage.training.refine import pick_texts

    table = torch.stack([torch.arange(1000) * 3, torch.arange(1000) * 3 + 1, torch.arange(1000) * 3 + 2], 1)
    idx = torch.arange(1000).repeat(10)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(pick_texts(table, idx, g, 0.0), idx * 3)
    only_variants = pick_texts(table, idx, g, 1.0) % 3
    assert bool((only_variants != 0).all()) and {1, 2} == set(only_variants.tolist())
    share = float((pick_texts(table, idx, g, 0.25) % 3 != 0).float().mean())
    assert 0.22 < share < 0.28
    assert torch.equal(pick_texts(table[:, 0], idx, g), idx * 3)  # one text per example


def test_context_prompts_take_their_share_and_learn_their_targets():
    """Context states (C, d) that should retrieve given examples: refining with them puts
    their targets first; refining on the examples alone does not."""
    from fromage.training.refine import ContextRows

    def context_loss(with_contexts: bool) -> float:
        torch.manual_seed(2)
        model = build_model(dropout=0.0)
        states, text_of_example, features, groups = _task(model)
        n = len(states)
        contexts = torch.randn(n, states.shape[1])  # states unrelated to their targets' captions
        targets = torch.randperm(n)
        table = torch.cat([states, contexts])
        rows = ContextRows(torch.arange(n, 2 * n), targets, 0.5)
        refine_retrieval(
            model,
            table,
            text_of_example,
            features[:1],
            groups,
            steps=200,
            batch_size=12,
            lr=1e-2,
            progress=False,
            contexts=rows if with_contexts else None,
        )
        return _loss(model, table, rows.rows[targets.argsort()], features, groups)

    assert context_loss(True) < 0.5 * context_loss(False)
