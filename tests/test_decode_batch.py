"""Batched decoding (`decode_batch`) is one-at-a-time decoding (`decode`), row for row: the same
tokens, the same `[RET]` states, rows of different lengths, with and without images, ending at
different times."""

import pytest
import torch

from fromage.generate import (
    BatchDecoder,
    GenerationConfig,
    LeanBatchDecoder,
    batch_decoder,
    decode,
    decode_batch,
)
from fromage.model import FromageModel
from fromage.tokens import IMAGE_TOKEN_ID

from .conftest import build_model, tiny_gpt2, tiny_llama, tiny_opt


def _model(lean: bool, tied: bool = False):
    """A tiny Llama FROMAGe model; `lean`: with the lean step (float32 weights), so batches
    decode on `LeanBatchDecoder` and lone answers on the lean single-row step."""
    model = build_model(tiny_llama(tied=tied), ret_layer=1).eval()
    if lean:
        assert model.lm.enable_fast_decode(1, torch.float32)
    return model


def _prompts(model, k: int = 2):
    """Four prompts of different lengths: text only, one image, two images, a long text."""
    torch.manual_seed(7)
    f = model.config.feature_dim
    img = [IMAGE_TOKEN_ID] * k
    return [
        ([1, 5, 6], None),
        ([1, *img, 7, 8], torch.randn(1, f)),
        ([1, 5, *img, 9, *img, 10, 11], torch.randn(2, f)),
        ([1, *range(12, 30)], None),
    ]


def _one_at_a_time(model, special, prompts, config, seeds):
    rows = []
    for (ids, feats), seed in zip(prompts, seeds, strict=True):
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        rows.append(list(decode(model, torch.tensor([ids]), feats, special, config, gen)))
    return rows


def _batched(model, special, prompts, config, seeds):
    gens = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
    rows: list[list] = [[] for _ in prompts]
    for steps in decode_batch(model, [p for p, _ in prompts], [f for _, f in prompts], special, config, gens):
        assert len({row for row, _ in steps}) == len(steps)  # one token per running row per step
        for row, step in steps:
            rows[row].append(step)
    return rows


def _assert_same(batched, alone, ret_id):
    for b, a in zip(batched, alone, strict=True):
        assert [s.token_id for s in b] == [s.token_id for s in a]
        for x, y in zip(b, a, strict=True):
            assert (x.ret_hidden is None) == (y.ret_hidden is None)
            if x.ret_hidden is not None:
                torch.testing.assert_close(x.ret_hidden, y.ret_hidden, atol=1e-4, rtol=1e-4)
    assert any(s.token_id == ret_id for row in batched for s in row)  # [RET] steps exercised


@pytest.mark.parametrize(
    "lm",
    [
        lambda: tiny_llama(tied=False),
        lambda: tiny_llama(tied=True),
        tiny_opt,
        tiny_gpt2,
        lambda: _model(lean=True, tied=False),
        lambda: _model(lean=True, tied=True),
    ],
)
def test_greedy_batch_equals_one_at_a_time(lm, special):
    made = lm()
    model = made if isinstance(made, FromageModel) else build_model(made, ret_layer=1).eval()
    prompts = _prompts(model)
    config = GenerationConfig(max_new_tokens=10, ret_scale_factor=1e3, min_word_tokens=2, max_rets=2)
    seeds = [None] * len(prompts)
    _assert_same(
        _batched(model, special, prompts, config, seeds),
        _one_at_a_time(model, special, prompts, config, seeds),
        model.ret_token_id,
    )


@pytest.mark.parametrize("lean", [False, True])
def test_seeded_sampling_batch_equals_one_at_a_time(lean, special):
    model = _model(lean)
    prompts = _prompts(model)
    config = GenerationConfig(max_new_tokens=10, temperature=0.9, top_p=0.9, ret_scale_factor=50, max_rets=1)
    seeds = [3, 4, 5, 6]
    batched = _batched(model, special, prompts, config, seeds)
    _assert_same(batched, _one_at_a_time(model, special, prompts, config, seeds), model.ret_token_id)
    assert len({tuple(s.token_id for s in row) for row in batched}) > 1  # rows really differ


@pytest.mark.parametrize("lean", [False, True])
def test_rows_end_at_their_own_eos(lean, special):
    """Rows that end early leave the others decoding as they would alone."""
    model = _model(lean)
    prompts = _prompts(model)
    config = GenerationConfig(max_new_tokens=12, ret_scale_factor=0)
    never = type(special)(special.bos, model.ret_token_id, special.pad)  # [RET] is never chosen
    full = _one_at_a_time(model, never, prompts, config, [None] * 4)
    assert all(len(r) == 12 for r in full)
    for row in range(len(prompts)):  # each row's 3rd token declared EOS in turn
        ending = type(special)(special.bos, full[row][2].token_id, special.pad)
        batched = _batched(model, ending, prompts, config, [None] * 4)
        alone = _one_at_a_time(model, ending, prompts, config, [None] * 4)
        assert len(batched[row]) <= 2
        assert [[s.token_id for s in r] for r in batched] == [[s.token_id for s in r] for r in alone]
        assert len({len(r) for r in batched}) > 1  # rows ended at different steps


