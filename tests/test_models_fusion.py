"""Alignment losses (values by hand, gradients, limits) and the three fusions (shapes, padding, both modalities)."""

from __future__ import annotations

import math

import pytest
import torch

from multimodal_models.models.fusion import (
    CrossAttentionFusion,
    EarlyFusion,
    FiLMFusion,
    FusionConfig,
    LateFusion,
    RelationFusion,
    build_fusion,
    grid_coordinates,
    pool_grid,
    with_coordinates,
)
from multimodal_models.models.losses import ContrastiveLoss, SigmoidLoss, clip_loss, siglip_loss
from multimodal_models.models.text import TextOutput
from multimodal_models.models.vision import VisionOutput

torch.set_num_threads(1)


# --- losses -----------------------------------------------------------------------------------


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _pairs(seed: int = 0, batch: int = 3, dim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, dim, generator=g, dtype=torch.float64) for _ in range(2))


def test_clip_loss_matches_hand_computation():
    img, txt = _pairs()
    scale = 1.3
    i, t = _unit(img), _unit(txt)
    B = img.shape[0]
    total = 0.0
    for a in range(B):  # image -> text
        logits = [math.exp(scale) * float(i[a] @ t[b]) for b in range(B)]
        total += -(logits[a] - math.log(sum(math.exp(z) for z in logits))) / B / 2
    for b in range(B):  # text -> image
        logits = [math.exp(scale) * float(i[a] @ t[b]) for a in range(B)]
        total += -(logits[b] - math.log(sum(math.exp(z) for z in logits))) / B / 2
    assert clip_loss(img, txt, torch.tensor(scale, dtype=torch.float64)).item() == pytest.approx(total, rel=1e-10)
    # normalising inside: scaling the inputs changes nothing
    assert clip_loss(3 * img, 0.5 * txt, scale).item() == pytest.approx(total, rel=1e-10)


def test_siglip_loss_matches_hand_computation():
    img, txt = _pairs(1)
    scale, bias = 2.0, -3.0
    i, t = _unit(img), _unit(txt)
    B = img.shape[0]
    total = 0.0
    for a in range(B):  # sum over texts, mean over images (big_vision)
        for b in range(B):
            label = 1.0 if a == b else -1.0
            z = label * (math.exp(scale) * float(i[a] @ t[b]) + bias)
            total += -math.log(1 / (1 + math.exp(-z))) / B
    got = siglip_loss(img, txt, torch.tensor(scale, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64))
    assert got.item() == pytest.approx(total, rel=1e-10)


@pytest.mark.parametrize("module", [ContrastiveLoss, SigmoidLoss])
def test_gradients_reach_the_temperature(module):
    loss_fn = module()
    img, txt = (x.float().requires_grad_() for x in _pairs(2))
    loss_fn(img, txt).backward()
    assert loss_fn.logit_scale.grad is not None and loss_fn.logit_scale.grad.abs() > 0
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0
    if module is SigmoidLoss:
        assert loss_fn.logit_bias.grad.abs() > 0


def test_initial_values_and_clamp():
    clip, sig = ContrastiveLoss(), SigmoidLoss()
    assert clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert sig.logit_scale.item() == pytest.approx(math.log(10)) and sig.logit_bias.item() == -10
    with torch.no_grad():
        clip.logit_scale.fill_(10.0)
    assert clip.scale().exp().item() == pytest.approx(100.0)
    e = torch.eye(2)
    assert clip.logits(e, e)[0, 0].item() == pytest.approx(100.0)


def test_perfect_alignment_gives_low_loss():
    emb = torch.eye(8)  # orthogonal unit vectors, image i == text i
    random_img, random_txt = torch.randn(8, 8), torch.randn(8, 8)
    assert clip_loss(emb, emb, math.log(100)) < 1e-3
    assert clip_loss(emb, emb, math.log(100)) < clip_loss(random_img, random_txt, math.log(100))
    assert siglip_loss(emb, emb, math.log(100), -10.0) < 0.01
    assert siglip_loss(emb, emb, math.log(100), -10.0) < siglip_loss(random_img, random_txt, math.log(100), -10.0)


