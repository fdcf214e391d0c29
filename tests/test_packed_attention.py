"""Packed training rows computed block by block (models/packed_attention.py): the dense mask's
numbers at every real position, forward and backward, for a fraction of the work."""

import random

import pytest
import torch
import torch.nn.functional as F

from multimodal_models.models.layers import causal_mask
from multimodal_models.models.packed_attention import PADDING, PackedAttention

# two rows: a prefix of 3, segments of 2, 20 (past the first bucket) and 5, then padding; a prefix of 4,
# one segment of 30 and no padding
ROWS = [[0] * 3 + [1] * 2 + [2] * 20 + [3] * 5 + [PADDING] * 4, [0] * 4 + [1] * 30]


def packed_mask(segments: torch.Tensor) -> torch.Tensor:
    """The training task's mask (vlm_task.make_batch): a segment sees the prefix and itself, causally;
    padding sees itself."""
    T = segments.shape[1]
    same = (segments[:, :, None] == segments[:, None, :]) | (segments[:, None, :] == 0)
    pads = (segments == PADDING)[:, :, None] & torch.eye(T, dtype=torch.bool)
    return ((causal_mask(T) & same & (segments != PADDING)[:, :, None]) | pads)[:, None]


def test_block_by_block_attention_gives_the_dense_masks_numbers_and_gradients():
    segments = torch.tensor(ROWS)
    mask = packed_mask(segments)
    packed = PackedAttention.from_segments(segments, mask)
    # buckets of up to 16, 24, 36 queries: the prefixes 3 and 4 and the segments 2 and 5 | 20 | 30
    assert [(b.blocks, b.queries, b.keys) for b in packed.buckets] == [(4, 5, 8), (1, 20, 23), (1, 30, 34)]
    assert packed.real.tolist() == list(range(30)) + list(range(34, 68))  # row 0's padding left out
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 34, 8, requires_grad=True) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    weights = torch.randn_like(dense)
    real = segments != PADDING
    (dense.transpose(1, 2)[real] * weights.transpose(1, 2)[real]).sum().backward()
    expected = [dense.detach()] + [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    compact = [packed.compact(x.transpose(1, 2)).transpose(1, 2) for x in (q, k, v)]  # (1, H, N, D)
    out = packed.attend(*compact)
    (out * packed.compact(weights.transpose(1, 2)).transpose(1, 2)).sum().backward()
    out = packed.expand(out.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out.transpose(1, 2)[real], expected[0].transpose(1, 2)[real])
    assert (out.transpose(1, 2)[~real] == 0).all()  # padding: zeros
    for x, grad in zip((q, k, v), expected[1:]):
        torch.testing.assert_close(x.grad, grad)


def test_compact_and_expand_keep_the_real_positions_in_order():
    segments = torch.tensor(ROWS)
    packed = PackedAttention.from_segments(segments, packed_mask(segments))
    x = torch.arange(2 * 34.0).view(2, 34, 1)
    compact = packed.compact(x)
    assert compact.shape == (1, 64, 1) and compact[0, :, 0].tolist() == packed.real.float().tolist()
    back = packed.expand(compact)
    torch.testing.assert_close(back, torch.where((segments != PADDING)[..., None], x, 0.0))
    with pytest.raises(ValueError, match="2 rows of 34 positions"):
        packed.compact(x[:, :30])


def test_a_mask_or_segments_that_blocks_would_not_reproduce_are_refused():
    segments = torch.tensor(ROWS)
    leaky = packed_mask(segments).clone()
    leaky[0, 0, 26, 10] = True  # segment 3 sees segment 2
    with pytest.raises(ValueError, match="beyond their segment"):
        PackedAttention.from_segments(segments, leaky)
    split = segments.clone()
    split[0, 10] = 1  # segment 1 in two runs
    with pytest.raises(ValueError, match="row 0: segment 1 is not one run"):
        PackedAttention.from_segments(split, packed_mask(split))


def test_a_packed_vlm_batch_trains_as_the_dense_mask_does(tiny_shapes, tmp_path):
    """The training task hands the model its segments: the loss and every gradient (the vision tower's
    too, trained here) are those of the dense mask."""
    from multimodal_models.training.config import config_from_raw
    from multimodal_models.training.loop import build_task

    from .conftest import tiny_config

    raw = tiny_config("vlm", tiny_shapes, tmp_path / "run")
    task = build_task(config_from_raw(raw), progress=False)
    model = task.model.train()
    batch = task.make_batch([0, 1, 2, 3], random.Random(0))
    assert batch["features"] is None and batch["pixels"].shape[0] == 4  # the tower trains here: pixels
    assert (batch["segments"] == PADDING).any() and batch["segments"].max() > 3
    results = []
    for segments in (None, batch["segments"]):
        model.zero_grad()
        loss = task.loss(model, {**batch, "segments": segments})
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (dense_loss, dense_grads), (packed_loss, packed_grads) = results
    torch.testing.assert_close(packed_loss, dense_loss)
    assert dense_grads.keys() == packed_grads.keys() and any(n.startswith("vision.") for n in dense_grads)
    for name in dense_grads:
        torch.testing.assert_close(packed_grads[name], dense_grads[name], atol=1e-5, rtol=1e-4)


def test_the_loss_on_the_predicted_positions_only_is_the_loss_on_all_logits(tiny_shapes, tmp_path):
    """targets_only (as training runs): the last block's MLP and the head only where a next token is
    trained on; the logits there, the loss and every gradient are those of the full logits, on
    padded rows and on packed ones."""
    from multimodal_models.training.config import config_from_raw
    from multimodal_models.training.loop import build_task
    from multimodal_models.training.vlm_task import next_token_loss, predicted_positions

    from .conftest import tiny_config

    task = build_task(config_from_raw(tiny_config("vlm", tiny_shapes, tmp_path / "run")), progress=False)
    model = task.model.train()
    batch = task.make_batch([0, 1, 2, 3], random.Random(0))
    labels = batch["labels"]
    wanted, targets = predicted_positions(labels)

    def run(segments, targets_only):
        model.zero_grad()
        out = model(batch["ids"], batch["pixels"], mask=batch["mask"], positions=batch["positions"],
                    segments=segments, predict_at=wanted if targets_only else None)
        loss = next_token_loss(out.logits, labels, targets, targets_only=targets_only)
        loss.backward()
        return out, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, full_loss, full_grads = run(None, False)
    assert 0 < len(wanted) < (labels != -100).numel() / 2  # most positions (image, prompts, padding) predict nothing
    assert torch.equal(targets, labels[:, 1:][labels[:, 1:] != -100])
    for segments in (None, batch["segments"]):
        only, loss, grads = run(segments, True)
        assert only.logits.shape == (len(wanted), full.logits.shape[-1])
        torch.testing.assert_close(only.logits, full.logits.flatten(0, 1)[wanted])
        torch.testing.assert_close(loss, full_loss)
        assert grads.keys() == full_grads.keys()
        for name in full_grads:
            torch.testing.assert_close(grads[name], full_grads[name], atol=1e-5, rtol=1e-4)
    # the task's loss is that loss, either way (training runs targets_only)
    with torch.no_grad():
        for targets_only in (True, False):
            torch.testing.assert_close(task.loss(model, batch, targets_only=targets_only), full_loss)
    with pytest.raises(ValueError, match="predict_at is for training: give no cache"):
        model(batch["ids"][:1], batch["pixels"][:1], predict_at=wanted[:1], cache=model.decoder.new_cache(1, 96))
    packed = PackedAttention.from_segments(batch["segments"], batch["mask"])
    with pytest.raises(ValueError, match="padding"):
        packed.compact_index(torch.tensor([int((batch["segments"] == PADDING).flatten().nonzero()[0])]))


def test_a_llama_style_decoder_reads_packed_rows_as_it_reads_the_dense_mask():
    """Rotary positions (restarting after the prefix, as packing numbers them) and grouped-query
    attention: the decoder on the compact real positions gives the dense mask's logits there."""
    from multimodal_models.models.text import CausalDecoder, DecoderConfig

    torch.manual_seed(0)
    decoder = CausalDecoder(DecoderConfig(vocab_size=50, max_length=64, width=32, depth=2, heads=4, kv_heads=2,
                                          mlp="gated", act="silu", norm="rmsnorm", position="rope")).eval()
    segments = torch.tensor(ROWS)
    mask = packed_mask(segments)
    ids = torch.randint(0, 50, segments.shape)
    prefix = (segments == 0).sum(1, keepdim=True)
    first = torch.stack([(segments[b] == segments[b, :, None]).float().argmax(1) for b in range(2)])  # each run's start
    positions = torch.where(segments > 0, prefix + torch.arange(34) - first, torch.arange(34))
    with torch.no_grad():
        dense = decoder(ids, mask=mask, positions=positions)
        packed = decoder(ids, mask=PackedAttention.from_segments(segments, mask), positions=positions)
    real = segments != PADDING
    torch.testing.assert_close(packed[real], dense[real], atol=1e-5, rtol=1e-5)
