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
