"""The shipped models give the outputs they gave when they were trained.

tests/fixtures/shipped/reference.json was written by tests/fixtures/shipped/make_reference.py
(on 2026-12-07, before the Shapes world moved into multimodal_models/shapes/) from four fixed
Shapes images: shapes-clip's image and text embeddings, shapes-vlm's greedy answers, captions
(beam and greedy), a two-turn chat, caption log-likelihoods and a checksum of its image
features. A refactor that changes what the shipped weights compute fails here.
Floats are compared with a tolerance that holds across x86-64 CPUs; texts exactly.
"""

import json
from pathlib import Path

import pytest
import torch

import multimodal_models as mm

HERE = Path(__file__).parent / "fixtures" / "shipped"


@pytest.fixture(scope="module")
def reference():
    return json.loads((HERE / "reference.json").read_text())


@pytest.fixture(scope="module")
def images(reference):
    return [str(HERE / name) for name in reference["images"]]


def test_shapes_clip_embeds_as_shipped(reference, images):
    model = mm.load("shapes-clip")
    want = reference["shapes_clip"]
    torch.testing.assert_close(model.embed_images(images), torch.tensor(want["image_embeddings"]), atol=2e-4, rtol=0)
    torch.testing.assert_close(model.embed_texts(want["texts"]), torch.tensor(want["text_embeddings"]), atol=2e-4, rtol=0)


@pytest.mark.slow
def test_shapes_vlm_answers_captions_and_scores_as_shipped(reference, images):
    model = mm.load("shapes-vlm")
    want = reference["shapes_vlm"]
    questions = want["questions"]
    assert [model.answer_batch(questions, images=[p] * len(questions)) for p in images] == want["answers"]
    assert model.caption_batch(images=images) == want["captions"]
    assert model.caption_batch(images=images, num_beams=1) == want["greedy_captions"]
    chat = model.chat([{"role": "user", "content": [{"type": "image", "image": images[0]},
                                                    {"type": "text", "text": "is there a star?"}]},
                       {"role": "assistant", "content": "no"},
                       {"role": "user", "content": "how many circles are there?"}])
    assert chat == want["chat"]
    with torch.no_grad():
        features = model.image_features(model.image_processor(images))
        scores = model.text_log_likelihoods(reference["shapes_clip"]["texts"], features)
    torch.testing.assert_close(scores, torch.tensor(want["caption_log_likelihoods"]), atol=2e-3, rtol=0)
    sums = features.double().sum((1, 2))
    torch.testing.assert_close(sums, torch.tensor(want["image_features_sum"], dtype=torch.float64), rtol=1e-5, atol=1e-3)
