"""The batched lean step (backbones/batch_llama.py) against the Hugging Face model, and the
decoding built on it (`LeanBatchDecoder`) against one-at-a-time decoding."""

import pytest
import torch

from fromage.backbones.batch_llama import Chunk, LlamaBatchStepper
from fromage.generate import LeanBatchDecoder, batch_decoder

from .conftest import build_model, tiny_llama


def _lean_model(ret_layer: int = 1):
    model = build_model(tiny_llama(tied=False), ret_layer=ret_layer).eval()
    assert model.lm.enable_fast_decode(model.config.ret_layer, torch.float32)
    return model


def _hf_hidden(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(torch.tensor([ids]), compute_logits=False)
    return out.last_hidden[0].float(), out.ret_hidden[0].float()  # (T, d) each


def test_prompts_and_steps_in_one_forward_match_the_hugging_face_layers():
    """Three sequences in slots 0, 2 and 3 (slot 1 idle): prompts of different lengths run
    together, then one forward mixes a step of two of them with a whole new prompt."""
    model = _lean_model()
    engine = LlamaBatchStepper(model.lm.stepper)
    cache = engine.new_cache(slots=2, capacity=4)  # both grow on the way
    seqs = {0: [1, 5, 6, 7, 8], 2: [1, 9], 3: [1, 10, 11, 12, 13, 14, 15]}

    def embed(ids):
        return model.embed_inputs(torch.tensor([ids]))[0].float()

    first = [0, 2]
    last, selected = engine.forward(
        torch.cat([embed(seqs[s]) for s in first]), [Chunk(s, 0, len(seqs[s])) for s in first], cache
    )
    for i, s in enumerate(first):
        want_last, want_selected = _hf_hidden(model, seqs[s])
        torch.testing.assert_close(last[i], want_last[-1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(selected[i], want_selected[-1], atol=1e-4, rtol=1e-4)
    # Slots 0 and 2 step one token each while slot 3's whole prompt runs.
    x = torch.cat([embed([20]), embed([21]), embed(seqs[3])])
    chunks = [Chunk(0, len(seqs[0]), 1), Chunk(2, len(seqs[2]), 1), Chunk(3, 0, len(seqs[3]))]
    last, selected = engine.forward(x, chunks, cache)
    for i, ids in enumerate([seqs[0] + [20], seqs[2] + [21], seqs[3]]):
        want_last, want_selected = _hf_hidden(model, ids)
        torch.testing.assert_close(last[i], want_last[-1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(selected[i], want_selected[-1], atol=1e-4, rtol=1e-4)


def test_bad_chunks_are_refused():
    model = _lean_model()
    engine = LlamaBatchStepper(model.lm.stepper)
    x = torch.randn(3, model.lm.hidden_size)
    with pytest.raises(ValueError, match="3 input rows but the chunks hold 2"):
        engine.forward(x, [Chunk(0, 0, 2)], engine.new_cache())
    with pytest.raises(ValueError, match="two chunks in one slot"):
        engine.forward(x, [Chunk(0, 0, 2), Chunk(0, 2, 1)], engine.new_cache())


def test_the_lean_decoder_is_chosen_where_the_model_has_the_lean_step(special):
    model = build_model(tiny_llama(), ret_layer=1).eval()
    assert not isinstance(batch_decoder(model, special), LeanBatchDecoder)
    model.lm.enable_fast_decode(1, torch.float32)
    assert isinstance(batch_decoder(model, special), LeanBatchDecoder)


def test_reads_run_with_the_decoding_rows_and_give_the_ret_states_of_their_prompts(special):
    """Retrieval prompts `read` into a running batch: their `[RET]` states equal
    `ret_hidden_batch`'s (the Hugging Face layers), the decoding rows are unchanged, and their
    slots are free again after the step."""
    from fromage.embed import ret_hidden_batch
    from fromage.generate import GenerationConfig
    from fromage.tokens import IMAGE_TOKEN_ID

    model = _lean_model()
    config = GenerationConfig(max_new_tokens=6, ret_scale_factor=0)
    alone = LeanBatchDecoder(model, special)
    mixed = LeanBatchDecoder(model, special)
    for decoder in (alone, mixed):
        decoder.add([[1, 5, 6], [1, 7]], [None, None], [config] * 2)
        decoder.step()  # the prompts
    f = model.config.feature_dim
    queries = [[1, 8, 9, 10], [1, *[IMAGE_TOKEN_ID] * model.config.num_visual_tokens, 11]]
    features = [None, torch.randn(1, f)]
    handles = mixed.read(queries, features)
    assert mixed.running == 4
    got_alone, got_mixed = alone.step()[0], mixed.step()[0]
    assert [(h, s.token_id) for h, s in got_mixed] == [(h, s.token_id) for h, s in got_alone]
    want = ret_hidden_batch(model, queries, features, special.pad)
    torch.testing.assert_close(
        torch.stack([mixed.states.pop(h) for h in handles]), want, atol=1e-4, rtol=1e-4
    )
    assert mixed.running == 2 and not mixed.reading
    assert {r.slot for r in mixed.rows.values()} == {0, 1}
    assert mixed.read([[1, 12]], [None]) == [handles[-1] + 1]
    assert mixed.reading[handles[-1] + 1].slot == 2  # the lowest free slot


def test_the_slot_cache_grows_for_a_burst_and_gives_memory_back_after_it(special):
    from fromage.generate import GenerationConfig

    model = _lean_model()  # a context of 128 positions
    never = type(special)(special.bos, model.ret_token_id, special.pad)  # no row ends by itself
    decoder = LeanBatchDecoder(model, never)
    decoder.cache = decoder.engine.new_cache(slots=2, capacity=16, limit=128)
    config = GenerationConfig(max_new_tokens=2, ret_scale_factor=0)
    decoder.add([[1, *[5, 6, 7] * 33]] + [[1, 5]] * 5, [None] * 6, [config] * 6)  # 6 slots, 100 columns
    decoder.step()
    assert decoder.cache.slots == 8 and decoder.cache.capacity == 100
    while decoder.running:
        decoder.step()
    assert (decoder.cache.slots, decoder.cache.capacity) == (4, 32)  # twice the starting size
    # Under load too: a long row passes while short ones go on; once the cache holds more than
    # 4× what the short rows use, it shrinks.
    decoder.add([[1, 5]] * 2, [None] * 2, [GenerationConfig(max_new_tokens=20, ret_scale_factor=0)] * 2)
    decoder.add([[1, *[5, 6, 7] * 33]], [None], [GenerationConfig(max_new_tokens=1, ret_scale_factor=0)])
    decoder.step()
    assert decoder.cache.capacity == 100
    for _ in range(3):
        decoder.step()
    assert decoder.running == 2 and decoder.cache.capacity == 32


def test_a_slot_is_cleared_for_its_next_sequence(special):
    """Whatever a sequence left in its slot (here NaN, as an overflowing model might) does not
    reach the next one, even where a longer row makes it read past its own columns."""
    from fromage.generate import GenerationConfig

    model = _lean_model()
    never = type(special)(special.bos, model.ret_token_id, special.pad)
    config = GenerationConfig(max_new_tokens=4, ret_scale_factor=0)

    def tokens(poison: bool) -> list[int]:
        decoder = LeanBatchDecoder(model, never)
        decoder.add([[1, *[5, 6] * 20]], [None], [GenerationConfig(max_new_tokens=1, ret_scale_factor=0)])
        while decoder.running:
            decoder.step()  # slot 0 held 41+ columns and is free again
        if poison:
            decoder.cache.keys[:, 0, :, :40] = float("nan")
            decoder.cache.values[:, 0, :, :40] = float("nan")
        short = decoder.add([[1, 7]], [None], [config])[0]  # slot 0 again
        decoder.add([[1, *[8, 9] * 15]], [None], [config])  # slot 1: makes slot 0 read 30+ columns
        got = []
        while decoder.running:
            got += [s.token_id for h, s in decoder.step()[0] if h == short]
        return got

    assert tokens(poison=True) == tokens(poison=False) and len(tokens(poison=False)) == 4
