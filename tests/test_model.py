from __future__ import annotations

import pytest
import torch

from fromage.data.collate import caption_batch, retrieval_prefix_batch
from fromage.losses import caption_loss, ret_token_loss
from fromage.tokens import IGNORE_INDEX, IMAGE_TOKEN_ID

from .conftest import TRAINABLE, VOCAB, build_model, tiny_gpt2, tiny_llama, tiny_opt, tiny_qwen2


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt, tiny_gpt2, tiny_qwen2])
def test_any_causal_lm_builds_and_runs(make, special):
    model = build_model(make())
    texts = [[5, 6, 7], [8, 9]]
    batch = caption_batch(texts, model.config.num_visual_tokens, special, interleave=False)
    feats = torch.randn(2, 24)
    logits, targets = model.caption_forward(batch.input_ids, batch.attention_mask, feats, batch.labels)
    assert logits.shape == (targets.shape[0], VOCAB + 1)
    assert targets.tolist() == [5, 6, 7, 2, 8, 9, 2]


def test_tied_and_untied_heads_get_the_right_ret_rows():
    tied = build_model(tiny_opt())
    untied = build_model(tiny_llama(tied=False))
    assert tied.lm.tied and tied.ret_output is None
    assert not untied.lm.tied and untied.ret_output is not None
    assert untied.ret_output_row is untied.ret_output
    assert tied.ret_output_row is tied.ret_embedding


def test_frozen_weights_take_no_gradients_and_stay_in_eval():
    model = build_model(tiny_opt())
    model.train()
    assert not model.lm.training and not model.lm.model.training
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == TRAINABLE


def test_image_slot_count_mismatch_names_both_numbers():
    model = build_model()
    ids = torch.tensor([[IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 1, 5]])
    with pytest.raises(ValueError, match="2 image slots .* but 2 images"):
        model.embed_inputs(ids, torch.randn(2, 24))


def test_ret_token_is_spliced_from_its_own_parameter():
    model = build_model()
    ids = torch.tensor([[1, 5, model.ret_token_id]])
    embeds = model.embed_inputs(ids)
    assert torch.equal(embeds[0, 2], model.ret_embedding.detach())
    assert torch.equal(embeds[0, 1], model.lm.embed(torch.tensor(5)))


def _naive_retrieval(model, texts, special):
    """`[BOS] text [RET]`, right-padded, through the plain forward: the twin of the fast path."""
    ret = model.ret_token_id
    rows = [[special.bos, *t, ret] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), special.pad)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    out = model(ids, mask)
    hidden = torch.stack([out.ret_hidden[i, len(r) - 1] for i, r in enumerate(rows)])
    logits = torch.cat([out.logits[i, : len(r) - 1] for i, r in enumerate(rows)])
    targets = torch.cat([torch.tensor(r[1:]) for r in rows])
    return hidden, logits, targets


@pytest.mark.parametrize(
    "make,ret_layer", [(tiny_llama, -1), (tiny_llama, 1), (tiny_opt, -1), (tiny_gpt2, 1)]
)
def test_retrieval_fast_path_matches_full_sequence(make, ret_layer, special):
    model = build_model(make(), ret_layer=ret_layer)
    texts = [[5, 6, 7, 8], [9, 10], [11]]
    ids, mask = retrieval_prefix_batch(texts, special)
    fast = model.retrieval_forward(ids, mask)
    hidden, logits, targets = _naive_retrieval(model, texts, special)
    torch.testing.assert_close(fast.ret_hidden, hidden, atol=1e-5, rtol=1e-4)
    fast_loss = ret_token_loss(fast.frozen_lse, fast.frozen_target_logit, fast.ret_logit, fast.target_is_ret)
    torch.testing.assert_close(fast_loss, caption_loss(logits, targets), atol=1e-5, rtol=1e-5)


