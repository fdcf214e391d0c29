"""Image readers: the grounding loss, what each position may read, decoding with readers."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from multimodal_models.shapes.grounding import GroundingTargets, grounding_loss, padded_points
from multimodal_models.shapes.models import ShapesVLM
from multimodal_models.shapes.readers import ImageReader

from .test_vlm import IMAGES
from .test_vlm import tiny_vlm as tiny_general_vlm


def tiny_vlm(seed: int = 0, sharpen: bool = True, **options) -> ShapesVLM:
    """test_vlm's tiny model as a ShapesVLM: the model type that has image readers."""
    return tiny_general_vlm(seed, sharpen, model_class=ShapesVLM, **options)


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


def test_exact_grounding_also_teaches_which_tokens_beat_the_sink_and_an_empty_group_that_none_does():
    inf = float("inf")
    margins = torch.tensor([[[[2.0, -1.0, 0.5], [1.0, -inf, -2.0]]]])  # (B=1, H=1, T=2, S=3); token 1 unseen at 1
    centres = torch.tensor([[[0.1, 0.1], [0.5, 0.5], [0.9, 0.9]]])
    present = torch.tensor([[True, True, False]])  # token 2: an empty slot, still one that should not be counted
    targets = GroundingTargets(
        rows=torch.tensor([0, 0, 0]), positions=torch.tensor([0, 1, 0]), readers=torch.tensor([0, 0, 0]),
        heads=torch.tensor([0, 0, 0]), points=torch.tensor([[[0.12, 0.1]], [[0.0, 0.0]], [[0.5, 0.52]]]),
        counts=torch.tensor([1, 0, 1]), exact=torch.tensor([True, True, False]))
    loss = grounding_loss([margins], centres, present, targets)
    below, above = (lambda x: math.log(1 + math.exp(x))), (lambda x: math.log(1 + math.exp(-x)))
    softmax_terms = [-math.log(math.exp(v) / sum(math.exp(u) for u in (2.0, -1.0, 0.5))) for v in (2.0, -1.0)]
    exact_terms = [(above(2.0) + below(-1.0) + below(0.5)) / 3,  # token 0 should beat the sink, 1 and 2 not
                   (below(1.0) + below(-2.0)) / 2]  # nothing named: the tokens seen stay below it
    assert loss.item() == pytest.approx(sum(softmax_terms) / 2 + sum(exact_terms) / 2, abs=1e-6)
    assert grounding_loss([margins], centres, present, dataclasses.replace(targets, exact=None)).item() == (
        pytest.approx(sum(softmax_terms) / 2, abs=1e-6))
    empty_only = GroundingTargets(*(t[1:2] for t in (targets.rows, targets.positions, targets.readers, targets.heads,
                                                     targets.points, targets.counts, targets.exact)))
    assert grounding_loss([margins], centres, present, empty_only).item() == pytest.approx(exact_terms[1], abs=1e-6)


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


def test_a_reader_with_a_sink_reads_and_counts_more_the_more_tokens_match_and_nothing_from_no_image():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 16)
    token = torch.randn(1, 1, 8)
    plain, with_sink = ImageReader(16, 8, 1, 4), ImageReader(16, 8, 1, 4, sink=True, counts=True)
    for reader in (plain, with_sink):
        torch.nn.init.zeros_(reader.out.bias)  # what is added is then out.weight @ (share on the tokens * v)

    def read(reader, n, visible=True):
        with torch.no_grad():
            return (reader(x, token.expand(1, n, 8), torch.full((1, 1, n), visible))[0] - x).norm().item()

    # softmax attention reads the mean: the same from one copy of a token as from five
    assert read(plain, 5) == pytest.approx(read(plain, 1), rel=1e-5)
    assert torch.equal(with_sink.count.weight, torch.zeros(16, 1))  # untrained, the count adds nothing
    with torch.no_grad():
        shares = [read(with_sink, n) for n in range(1, 6)]  # the share on the tokens grows with their number
        assert all(a < b for a, b in zip(shares, shares[1:]))
        with_sink.count.weight.normal_()
        with_sink.out.weight.zero_()  # the count alone: the number of tokens beating the sink, linear in it
        counts = [read(with_sink, n) for n in range(1, 6)]
        assert counts == pytest.approx([n * counts[0] for n in range(1, 6)], rel=1e-5) and counts[0] > 0
        with_sink.out.weight.normal_()
    assert read(with_sink, 3, visible=False) == 0.0  # no image visible: the sink takes it all, nothing is counted
    with torch.no_grad():
        with_sink.out.weight.zero_()
        with_sink.count.weight.fill_(1.0)
        tokens = torch.randn(1, 3, 8)
        updated, margins, _ = with_sink(x, tokens, torch.ones(1, 1, 3, dtype=torch.bool))
    assert margins.shape == (1, 1, 1, 3)  # over the image tokens only: grounding leaves the sink out
    # they are each token's margin over the sink: the count is the sum of their sigmoids
    assert (updated - x - with_sink.out.bias)[0, 0, 0].item() == pytest.approx(margins.sigmoid().sum().item(), rel=1e-5)
    k = with_sink.k(with_sink.context_norm(tokens))
    q = with_sink.q(with_sink.norm(x))
    sink = with_sink.sink(with_sink.norm(x))
    torch.testing.assert_close(margins[0, 0, 0], (q @ k.transpose(-1, -2) / 2 - sink)[0, 0])


