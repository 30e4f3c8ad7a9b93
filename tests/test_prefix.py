import torch

from fromage.data.collate import retrieval_prefix_batch
from fromage.model import TextPrefix

from .conftest import build_model, tiny_llama, tiny_opt


def test_precomputed_prefix_table_matches_direct_retrieval(special):
    """The training fast path (prefixes computed once, selected per step) == the direct path."""
    from fromage.training.prefixes import precompute_prefixes

    for make in (tiny_llama, tiny_opt):
        model = build_model(make())
        texts = [[5, 6, 7, 8, 9], [10], [11, 12], [13, 14, 15]]
        table = precompute_prefixes(model, texts, special, chunk=2)
        rows = torch.tensor([2, 0, 3])
        cached = model.retrieval_from_prefix(table.select(rows))
        ids, mask = retrieval_prefix_batch([texts[i] for i in rows], special)
        direct = model.retrieval_forward(ids, mask)
        torch.testing.assert_close(cached.ret_hidden, direct.ret_hidden, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cached.ret_logit, direct.ret_logit, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cached.frozen_lse, direct.frozen_lse, atol=1e-5, rtol=1e-4)
        assert torch.equal(cached.target_is_ret, direct.target_is_ret)


def test_prefix_cat_left_pads(special):
    model = build_model()
    a = model.encode_text_prefix(*retrieval_prefix_batch([[5, 6, 7]], special))
    b = model.encode_text_prefix(*retrieval_prefix_batch([[5]], special))
    both = TextPrefix.cat([a, b])
    assert both.mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert both.keys.shape[3] == 4


def test_a_prefix_with_images_matches_the_full_sequence(special):
    """Retrieval contexts with images (stories, chats): the prefix reads the images through the
    visual map as constants, and `[RET]` on top equals running the whole prompt + `[RET]`
    through `forward`; the LM loss counts only text positions (none predicts an image slot)."""
    from fromage.tokens import IMAGE_TOKEN_ID, left_pad

    for make in (tiny_llama, tiny_opt):
        model = build_model(make(), k=2)
        img = [IMAGE_TOKEN_ID] * 2
        rows = [[special.bos, 5, 6, *img, 7, *img, 8], [special.bos, *img, 9], [special.bos, 10, 11]]
        feats = torch.randn(3, 24)  # row 0 has two images, row 1 one, row 2 none
        ids, mask = left_pad(rows, special.pad)
        prefix = model.encode_text_prefix(ids, mask, feats)
        fast = model.retrieval_from_prefix(prefix)
        naive = []
        for row, f in ((rows[0], feats[:2]), (rows[1], feats[2:]), (rows[2], None)):
            out = model(torch.tensor([[*row, model.ret_token_id]]), image_features=f)
            naive.append(out.ret_hidden[0, -1])
            # Predicting positions: text inputs whose next token is text or [RET].
            full = [*row, model.ret_token_id]
            keep = [t for t in range(len(row)) if full[t] != IMAGE_TOKEN_ID and full[t + 1] != IMAGE_TOKEN_ID]
            expected = out.logits[0, keep].logsumexp(-1)
            got = torch.logaddexp(fast.frozen_lse, fast.ret_logit)
            start = sum(int(p.sum()) for p in prefix.predicts[: len(naive) - 1])
            torch.testing.assert_close(got[start : start + len(keep)], expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fast.ret_hidden, torch.stack(naive), atol=1e-4, rtol=1e-4)
        # row 0: bos→5, 5→6, 8→[RET]; row 1: 9→[RET] only; row 2: bos→10, 10→11, 11→[RET]
        assert prefix.predicts.sum(1).tolist() == [3, 1, 3]


def test_loss_at_the_end_only_reads_the_last_position(special):
    from fromage.tokens import IMAGE_TOKEN_ID, left_pad

    model = build_model(tiny_llama(), k=2)
    rows = [[special.bos, 5, *[IMAGE_TOKEN_ID] * 2, 6], [special.bos, 7]]
    feats = torch.randn(1, 24)
    ids, mask = left_pad(rows, special.pad)
    full = model.retrieval_from_prefix(model.encode_text_prefix(ids, mask, feats))
    end = model.retrieval_from_prefix(model.encode_text_prefix(ids, mask, feats, loss_at_end_only=True))
    torch.testing.assert_close(end.ret_hidden, full.ret_hidden)
    assert end.target_is_ret.tolist() == [True, True]  # one position per row: the one before [RET]
    last = [i for i, t in enumerate(full.target_is_ret.tolist()) if t]
    torch.testing.assert_close(end.frozen_lse, full.frozen_lse[last], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(end.ret_logit, full.ret_logit[last], atol=1e-5, rtol=1e-5)


def test_context_prompts_in_length_order_equal_each_prompt_alone(special):
    """step._contexts encodes prompts sorted by length in chunks: the same `[RET]` states as
    running each prompt + `[RET]` through the model alone (the naive twin)."""
    from fromage.data.dataset import Split
    from fromage.data.examples import Example
    from fromage.training import step
    from fromage.training.distributed import Processes
    from fromage.training.tasks import Query

    model = build_model(tiny_llama(), k=2)
    features = torch.randn(2, 5, 24)  # (views, examples, F)
    split = Split([Example(f"{i}.png", f"c{i}", "t") for i in range(5)], features)
    data = step.StepData(
        split, None, torch.arange(5), torch.arange(5), special, lambda t: [5 + len(t) % 7] * len(t.split())
    )
    queries = [
        Query(("a b c d e f", 1, "g h", 2, "i"), 3, "story"),
        Query(("x",), 0, "request"),
        Query((4, "and", 2, "y z"), 1, "category"),
    ] * 4  # 12 prompts: more than one chunk
    generator = torch.Generator().manual_seed(0)
    prefix, targets, target_views, keep = step._contexts(
        model, data, queries, generator, Processes(0, 1, torch.device("cpu"))
    )
    fast = model.retrieval_from_prefix(prefix).ret_hidden
    generator = torch.Generator().manual_seed(0)
    pieces = [sum(isinstance(p, int) for p in q.pieces) for q in queries]
    views = torch.randint(0, 2, (sum(pieces),), generator=generator).split(pieces)
    naive = []
    for q, v in zip(queries, views, strict=True):
        from fromage.embed import layout_prompt, ret_hidden_batch

        ids, images = layout_prompt(q.pieces, data.tokenize, special.bos, 2)
        f = torch.stack([features[int(v[j]), q.pieces[p]] for j, p in enumerate(images)]) if images else None
        naive.append(ret_hidden_batch(model, [ids], [f], special.pad)[0])
    torch.testing.assert_close(fast, torch.stack(naive), atol=1e-4, rtol=1e-4)
    assert targets.tolist() == [q.target for q in queries] and keep is None
