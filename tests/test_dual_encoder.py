"""DualEncoder: shapes and normalisation, save/load round trip, training on a toy set, zero-shot classification."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from multimodal_models.data.preprocess import ImageProcessor
from multimodal_models.data.tokenizer import WordTokenizer
from multimodal_models.errors import DataFormatError
from multimodal_models.models.dual_encoder import (
    IMAGENET_TEMPLATES,
    DualEncoder,
    DualEncoderConfig,
    DualEncoderOutput,
)
from multimodal_models.models.pretrained import config_from_dict, config_to_dict
from multimodal_models.models.text import TextEncoderConfig
from multimodal_models.models.vision import VisionConfig
from multimodal_models.shapes.models import SHAPES_TEMPLATES
from multimodal_models.training.tasks import contrastive_loss

torch.set_num_threads(1)

CAPTIONS = [
    "a red circle",
    "a blue square",
    "two green stars",
    "a small yellow triangle",
    "a large purple hexagon",
    "three white diamonds",
    "an orange circle and a cyan star",
    "an empty scene",
]
TOKENIZER = WordTokenizer.train(CAPTIONS + [t.format("x") for t in SHAPES_TEMPLATES] + ["a photo of", "picture black"])


def tiny_config(loss: str = "clip") -> DualEncoderConfig:
    return DualEncoderConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2),
        text=TextEncoderConfig(vocab_size=TOKENIZER.vocab_size, max_length=16, width=32, depth=1, heads=2),
        embed_dim=16,
        loss=loss,
    )


def tiny_model(loss: str = "clip", seed: int = 0) -> DualEncoder:
    torch.manual_seed(seed)
    model = DualEncoder(tiny_config(loss))
    model.tokenizer = TOKENIZER
    model.image_processor = ImageProcessor(size={"height": 32, "width": 32})
    return model.eval()


def random_images(n: int, seed: int = 0, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_forward_shapes_and_unit_embeddings(loss):
    model = tiny_model(loss)
    pixels = torch.randn(3, 3, 32, 32)
    ids = torch.randint(5, TOKENIZER.vocab_size, (3, 6))
    out = model(pixels, ids, torch.ones_like(ids))
    assert isinstance(out, DualEncoderOutput)
    assert out.image_embeds.shape == out.text_embeds.shape == (3, 16)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(3))
    cos = out.image_embeds @ out.text_embeds.T
    if loss == "clip":
        expected = cos / 0.07
    else:
        expected = 10 * cos - 10
    torch.testing.assert_close(out.logits_per_image, expected, rtol=1e-5, atol=1e-5)
    loss_value = contrastive_loss(model, out)
    assert loss_value.ndim == 0 and torch.isfinite(loss_value)
    assert out.negative_embeds is None and out.image_tokens.shape[0] == 3


def test_unknown_loss_is_an_error():
    with pytest.raises(ValueError, match="unknown loss 'infonce'"):
        DualEncoder(tiny_config("infonce"))


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_config_round_trips_through_a_dict(loss):
    config = tiny_config(loss)
    assert config_from_dict(DualEncoderConfig, config_to_dict(config)) == config


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_save_and_load_give_identical_outputs(tmp_path, loss):
    model = tiny_model(loss)
    with torch.no_grad():  # move the loss parameters off their init so the test sees them travel
        model.criterion.logit_scale.add_(0.25)
    images = random_images(3)
    texts = CAPTIONS[:3]
    model.save_pretrained(tmp_path / "model")
    loaded = DualEncoder.from_pretrained(tmp_path / "model")
    assert loaded.config == model.config
    assert loaded.tokenizer is not None and loaded.image_processor == model.image_processor
    assert torch.equal(loaded.embed_images(images), model.embed_images(images))
    assert torch.equal(loaded.embed_texts(texts), model.embed_texts(texts))
    pixels = model.image_processor(images)
    ids, mask = torch.randint(5, TOKENIZER.vocab_size, (3, 5)), torch.ones(3, 5, dtype=torch.long)
    for a, b in zip(loaded(pixels, ids, mask), model(pixels, ids, mask)):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(contrastive_loss(loaded, loaded(pixels, ids, mask)), contrastive_loss(model, model(pixels, ids, mask)))


def test_loading_with_a_missing_weight_names_the_key(tmp_path):
    folder = tiny_model().save_pretrained(tmp_path / "model")
    weights = load_file(str(folder / "model.safetensors"))
    del weights["text_projection.weight"]
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(DataFormatError, match="text_projection.weight"):
        DualEncoder.from_pretrained(folder)


def test_embed_helpers_accept_paths_bytes_and_images_and_ignore_batching(tmp_path):
    model = tiny_model()
    images = random_images(3)
    path = tmp_path / "a.png"
    images[0].save(path)
    mixed = model.embed_images([path, png_bytes(images[1]), images[2]])
    torch.testing.assert_close(mixed, model.embed_images(images), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.embed_images(images, batch_size=1), mixed, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.embed_images(path), mixed[:1], rtol=0, atol=1e-6)  # one image, not a list
    # texts of different lengths: padded in a batch or alone, the embedding is the same
    together = model.embed_texts(CAPTIONS)
    alone = torch.cat([model.embed_texts([c]) for c in CAPTIONS])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.embed_texts(CAPTIONS, batch_size=3), together, rtol=0, atol=1e-5)
    assert together.grad_fn is None and not together.requires_grad  # computed under no_grad


def test_helpers_explain_missing_preprocessing_and_bad_input():
    model = DualEncoder(tiny_config())
    with pytest.raises(RuntimeError, match="no tokenizer attached"):
        model.embed_texts(["a red circle"])
    with pytest.raises(RuntimeError, match="no image_processor attached"):
        model.embed_images(random_images(1))
    model = tiny_model()
    with pytest.raises(TypeError, match="list of texts"):
        model.embed_texts("a red circle")
    with pytest.raises(ValueError, match="at most 16"):
        model.embed_texts(["a red circle " * 10])
    model.image_processor = ImageProcessor(size={"height": 48, "width": 48})
    with pytest.raises(ValueError, match="expects 32x32"):
        model.embed_images(random_images(1))


# Eight colours and a caption naming each: what a tiny dual encoder can learn to align in a few seconds.
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40),
           "white": (240, 240, 240), "black": (15, 15, 15), "purple": (150, 50, 190), "cyan": (40, 210, 220)}
COLOUR_CAPTIONS = [f"a {name} picture" for name in COLOURS]


def colour_images(seed: int, size: int = 32) -> list[Image.Image]:
    """One noisy picture of each colour, in COLOURS' order; each seed draws fresh noise."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(np.clip(np.array(rgb) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8))
            for rgb in COLOURS.values()]


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_training_aligns_images_and_captions_on_fresh_images(loss):
    """What was learned, on pictures never trained on: each finds its caption and each caption its picture."""
    model = tiny_model(loss).train()
    encoded = [TOKENIZER.encode(c, add_special_tokens=True) for c in COLOUR_CAPTIONS]
    ids = torch.zeros(8, max(map(len, encoded)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(encoded):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(200):  # fresh noise every step: the colour is the only thing to align
        value = contrastive_loss(model, model(model.image_processor(colour_images(seed=step)), ids, mask))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    model.eval()
    target = torch.arange(8)
    similarity = model.embed_images(colour_images(seed=10_000)) @ model.embed_texts(COLOUR_CAPTIONS).T
    assert (similarity.argmax(1) == target).sum() >= 7  # image -> text (chance: 1)
    assert (similarity.argmax(0) == target).sum() >= 7  # text -> image
    with torch.no_grad():  # the tensors path agrees with the helpers
        out = model(model.image_processor(colour_images(seed=10_000)), ids, mask)
    assert torch.equal(out.logits_per_image.argmax(1), similarity.argmax(1))


def test_classify_clip_probabilities_sum_to_one_in_label_order():
    model = tiny_model("clip")
    labels = ["a red circle", "a blue square", "two green stars"]
    result = model.classify(random_images(1)[0], labels)
    assert [label for label, _ in result] == labels
    probs = [p for _, p in result]
    assert sum(probs) == pytest.approx(1.0, abs=1e-5) and all(0 <= p <= 1 for p in probs)
    # templates are ensembled: one template gives a different answer than the default six
    single = model.classify(random_images(1)[0], labels, templates=["{}."])
    assert [label for label, _ in single] == labels and sum(p for _, p in single) == pytest.approx(1.0, abs=1e-5)
    assert single != result
    assert len(IMAGENET_TEMPLATES) >= 5 and all("{}" in t for t in IMAGENET_TEMPLATES)


def test_classify_ensembles_normalised_template_embeddings():
    model = tiny_model("clip")
    labels, templates = ["a red circle", "a blue square"], ["{}.", "there is {}."]
    image = random_images(1)[0]
    per_template = model.embed_texts([t.format(label) for label in labels for t in templates]).view(2, 2, -1)
    classes = per_template.mean(1)
    classes = classes / classes.norm(dim=-1, keepdim=True)
    logits = model.criterion.scale().exp().item() * (model.embed_images([image]) @ classes.T)[0]
    expected = logits.softmax(-1)
    got = torch.tensor([p for _, p in model.classify(image, labels, templates)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_classify_siglip_gives_independent_sigmoid_probabilities():
    model = tiny_model("siglip")
    labels = ["a red circle", "a blue square", "two green stars"]
    result = model.classify(random_images(1)[0], labels)
    assert [label for label, _ in result] == labels
    assert all(0 < p < 1 for _, p in result)
    assert sum(p for _, p in result) < 0.5  # bias -10 at init: nothing matches yet, and nothing forces a sum of 1


def test_classify_rejects_bad_labels_and_templates():
    model = tiny_model()
    image = random_images(1)[0]
    with pytest.raises(ValueError, match="non-empty list"):
        model.classify(image, [])
    with pytest.raises(ValueError, match="no '{}'"):
        model.classify(image, ["a red circle"], templates=["a photo"])