def test_a_sink_without_a_share_only_counts_and_the_read_is_weighed_over_the_tokens_alone():
    torch.manual_seed(1)
    x, tokens, visible = torch.randn(2, 3, 16), torch.randn(2, 4, 8), torch.ones(2, 3, 4, dtype=torch.bool)
    visible[1, 0] = False  # the first position of row 1 sees no image yet
    plain = ImageReader(16, 8, 2, 4)
    counting = ImageReader(16, 8, 2, 4, sink=True, counts=True, sink_share=False)
    counting.load_state_dict(plain.state_dict(), strict=False)  # same q, k, v, out; the sink and count its own
    with torch.no_grad():
        torch.testing.assert_close(counting(x, tokens, visible)[0], plain(x, tokens, visible)[0])  # count is zero
        counting.count.weight.fill_(1.0)
        updated, margins, _ = counting(x, tokens, visible)
    torch.testing.assert_close(updated - plain(x, tokens, visible)[0],  # the count alone is added
                               margins.sigmoid().sum(-1).transpose(1, 2).sum(-1, keepdim=True).expand(-1, -1, 16))
    assert updated[1, 0].equal(x[1, 0] + counting.out.bias)  # nothing visible: nothing read, nothing counted
    with pytest.raises(ValueError, match="sink_share=False leaves a counting head's sink only its count: it needs counts"):
        ImageReader(16, 8, 1, 4, sink=True, sink_share=False)
    with pytest.raises(ValueError, match="image_reader_sink_share: false .* it needs image_reader_counts"):
        tiny_vlm(image_reader_blocks=(1,), image_reader_sink=True, image_reader_sink_share=False)


def test_without_the_share_only_the_counting_heads_keep_the_sink_out_of_their_read():
    torch.manual_seed(3)
    x, tokens, visible = torch.randn(2, 3, 16), torch.randn(2, 4, 8), torch.ones(2, 3, 4, dtype=torch.bool)
    visible[1, 0] = False
    mixed = ImageReader(16, 8, 2, 4, sink=True, counts=(0,), sink_share=False)  # head 0 counts, head 1 does not
    plain, shared = ImageReader(16, 8, 2, 4), ImageReader(16, 8, 2, 4, sink=True)
    for other in (plain, shared):
        other.load_state_dict(mixed.state_dict(), strict=False)
    for silenced, like in ((1, plain), (0, shared)):  # what head 0 reads, then what head 1 reads
        one_head = copy.deepcopy(mixed)
        with torch.no_grad():
            for reader in (one_head, like):
                reader.v.weight[silenced * 4:(silenced + 1) * 4] = 0.0
                reader.v.bias[silenced * 4:(silenced + 1) * 4] = 0.0
        torch.testing.assert_close(one_head(x, tokens, visible)[0], like(x, tokens, visible)[0])