def test_retrieval_fast_path_gradients_match(special):
    texts = [[5, 6, 7], [9, 10, 11, 12]]
    grads = []
    for fast in (True, False):
        model = build_model(tiny_llama(tied=False))
        if fast:
            ids, mask = retrieval_prefix_batch(texts, special)
            out = model.retrieval_forward(ids, mask)
            loss = ret_token_loss(out.frozen_lse, out.frozen_target_logit, out.ret_logit, out.target_is_ret)
            hidden = out.ret_hidden
        else:
            hidden, logits, targets = _naive_retrieval(model, texts, special)
            loss = caption_loss(logits, targets)
        (loss + model.text_embeddings(hidden).sum()).backward()
        grads.append(
            [
                model.ret_embedding.grad.clone(),
                model.ret_output.grad.clone(),
                model.text_ret_map.weight.grad.clone(),
            ]
        )
    for a, b in zip(*grads, strict=False):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_caption_batch_layout_and_interleaving(special):
    texts = [[5, 6], [7], [8, 9, 10]]
    plain = caption_batch(texts, 2, special)
    assert plain.input_ids.shape == (3, 2 + 1 + 3 + 1)
    assert plain.input_ids[0].tolist() == [IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 1, 5, 6, 2, 0]
    assert plain.labels[0].tolist() == [IGNORE_INDEX] * 3 + [5, 6, 2, IGNORE_INDEX]
    packed = caption_batch(texts, 2, special, interleave=True)
    assert packed.input_ids.shape[0] == 2
    assert packed.input_ids[0].tolist() == [IMAGE_TOKEN_ID] * 2 + [1, 5, 6, 2] + [IMAGE_TOKEN_ID] * 2 + [
        1,
        7,
        2,
    ]
    assert packed.image_order == [0, 1, 2]
    # A question before its answer is read, not predicted: caption 2's first two tokens.
    asked = caption_batch(texts, 2, special, interleave=True, context=[0, 1, 2])
    assert asked.input_ids.tolist() == packed.input_ids.tolist()
    assert asked.labels[0].tolist() == [IGNORE_INDEX] * 3 + [5, 6, 2] + [IGNORE_INDEX] * 4 + [2]
    assert asked.labels[1].tolist()[: 2 + 1 + 3 + 1] == [IGNORE_INDEX] * 5 + [10, 2]
    with pytest.raises(ValueError, match="2 context lengths for 3 captions"):
        caption_batch(texts, 2, special, context=[0, 1])


def test_ret_rescale_keeps_mean_frozen_norm():
    model = build_model()
    with torch.no_grad():
        model.ret_embedding.mul_(7.0)
    model.rescale_ret_embedding()
    expected = model.lm.embedding_weight.norm(dim=1).mean()
    torch.testing.assert_close(model.ret_embedding.norm(), expected)


def test_hf_clip_vision_tower_gives_pooled_features():
    from PIL import Image

    from fromage.backbones import build_hf_vision

    from .conftest import tiny_clip_vision

    encoder = build_hf_vision(tiny_clip_vision(), "tiny-clip", 16)
    feats = encoder.encode([Image.new("RGB", (20, 30), (200, 10, 10)), Image.new("RGB", (16, 16))])
    assert feats.shape == (2, 32)
    assert all(not p.requires_grad for p in encoder.parameters())


def test_preprocessing_resamples_only_the_centre_crop(monkeypatch):
    """Issue #18 item 2: the shorter side was resized to S first, so a 10000×1 image made a
    2.24M × 224 intermediate (GBs, seconds). Only the crop is resampled now; the pixels equal
    resizing the whole image and cropping (the naive twin), up to one 8-bit step of rounding."""
    import numpy as np
    from PIL import Image

    from fromage.backbones import build_hf_vision

    from .conftest import tiny_clip_vision

    encoder = build_hf_vision(tiny_clip_vision(), "tiny-clip", 32)
    rng = np.random.default_rng(0)

    def naive(image):
        w, h = image.size
        scale = 32 / min(w, h)
        nw, nh = max(32, round(w * scale)), max(32, round(h * scale))
        big = image.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - 32) // 2, (nh - 32) // 2
        array = np.asarray(big.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 255.0
        return ((array - encoder.mean) / encoder.std).transpose(2, 0, 1)

    for w, h in ((45, 30), (30, 45), (64, 64), (100, 37)):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        got = encoder.preprocess([image])[0].numpy()
        step = (1 / 255) / np.asarray(encoder.std).min()
        assert np.abs(got - naive(image)).max() <= step + 1e-6, (w, h)

    sizes = []
    real_resize = Image.Image.resize

    def recording(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        return real_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    encoder.preprocess([Image.new("RGB", (10_000, 1), (255, 0, 0))])
    assert sizes and max(w * h for w, h in sizes) <= 32 * 32


@pytest.mark.parametrize("family", ["clip", "siglip", "dinov2"])
def test_hf_encoders_get_exactly_their_processors_pixels(family):
    """Issue #16: only mean/std/size were read from the processor, so SigLIP (which squashes to
    a square) and DINOv2 (resize 256, crop 224) got other pixels than they were trained on."""
    import numpy as np
    from PIL import Image
    from transformers import (
        BitImageProcessor,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2Config,
        Dinov2Model,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from fromage.backbones import build_hf_vision

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    if family == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, **small))
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    elif family == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, **small))
        processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    else:
        model = Dinov2Model(Dinov2Config(image_size=32, patch_size=8, **small))
        processor = BitImageProcessor(
            size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, do_center_crop=True
        )
    encoder = build_hf_vision(model, f"tiny-{family}", 0, processor=processor)
    assert encoder.image_size == 32 and encoder.encoder_id.endswith(":processor")
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((50, 30), (30, 70))
    ]
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(encoder.preprocess(images), expected.float())
    assert encoder.encode(images).shape == (2, 32)
