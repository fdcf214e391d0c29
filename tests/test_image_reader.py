"""Image readers: the grounding loss, what each position may read, decoding with readers."""

from __future__ import annotations

import math

import pytest
import torch

from multimodal_models.models.image_reader import GroundingTargets, grounding_loss

from .test_vlm import IMAGES, tiny_vlm


def test_grounding_loss_is_the_attention_mass_on_the_tokens_nearest_each_target():
    logits = torch.tensor([[[[0.0, 1.0, 2.0, 3.0]] * 3, [[0.5, -1.0, 0.0, 1.5], [0.0] * 4, [1.0, 2.0, 0.5, -0.5]]]])
    centres = torch.tensor([[[0.1, 0.1], [0.5, 0.5], [0.9, 0.9], [0.0, 0.0]]])
    present = torch.tensor([[True, True, True, False]])  # token 3 is an empty slot
    targets = GroundingTargets(
        rows=torch.tensor([0, 0, 0]), positions=torch.tensor([2, 0, 1]), readers=torch.tensor([0, 0, 0]),
        heads=torch.tensor([1, 0, 1]),
        points=torch.tensor([[[0.52, 0.48], [0.88, 0.9]], [[0.05, 0.02], [0.0, 0.0]], [[0.3, 0.95], [0.0, 0.0]]]),
        counts=torch.tensor([2, 1, 1]))
    loss = grounding_loss([logits], centres, present, targets)
    first = -math.log((math.exp(2.0) + math.exp(0.5)) / sum(math.exp(v) for v in (1.0, 2.0, 0.5, -0.5)))
    second = -math.log(math.exp(0.0) / sum(math.exp(v) for v in (0.0, 1.0, 2.0, 3.0)))  # (0.05, 0.02): token 0
    # the third target is 0.35 from any object: missed by the vision side, skipped (not the empty token 3)
    assert loss.item() == pytest.approx((first + second) / 2, abs=1e-6)
    nothing = GroundingTargets(*(t[2:] for t in (targets.rows, targets.positions, targets.readers, targets.heads,
                                                 targets.points, targets.counts)))
    assert grounding_loss([logits], centres, present, nothing) is None


def test_a_position_reads_only_the_images_placed_before_it():
    model = tiny_vlm(sharpen=False, image_reader_blocks=(0, 1))
    image_id, K = model.config.image_token_id, model.config.tokens_per_image
    ids = torch.tensor([[7] + [image_id] * K + [8, 9] + [image_id] * K + [10]])  # text, image 1, text, image 2, text
    features = torch.randn(2, 16, 32)  # before the projector: 16 patch tokens of width 32 per image
    second = K + 3

    def logits(image_features):
        with torch.no_grad():
            return model(ids, features=image_features).logits[0]

    base = logits(features)
    changed = features.clone()
    changed[1] += torch.randn(16, 32)
    moved = (logits(changed) - base).abs().sum(-1) > 1e-6
    assert moved.tolist() == [False] * second + [True] * (K + 1)
    with torch.no_grad():  # the readers do change what follows an image
        for reader in model.readers:
            reader.out.weight.zero_()
            reader.out.bias.zero_()
    assert not torch.allclose(logits(features), base)


@pytest.mark.parametrize("image_attention", ["causal", "bidirectional"])
def test_decoding_with_readers_is_the_same_with_or_without_cache_batched_or_beamed(image_attention):
    model = tiny_vlm(image_attention=image_attention, image_reader_blocks=(1,))
    questions = ["is there a red circle?", "what color is the star?", "describe the image."]
    with_cache = [model.ask(i, q, max_new_tokens=6) for i, q in zip(IMAGES, questions)]
    assert with_cache == [model.ask(i, q, max_new_tokens=6, use_cache=False) for i, q in zip(IMAGES, questions)]
    assert any(with_cache)
    assert model.answer_batch(questions, images=IMAGES, max_new_tokens=6) == with_cache
    beams = [model.ask(i, q, max_new_tokens=6, num_beams=3) for i, q in zip(IMAGES, questions)]
    assert beams == [model.ask(i, q, max_new_tokens=6, num_beams=3, use_cache=False) for i, q in zip(IMAGES, questions)]


def test_reader_blocks_must_exist():
    with pytest.raises(ValueError, match="image_reader_blocks: block 2 is not one of the decoder's 2 blocks"):
        tiny_vlm(image_reader_blocks=(0, 2))