def test_counts_can_be_handed_on_by_some_readers_or_some_heads_only():
    torch.manual_seed(2)
    x, tokens, visible = torch.randn(2, 3, 16), torch.randn(2, 4, 8), torch.ones(2, 3, 4, dtype=torch.bool)
    visible[1, :2, 1:] = False
    reader = ImageReader(16, 8, 3, 4, sink=True, counts=(2, 0))
    assert reader.counting_heads == (2, 0) and reader.count.in_features == 2
    silent = ImageReader(16, 8, 3, 4, sink=True)
    silent.load_state_dict(reader.state_dict(), strict=False)
    with torch.no_grad():
        reader.count.weight.copy_(torch.tensor([1.0, 10.0]).expand(16, 2))
        updated, margins, _ = reader(x, tokens, visible)
    counted = margins.sigmoid().sum(-1)  # (B, H, T): each head's count
    torch.testing.assert_close(updated - silent(x, tokens, visible)[0],  # head 2's count, plus ten times head 0's
                               (counted[:, 2] + 10 * counted[:, 0])[..., None].expand(-1, -1, 16))
    swapped = ImageReader(16, 8, 2, 4, sink=True, counts=(1, 0))  # every head, in the order named
    with torch.no_grad():
        swapped.count.weight.copy_(torch.tensor([1.0, 10.0]).expand(16, 2))
        swapped_out, swapped_margins, _ = swapped(x, tokens, visible)
        swapped.count.weight.zero_()
        counted = swapped_margins.sigmoid().sum(-1)
        torch.testing.assert_close(swapped_out - swapped(x, tokens, visible)[0],
                                   (counted[:, 1] + 10 * counted[:, 0])[..., None].expand(-1, -1, 16))
    for wrong in ((3,), (0, 0)):
        with pytest.raises(ValueError, match=r"counting heads .* must be distinct heads of 0..2"):
            ImageReader(16, 8, 3, 4, sink=True, counts=wrong)
    # in a config: a block counts with all its reader's heads, a pair [block, head] with that head alone
    some = tiny_vlm(image_reader_blocks=(0, 1), image_reader_sink=True, image_reader_counts=(0,))
    assert [r.count is not None for r in some.readers] == [True, False]
    config = dataclasses.replace(some.config, image_reader_counts=(1, [0, 2], (0, 3)))
    assert config.counting_heads == {1: (0, 1, 2, 3), 0: (2, 3)}
    heads = ShapesVLM(config).readers
    assert [r.counting_heads for r in heads] == [(2, 3), (0, 1, 2, 3)]
    for counts, message in (((1,), r"blocks \[1\] have no image reader"),
                            (([0, 4],), r"block 0's counting heads \[4\] must be distinct heads of 0..3"),
                            ((0, [0, 1]), r"block 0's counting heads \[0, 1, 2, 3, 1\] must be distinct"),
                            (("0:1",), "'0:1' is neither a block nor a pair")):
        with pytest.raises(ValueError, match=f"image_reader_counts: {message}"):
            tiny_vlm(image_reader_blocks=(0,), image_reader_sink=True, image_reader_counts=counts)


def test_a_reader_with_places_prefers_tokens_near_far_or_in_a_direction_from_the_place_it_names():
    reader = ImageReader(16, 8, 3, 4, places=True)
    context = torch.randn(1, 3, 8)
    places = torch.tensor([[[0.1, 0.2], [0.5, 0.5], [0.9, 0.7]]])
    visible = torch.ones(1, 1, 3, dtype=torch.bool)
    x = torch.randn(1, 1, 16)
    with torch.no_grad():
        plain = reader(x, context, visible, places)[1]
        without = ImageReader(16, 8, 3, 4)
        without.load_state_dict(reader.state_dict(), strict=False)  # untrained, the places change nothing
        assert torch.equal(plain, without(x, context, visible)[1])
        # head 0: near (0.55, 0.5); head 1: far from it; head 2: below it (y grows downwards)
        reader.place.bias.copy_(torch.tensor([0.55, 0.5, 1.0, 0, 0, 0.55, 0.5, -0.5, 0, 0, 0.55, 0.5, 0, 0, 2.0]))
        logits = reader(x, context, visible, places)[1]
    offset = (places[0] - torch.tensor([0.55, 0.5])) / 0.1
    distance = (offset**2).sum(-1)
    assert torch.allclose(logits[0, 0, 0] - plain[0, 0, 0], -1.0 * distance, atol=1e-4)
    assert torch.allclose(logits[0, 1, 0] - plain[0, 1, 0], 0.5 * distance, atol=1e-4)
    assert torch.allclose(logits[0, 2, 0] - plain[0, 2, 0], 2.0 * offset[:, 1], atol=1e-4)
    assert logits[0, 0, 0].argmax() == 1 and logits[0, 1, 0].argmax() == 0 and logits[0, 2, 0].argmax() == 2
    with pytest.raises(ValueError, match="pass each image token's centre"):
        reader(x, context, visible)