def test_bad_batches_are_refused(special):
    model = build_model(tiny_llama()).eval()
    with pytest.raises(ValueError, match="2 prompts, 1 feature entries, 2 configs"):
        list(decode_batch(model, [[1, 2], [1]], [None], special))
    with pytest.raises(ValueError, match="a prompt is empty"):
        list(decode_batch(model, [[1, 2], []], [None, None], special))
    assert list(decode_batch(model, [], [], special)) == []


@pytest.mark.parametrize("lean", [False, True])
def test_rows_joining_and_leaving_between_steps_decode_as_alone(lean, special):
    """Continuous batching: rows with their own settings join a running batch at step
    boundaries (shorter and longer prompts than the batch's), others leave (EOS, their token
    budget, or `end`), and every row still gets what `decode` gives it alone."""
    model = _model(lean)
    prompts = _prompts(model)
    configs = [
        GenerationConfig(max_new_tokens=6, ret_scale_factor=1e3, max_rets=1),
        GenerationConfig(max_new_tokens=12, temperature=0.8, top_p=0.9, ret_scale_factor=30),
        GenerationConfig(max_new_tokens=9, ret_scale_factor=0),
        GenerationConfig(max_new_tokens=12, temperature=1.2, ret_scale_factor=1e3, max_rets=2),
    ]
    seeds = [None, 21, None, 22]
    alone = []
    for (ids, feats), config, seed in zip(prompts, configs, seeds, strict=True):
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        alone.append(list(decode(model, torch.tensor([ids]), feats, special, config, gen)))

    decoder = batch_decoder(model, special)
    assert isinstance(decoder, LeanBatchDecoder) == lean
    got: dict[int, list] = {}
    handle_row: dict[int, int] = {}

    def join(rows: list[int]) -> None:
        gens = [None if seeds[r] is None else torch.Generator().manual_seed(seeds[r]) for r in rows]
        handles = decoder.add(
            [prompts[r][0] for r in rows], [prompts[r][1] for r in rows], [configs[r] for r in rows], gens
        )
        handle_row.update(zip(handles, rows, strict=True))

    join([2])  # the middle-length prompt alone
    schedule = {2: [3], 4: [0, 1]}  # the longest joins at step 2, the two shortest at step 4
    step = 0
    ended_at: dict[int, int] = {}
    while decoder.running or schedule:
        if step in schedule:
            join(schedule.pop(step))
        steps, ended = decoder.step()
        for handle, s in steps:
            got.setdefault(handle_row[handle], []).append(s)
        for handle in ended:
            ended_at[handle_row[handle]] = step
        step += 1
    _assert_same([got.get(r, []) for r in range(4)], alone, model.ret_token_id)
    assert len(set(ended_at.values())) > 1  # rows left at different steps
    assert not decoder.rows  # nothing left behind
    if isinstance(decoder, BatchDecoder):
        assert decoder.cache is None


@pytest.mark.parametrize("lean", [False, True])
def test_ending_a_row_frees_it_and_leaves_the_others_unchanged(lean, special):
    model = _model(lean)
    prompts = _prompts(model)
    config = GenerationConfig(max_new_tokens=8, ret_scale_factor=0)
    special = type(special)(special.bos, model.ret_token_id, special.pad)  # no row ends by itself
    alone = _one_at_a_time(model, special, prompts, config, [None] * 4)
    decoder = batch_decoder(model, special)
    handles = decoder.add([p for p, _ in prompts], [f for _, f in prompts], [config] * 4)
    got: dict[int, list] = {h: [] for h in handles}
    # The lean decoder runs the prompts at its first step and gives first tokens at its second.
    steps_needed = 9 if lean else 8
    for step in range(steps_needed):
        if step == 3 + (steps_needed - 8):
            decoder.end(handles[3])  # the longest prompt: its columns are dropped too
            assert decoder.running == 3
            if isinstance(decoder, BatchDecoder):
                assert decoder.mask.shape[1] == len(prompts[2][0]) + 3
        steps, _ = decoder.step()
        for handle, s in steps:
            got[handle].append(s)
    assert [len(got[h]) for h in handles] == [8, 8, 8, 3]
    assert [[s.token_id for s in got[h]] for h in handles[:3]] == [[s.token_id for s in r] for r in alone[:3]]