# --- fusions ----------------------------------------------------------------------------------

IMAGE_DIM, TEXT_DIM, B, T, N = 24, 16, 3, 5, 7


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = VisionOutput(torch.randn(B, N, IMAGE_DIM, generator=g), torch.randn(B, IMAGE_DIM, generator=g))
    text = TextOutput(torch.randn(B, T, TEXT_DIM, generator=g), torch.randn(B, TEXT_DIM, generator=g))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 3:] = 0  # row 1 has 3 real tokens
    return image, text, mask


FUSIONS = [
    FusionConfig(kind="early", width=32, depth=2, heads=4),
    FusionConfig(kind="middle", width=32, depth=2, heads=4),
    FusionConfig(kind="late", width=32, late_mode="concat"),
    FusionConfig(kind="late", width=32, late_mode="product"),
    FusionConfig(kind="late", width=32, late_mode="gated"),
    FusionConfig(kind="film", width=32, depth=2),
    FusionConfig(kind="relation", width=32, depth=3),
]
IDS = ["early", "middle", "late-concat", "late-product", "late-gated", "film", "relation"]
GRID = 2  # the FiLM fusion reads the last GRID**2 of the N tokens as a grid


@pytest.fixture(params=FUSIONS, ids=IDS)
def fusion(request):
    torch.manual_seed(0)
    return build_fusion(request.param, IMAGE_DIM, TEXT_DIM, grid=GRID).eval()


def test_build_fusion_types():
    assert isinstance(build_fusion(FUSIONS[0], IMAGE_DIM, TEXT_DIM), EarlyFusion)
    assert isinstance(build_fusion(FUSIONS[1], IMAGE_DIM, TEXT_DIM), CrossAttentionFusion)
    assert isinstance(build_fusion(FUSIONS[2], IMAGE_DIM, TEXT_DIM), LateFusion)
    assert isinstance(build_fusion(FUSIONS[5], IMAGE_DIM, TEXT_DIM, grid=GRID), FiLMFusion)
    assert isinstance(build_fusion(FUSIONS[6], IMAGE_DIM, TEXT_DIM), RelationFusion)
    with pytest.raises(ValueError, match="grid"):
        build_fusion(FUSIONS[5], IMAGE_DIM, TEXT_DIM)
    with pytest.raises(ValueError, match="token_pool"):
        build_fusion(FusionConfig(token_pool=0), IMAGE_DIM, TEXT_DIM)
    with pytest.raises(ValueError, match="kind"):
        build_fusion(FusionConfig(kind="sideways"), IMAGE_DIM, TEXT_DIM)
    with pytest.raises(ValueError, match="late_mode"):
        build_fusion(FusionConfig(kind="late", late_mode="sum"), IMAGE_DIM, TEXT_DIM)


def test_output_shape(fusion):
    image, text, mask = _inputs()
    out = fusion(image, text, mask)
    assert out.shape == (B, fusion.out_dim) == (B, 32)
    assert torch.isfinite(out).all()


def test_padding_does_not_change_the_output(fusion):
    image, text, mask = _inputs()
    before = fusion(image, text, mask)
    pad = torch.randn(B, 4, TEXT_DIM) * 10  # whatever the encoder left on padding positions
    padded = TextOutput(torch.cat([text.tokens, pad], dim=1), text.pooled)
    padded_mask = torch.cat([mask, torch.zeros(B, 4, dtype=mask.dtype)], dim=1)
    after = fusion(image, padded, padded_mask)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    # and the masked positions inside the original length are ignored too
    scrambled = text.tokens.clone()
    scrambled[1, 3:] = torch.randn(T - 3, TEXT_DIM)
    torch.testing.assert_close(fusion(image, TextOutput(scrambled, text.pooled), mask), before, atol=1e-5, rtol=0)


def test_both_modalities_are_used(fusion):
    image, text, mask = _inputs()
    other_image, other_text, _ = _inputs(seed=1)
    out = fusion(image, text, mask)
    assert (fusion(other_image, text, mask) - out).abs().amax(dim=-1).min() > 1e-4  # every row changes
    assert (fusion(image, other_text, mask) - out).abs().amax(dim=-1).min() > 1e-4