@pytest.mark.parametrize("image_attention,sink", [("causal", False), ("bidirectional", False), ("bidirectional", True)])
def test_decoding_with_readers_is_the_same_with_or_without_cache_batched_or_beamed(image_attention, sink):
    model = tiny_vlm(image_attention=image_attention, image_reader_blocks=(1,), image_reader_sink=sink)
    questions = ["is there a red circle?", "what color is the star?", "describe the image."]
    with_cache = [model.ask(i, q, max_new_tokens=6) for i, q in zip(IMAGES, questions)]
    assert with_cache == [model.ask(i, q, max_new_tokens=6, use_cache=False) for i, q in zip(IMAGES, questions)]
    assert any(with_cache)
    assert model.answer_batch(questions, images=IMAGES, max_new_tokens=6) == with_cache
    beams = [model.ask(i, q, max_new_tokens=6, num_beams=3) for i, q in zip(IMAGES, questions)]
    assert beams == [model.ask(i, q, max_new_tokens=6, num_beams=3, use_cache=False) for i, q in zip(IMAGES, questions)]


def test_reader_counts_need_a_sink():
    with pytest.raises(ValueError, match="image_reader_counts counts the tokens that beat each head's sink"):
        tiny_vlm(image_reader_blocks=(1,), image_reader_counts=True)
    with pytest.raises(ValueError, match="counts needs sink"):
        ImageReader(16, 8, 1, 4, counts=True)
    assert ImageReader(16, 8, 1, 4, sink=True).count is None


def test_reader_places_need_object_tokens():
    with pytest.raises(ValueError, match="image_reader_places measures distances between object centres"):
        tiny_vlm(image_reader_blocks=(1,), image_reader_places=True)


def test_reader_blocks_must_exist():
    with pytest.raises(ValueError, match="image_reader_blocks: block 2 is not one of the decoder's 2 blocks"):
        tiny_vlm(image_reader_blocks=(0, 2))


def earlier_heads_on_tokens_0_and_2():
    """A first reader on three tokens (centres (0.1, 0.2), (0.5, 0.5), (0.9, 0.7)) whose head 0 looks
    at token 0 alone and head 1 at token 2 alone: its input x, context, places, visible, and where it looked."""
    first = ImageReader(16, 8, 2, 4, places=True)
    context = torch.randn(1, 3, 8)
    places = torch.tensor([[[0.1, 0.2], [0.5, 0.5], [0.9, 0.7]]])
    visible = torch.ones(1, 1, 3, dtype=torch.bool)
    x = torch.randn(1, 1, 16)
    with torch.no_grad():
        first.q.weight.zero_()  # no preference from q.k: each head's place alone decides
        first.k.weight.zero_()
        first.place.bias.copy_(torch.tensor([0.1, 0.2, 10.0, 0, 0, 0.9, 0.7, 10.0, 0, 0]))
        looked = first(x, context, visible, places).looked
    assert torch.allclose(looked[0, :, 0], torch.eye(3)[[0, 2]], atol=1e-6)
    return x, context, places, visible, looked


