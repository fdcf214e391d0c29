"""FusionClassifier (VQA as classification): shapes, padding, save/load, learning questions that need both inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from multimodal_models.data.preprocess import ImageProcessor
from multimodal_models.data.tokenizer import WordTokenizer
from multimodal_models.errors import DataFormatError
from multimodal_models.models.classifier import FusionClassifier, FusionClassifierConfig
from multimodal_models.models.cnn import CNNConfig
from multimodal_models.models.inputs import tokenize
from multimodal_models.models.fusion import FusionConfig
from multimodal_models.models.pretrained import config_from_dict, config_to_dict
from multimodal_models.models.text import TextEncoderConfig
from multimodal_models.models.vision import VisionConfig

torch.set_num_threads(1)

QUESTIONS = ["is the image bright?", "is the image dark?", "what colour is the picture, would you say?"]
TOKENIZER = WordTokenizer.train(QUESTIONS)
FUSIONS = {
    "early": FusionConfig(kind="early", width=32, depth=1, heads=2),
    "middle": FusionConfig(kind="middle", width=32, depth=1, heads=2),
    "late-concat": FusionConfig(kind="late", width=32, late_mode="concat"),
    "late-product": FusionConfig(kind="late", width=32, late_mode="product"),
    "late-gated": FusionConfig(kind="late", width=32, late_mode="gated"),
    "film": FusionConfig(kind="film", width=16, depth=2),
    "relation": FusionConfig(kind="relation", width=32, depth=2, token_pool=2),
}


def tiny_model(fusion: str = "middle", seed: int = 0, answers=("yes", "no")) -> FusionClassifier:
    torch.manual_seed(seed)
    config = FusionClassifierConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2, pool="mean"),
        text=TextEncoderConfig(vocab_size=TOKENIZER.vocab_size, max_length=16, width=32, depth=1, heads=2),
        fusion=FUSIONS[fusion],
        answers=tuple(answers),
        hidden=32,
    )
    model = FusionClassifier(config)
    model.tokenizer = TOKENIZER
    model.image_processor = ImageProcessor(size={"height": 32, "width": 32})
    return model.eval()


def brightness_images(bright: list[bool], seed: int = 0) -> list[Image.Image]:
    """Noisy images whose mean brightness is high (bright) or low (dark)."""
    rng = np.random.default_rng(seed)
    images = []
    for b in bright:
        low, high = (140, 256) if b else (0, 116)
        images.append(Image.fromarray(rng.integers(low, high, (32, 32, 3), dtype=np.uint8)))
    return images


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_logits_shape_and_padding_invariance(fusion):
    model = tiny_model(fusion, answers=("yes", "no", "maybe"))
    pixels = model.image_processor(brightness_images([True, False]))
    ids, mask = tokenize(TOKENIZER, QUESTIONS[:2], 16)
    logits = model(pixels, ids, mask)
    assert logits.shape == (2, 3)
    padded_ids = torch.cat([ids, torch.full((2, 5), TOKENIZER.pad_id)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 5, dtype=mask.dtype)], dim=1)
    torch.testing.assert_close(model(pixels, padded_ids, padded_mask), logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_answer_depends_on_image_and_question(fusion):
    model = tiny_model(fusion)
    pixels = model.image_processor(brightness_images([True, False]))
    ids, mask = tokenize(TOKENIZER, [QUESTIONS[0], QUESTIONS[0]], 16)
    other_ids, other_mask = tokenize(TOKENIZER, [QUESTIONS[2], QUESTIONS[2]], 16)
    logits = model(pixels, ids, mask)
    assert (logits[0] - logits[1]).abs().max() > 1e-5  # same question, different image
    assert (model(pixels, other_ids, other_mask) - logits).abs().max() > 1e-5  # same image, different question


def test_answer_helpers():
    model = tiny_model("middle", answers=("yes", "no", "maybe"))
    images = brightness_images([True, False, True])
    answer, confidence = model.answer(images[0], QUESTIONS[0])
    assert answer in ("yes", "no", "maybe") and 1 / 3 <= confidence <= 1
    questions = [QUESTIONS[0], QUESTIONS[2], QUESTIONS[1]]
    answers, confidences = model.predict(questions, images=images)
    singles = [model.answer(i, q) for i, q in zip(images, questions)]
    assert answers == [a for a, _ in singles] == model.answer_batch(questions, images=images)
    assert confidences == pytest.approx([c for _, c in singles], abs=1e-5)
    pixels = model.image_processor(images)
    assert model.answer_batch(questions, pixels=pixels) == answers
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        model.answer_batch(QUESTIONS[:1], images=images[:2])


def test_config_validation_and_dict_round_trip():
    with pytest.raises(ValueError, match="more than once"):
        tiny_model(answers=("yes", "no", "yes"))
    with pytest.raises(ValueError, match="empty"):
        tiny_model(answers=())
    config = tiny_model("late-gated").config
    assert config_from_dict(FusionClassifierConfig, config_to_dict(config)) == config


@pytest.mark.parametrize("fusion", ["early", "middle", "late-gated"])
def test_save_and_load_give_identical_outputs(tmp_path, fusion):
    model = tiny_model(fusion, answers=("yes", "no", "two"))
    folder = model.save_pretrained(tmp_path / "model")
    loaded = FusionClassifier.from_pretrained(folder)
    assert loaded.config == model.config and loaded.config.answers == ("yes", "no", "two")
    images = brightness_images([True, False])
    pixels = model.image_processor(images)
    ids, mask = tokenize(TOKENIZER, QUESTIONS[:2], 16)
    assert torch.equal(loaded(pixels, ids, mask), model(pixels, ids, mask))
    assert loaded.predict(QUESTIONS[:2], images=images) == model.predict(QUESTIONS[:2], images=images)


def test_loading_with_a_missing_weight_names_the_key(tmp_path):
    folder = tiny_model("middle").save_pretrained(tmp_path / "model")
    weights = load_file(str(folder / "model.safetensors"))
    del weights["fusion.blocks.0.cross_attn.k.weight"]
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(DataFormatError, match=r"fusion\.blocks\.0\.cross_attn\.k\.weight"):
        FusionClassifier.from_pretrained(folder)


BRIGHTNESS_ANSWERS = ("yes", "no", "light", "dark")


def brightness_questions(count: int, seed: int) -> tuple[list[Image.Image], list[str], list[str]]:
    """Random images and questions whose answer needs both: 'is the image bright?' is answered yes or no,
    'what colour is the picture, would you say?' light or dark, each by the image's brightness. The
    question alone tells the pair of answers, the image alone the brightness: either gets at most half right."""
    rng = np.random.default_rng(seed)
    bright = [bool(b) for b in rng.integers(0, 2, count)]
    asks_yes_no = [bool(a) for a in rng.integers(0, 2, count)]
    questions = [QUESTIONS[0] if a else QUESTIONS[2] for a in asks_yes_no]
    answers = [("yes" if b else "no") if a else ("light" if b else "dark") for b, a in zip(bright, asks_yes_no)]
    return brightness_images(bright, seed=seed + 1), questions, answers


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_learns_a_question_that_needs_both_inputs(fusion):
    """Trained on 256 examples, the model answers fresh images and questions right: over 90% on each
    question, where chance is 25% and one input alone gives at most 50%. Over 20 seeds of weights and data
    the slowest fusion (early) stays there from step 65 at the latest: 150 steps leave over twice that."""
    model = tiny_model(fusion, answers=BRIGHTNESS_ANSWERS).train()
    images, questions, answers = brightness_questions(256, seed=1)
    pixels = model.image_processor(images)
    ids, mask = tokenize(TOKENIZER, questions, 16)
    labels = torch.tensor([BRIGHTNESS_ANSWERS.index(a) for a in answers])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    order = torch.Generator().manual_seed(0)
    for _ in range(150):
        batch = torch.randperm(len(labels), generator=order)[:32]
        loss = torch.nn.functional.cross_entropy(model(pixels[batch], ids[batch], mask[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    # fresh images and questions (not the training ones), through the user-level helper
    images, questions, answers = brightness_questions(64, seed=7)
    predicted = model.answer_batch(questions, images=images)
    for question in (QUESTIONS[0], QUESTIONS[2]):
        pairs = [(p, a) for p, a, q in zip(predicted, answers, questions) if q == question]
        accuracy = sum(p == a for p, a in pairs) / len(pairs)
        assert accuracy >= 0.9, f"{question!r}: {accuracy:.0%} right on fresh inputs"


@pytest.mark.parametrize("fusion", ["middle", "film", "relation"])
def test_questions_about_one_image_encode_it_once(fusion):
    """image_index gives each question its image: the logits equal those of one copy of the image per question."""
    model = tiny_model(fusion)
    pixels = model.image_processor(brightness_images([True, False]))
    ids, mask = tokenize(TOKENIZER, QUESTIONS + QUESTIONS[:1], 16)
    index = torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(model(pixels, ids, mask, image_index=index), model(pixels[index], ids, mask))
    with pytest.raises(ValueError, match="image_index"):
        model(pixels, ids, mask)


def test_the_cnn_encoder_gives_a_grid_of_tokens():
    config = FusionClassifierConfig(encoder="cnn", cnn=CNNConfig(image_size=32, channels=(8, 16, 16), strides=(1, 2, 2)),
                                    text=TextEncoderConfig(vocab_size=TOKENIZER.vocab_size, max_length=16, width=32,
                                                           depth=1, heads=2),
                                    fusion=FusionConfig(kind="film", width=16, depth=1, coordinates=True), hidden=32)
    model = FusionClassifier(config).eval()
    assert config.image_size == 32 and config.grid == 8 and model.grid == 8
    pixels = ImageProcessor(size={"height": 32, "width": 32})(brightness_images([True, False]))
    image = model.image_tokens(pixels)
    assert image.tokens.shape == (2, 64, 16 + 2)  # the CNN's channels and (x, y)
    ids, mask = tokenize(TOKENIZER, QUESTIONS[:2], 16)
    assert model(pixels, ids, mask).shape == (2, 2)
    for bad, match in [({"strides": (1, 2)}, "strides"), ({"strides": (1, 2, 3)}, "strides"),
                       ({"image_size": 30}, "multiple"), ({"norm": "layer"}, "norm")]:
        with pytest.raises(ValueError, match=match):
            CNNConfig(**{"image_size": 32, "channels": (8, 16, 16), "strides": (1, 2, 2), **bad}).validate()
    with pytest.raises(ValueError, match="encoder"):
        FusionClassifierConfig(encoder="rnn").validate()
    with pytest.raises(ValueError, match="token_pool"):  # 8 x 8 cells do not pool 3 x 3
        FusionClassifierConfig(encoder="cnn", cnn=config.cnn, fusion=FusionConfig(token_pool=3)).validate()