def test_fusions_backpropagate_to_both_inputs(fusion):
    image, text, mask = _inputs()
    image = VisionOutput(image.tokens.requires_grad_(), image.pooled.requires_grad_())
    text = TextOutput(text.tokens.requires_grad_(), text.pooled.requires_grad_())
    fusion(image, text, mask).sum().backward()

    def grad_norm(*tensors):  # a fusion reads tokens or the pooled vector, not necessarily both
        return sum(float(t.grad.abs().sum()) for t in tensors if t.grad is not None)

    assert grad_norm(*image) > 0 and grad_norm(*text) > 0


def test_relation_fusion_is_g_over_every_ordered_pair_with_the_question():
    """The factorised first layer of g gives what concatenating [o_i; o_j; q] per pair gives."""
    torch.manual_seed(0)
    fusion = RelationFusion(IMAGE_DIM, TEXT_DIM, width=16, depth=3).eval()
    image, text, mask = _inputs()
    first = torch.cat([fusion.left.weight, fusion.right.weight, fusion.question.weight], dim=1)  # (C, 2D + Dt)
    expected = []
    for b in range(B):
        pairs = [torch.cat([image.tokens[b, i], image.tokens[b, j], text.pooled[b]]) for i in range(N) for j in range(N)]
        hidden = fusion.g(torch.stack(pairs) @ first.T + fusion.left.bias)  # g's ReLU and later layers
        expected.append(fusion.f(hidden.mean(dim=0)))
    torch.testing.assert_close(fusion(image, text, mask), torch.stack(expected), atol=1e-5, rtol=1e-5)


def test_film_gammas_and_betas_come_from_the_question_only():
    """With the question's (gamma, beta) forced to (1, 0) the output is that of the same blocks without
    FiLM: the question acts through them and nothing else."""
    torch.manual_seed(0)
    fusion = build_fusion(FusionConfig(kind="film", width=8, depth=2), IMAGE_DIM, TEXT_DIM, grid=GRID).eval()
    image, text, mask = _inputs()
    with torch.no_grad():
        fusion.film.weight.zero_()
        fusion.film.bias.zero_()
    one = fusion(image, text, mask)
    other = fusion(image, TextOutput(text.tokens, torch.randn_like(text.pooled)), mask)
    torch.testing.assert_close(one, other)
    x = fusion.stem(image.tokens[:, -GRID * GRID:].transpose(1, 2).reshape(B, IMAGE_DIM, GRID, GRID))
    for block in fusion.blocks:
        x = x + torch.relu(block.norm(block.conv2(torch.relu(block.conv1(x)))))
    torch.testing.assert_close(one, fusion.head(x).amax(dim=(2, 3)))


def test_coordinates_and_grid_pooling():
    coords = grid_coordinates(2)
    torch.testing.assert_close(coords, torch.tensor([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]]))
    tokens = torch.arange(2 * 16 * 3, dtype=torch.float32).view(2, 16, 3)
    out = with_coordinates(tokens, 4)
    assert out.shape == (2, 16, 5) and torch.equal(out[..., :3], tokens)
    assert out[0, 1, 3] > out[0, 0, 3] and out[0, 4, 4] > out[0, 0, 4]  # x grows along a row, y down the rows
    with_class = with_coordinates(torch.zeros(1, 17, 3), 4)
    assert torch.equal(with_class[0, 0, 3:], torch.zeros(2))  # a class token sits nowhere
    with pytest.raises(ValueError, match="grid"):
        with_coordinates(torch.zeros(1, 15, 3), 4)
    pooled, grid = pool_grid(tokens, 4, 2)
    assert grid == 2 and pooled.shape == (2, 4, 3)
    assert torch.equal(pooled[0, 0], tokens[0, 5])  # the max of cells 0, 1, 4, 5 (values grow with the index)
    with pytest.raises(ValueError, match="token_pool"):
        pool_grid(tokens, 4, 3)