def test_a_reader_with_relations_measures_objects_against_what_the_earlier_heads_found():
    """Its place can be a centre an earlier head read; it can prefer or avoid the objects an earlier head
    looked at, and those sharing an attribute (of two: 2 and 3 values) with what an earlier head read."""
    torch.manual_seed(0)
    x, context, places, visible, looked = earlier_heads_on_tokens_0_and_2()
    later = ImageReader(16, 8, 3, 4, places=True, relations=2, attribute_sizes=(2, 3))
    attributes = torch.tensor([[[1.0, 0.0, 0.0, 1.0, 0.0],  # token 0: value 0 of the first attribute, 1 of the second
                                [0.0, 1.0, 0.0, 1.0, 0.0],  # token 1: shares the second attribute's value with token 0
                                [1.0, 0.0, 0.0, 0.0, 1.0]]])  # token 2: shares the first's
    with torch.no_grad():
        plain = later(x, context, visible, places, attributes, looked).logits
        without = ImageReader(16, 8, 3, 4, places=True)
        without.load_state_dict(later.state_dict(), strict=False)  # untrained, the relations change nothing
        assert torch.equal(plain, without(x, context, visible, places).logits)
        with pytest.raises(ValueError, match="pass where its heads looked"):
            later(x, context, visible, places, attributes)
        with pytest.raises(ValueError, match="pass each image token's attribute probabilities"):
            later(x, context, visible, places, None, looked)

        # per head and earlier head p: [place share logit, same-object weight, attribute 0 weight, attribute 1 weight,
        # for each earlier head q the direction (x, y) in which what p found should lie from what q found]
        relate = torch.zeros(3, 2, 8)
        relate[0, 1, 0] = 20.0  # head 0: its place is what earlier head 1 read (token 2's centre) ...
        later.place.bias.copy_(torch.tensor([0, 0, 1.0, 0, 0] + [0] * 10))  # ... and it prefers objects near it
        relate[1, 0, 1] = -1.0  # head 1: avoids the object earlier head 0 looked at (token 0) ...
        relate[1, 0, 3] = 0.5  # ... and prefers those sharing its second attribute
        relate[2, 1, 2] = 2.0  # head 2: prefers objects sharing earlier head 1's first attribute
        later.relate.bias.copy_(relate.flatten())
        logits = later(x, context, visible, places, attributes, looked).logits
        # head 0 again: what earlier head 0 read, measured upwards from what head 1 read, on head 0's object alone
        relate[0, 0, 6:] = torch.tensor([0.0, -1.0])
        later.relate.bias.copy_(relate.flatten())
        above = later(x, context, visible, places, attributes, looked).logits
    distance = ((places[0] - places[0, 2]) / 0.1).square().sum(-1)
    assert torch.allclose(logits[0, 0, 0] - plain[0, 0, 0], -distance, atol=1e-3)
    assert torch.allclose(logits[0, 1, 0] - plain[0, 1, 0], torch.tensor([-10.0 + 5.0, 5.0, 0.0]), atol=1e-4)
    assert torch.allclose(logits[0, 2, 0] - plain[0, 2, 0], torch.tensor([20.0, 0.0, 20.0]), atol=1e-4)
    # token 0 (at y 0.2) lies 5 tenths above token 2 (y 0.7): +5 on token 0 alone
    assert torch.allclose(above[0, 0, 0] - logits[0, 0, 0], torch.tensor([5.0, 0.0, 0.0]), atol=1e-3)


def test_reader_relations_need_places_and_an_earlier_reader():
    with pytest.raises(ValueError, match="relations needs places"):
        ImageReader(16, 8, 2, 4, relations=2)
    with pytest.raises(ValueError, match="image_reader_relations relate a reader to the one before it"):
        tiny_vlm(image_reader_blocks=(1,), image_reader_relations=True)


def test_a_reader_with_separations_hands_on_where_what_one_earlier_head_found_lies_from_another():
    """Into the residual, through zero-initialised weights: untrained, it reads as a reader without; set to
    pass on one separation, x changes by exactly where head 0's find lies from head 1's, in tenths."""
    torch.manual_seed(0)
    x, context, places, visible, looked = earlier_heads_on_tokens_0_and_2()
    later = ImageReader(16, 8, 3, 4, places=True, relations=2, separations=True)
    with torch.no_grad():
        untrained = later(x, context, visible, places, None, looked).x
        without = ImageReader(16, 8, 3, 4, places=True, relations=2)
        without.load_state_dict(later.state_dict(), strict=False)
        assert torch.equal(untrained, without(x, context, visible, places, None, looked).x)
        # inputs ordered (p, q, axis): column 2 is head 0's find from head 1's, along x; column 3 along y
        later.separation.weight[0, 2] = 1.0
        later.separation.weight[1, 3] = 1.0
        later.separation.weight[2, 5] = 1.0  # head 1's from head 0's, along y
        moved = later(x, context, visible, places, None, looked).x - untrained
    # token 0 (0.1, 0.2) from token 2 (0.9, 0.7): 8 tenths left, 5 up
    assert torch.allclose(moved[0, 0, :3], torch.tensor([-8.0, -5.0, 5.0]), atol=1e-4)
    assert torch.equal(moved[0, 0, 3:], torch.zeros(13))


def test_reader_separations_need_relations():
    with pytest.raises(ValueError, match="separations needs relations"):
        ImageReader(16, 8, 2, 4, places=True, separations=True)
    with pytest.raises(ValueError, match="image_reader_separations .* needs image_reader_relations"):
        tiny_vlm(image_reader_blocks=(0, 1), image_reader_separations=True)


def test_padded_points_keep_each_group_in_order_with_zeros_after():
    points, counts = padded_points([[(0.1, 0.2), (0.3, 0.4)], [], [(0.5, 0.6)]])
    assert counts.tolist() == [2, 0, 1]
    assert torch.equal(points, torch.tensor([[[0.1, 0.2], [0.3, 0.4]], [[0.0, 0.0], [0.0, 0.0]], [[0.5, 0.6], [0.0, 0.0]]]))
    assert padded_points([[], []])[0].shape == (2, 1, 2)  # no points at all: one zero slot per group
