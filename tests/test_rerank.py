"""Two-stage retrieval: the LM's caption likelihood, and the reranker that reorders a dual encoder's top images."""

from __future__ import annotations

import pytest
import torch

from multimodal_models.index.image_index import SearchHit
from multimodal_models.index.rerank import Reranker
from multimodal_models.models.vlm import CAPTION_PROMPT
from multimodal_models.training.vlm_task import next_token_loss, predicted_positions

from .test_vlm import IMAGES, tiny_vlm


def test_text_log_likelihoods_sum_the_models_own_token_losses():
    model = tiny_vlm()
    texts = ["a red circle.", "two blue squares and a green star ."]
    features = model.image_features(model.image_processor(IMAGES[:2]))
    got = model.text_log_likelihoods(texts, features)
    template = model.chat_template()
    for text, image_features, value in zip(texts, features, got):
        encoding = template.encode([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]},
                                    {"role": "assistant", "content": text}])
        ids = torch.tensor([encoding.ids])
        labels = torch.where(torch.tensor([encoding.targets]), ids, torch.tensor(-100))
        wanted, targets = predicted_positions(labels)
        with torch.no_grad():  # the next-token loss as training computes it
            loss = next_token_loss(model(ids, features=image_features[None], predict_at=wanted).logits, labels, targets)
        torch.testing.assert_close(value, -loss * sum(encoding.targets[1:]))
    # the short text padded next to the long one scores as it does alone
    torch.testing.assert_close(model.text_log_likelihoods(texts[:1], features[:1]), got[:1])
    assert got[0] != model.text_log_likelihoods(texts[:1], features[1:2])[0]  # the image matters
    with pytest.raises(ValueError, match="pair them one to one"):
        model.text_log_likelihoods(texts, features[:1])


class ScriptedLM:
    """Stands in for the LM: a pair's log-likelihood is the first number of its image's features."""

    device = torch.device("cpu")

    def text_log_likelihoods(self, texts, features):
        return features[:, 0, 0].clone()

    def image_features(self, pixels):
        return pixels

    def image_processor(self, images):
        return torch.tensor(images, dtype=torch.float)[:, None, None]


def test_reranker_reorders_each_texts_top_images_and_keeps_the_rest_below():
    # 5 images, 2 texts; the dual encoder ranks images 0, 1, 2, 3, 4 for text 0 and 4, 3, 2, 1, 0 for text 1
    similarity = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.5, 0.5]])
    likelihood = torch.tensor([-5.0, -4.0, -1.0, -3.0, -2.0])  # what the LM thinks of each image, whatever the text
    features = likelihood[:, None, None]
    ranks = lambda matrix: matrix.T.argsort(dim=1, descending=True).tolist()  # noqa: E731
    reranked = Reranker(ScriptedLM(), top=3, similarity_weight=0.0).rerank_similarity(similarity, ["a", "b"], features)
    # text 0: its top 3 (images 0, 1, 2) reordered by likelihood (2, 1, 0), then 3 and 4 as before
    # text 1: its top 3 (4, 3, 2) reordered (2, 4, 3), then 1 and 0
    assert ranks(reranked) == [[2, 1, 0, 3, 4], [2, 4, 3, 1, 0]]
    # the similarity weight adds the dual encoder's score: image 0 for text 0 scores -5 + 10 * 0.9 = 4,
    # image 1: -4 + 8 = 4 ... image 2: -1 + 7 = 6; for text 1, 4: -2 + 5 = 3, 3: -3 + 4 = 1, 2: -1 + 3 = 2
    weighted = Reranker(ScriptedLM(), top=3, similarity_weight=10.0).rerank_similarity(similarity, ["a", "b"], features)
    torch.testing.assert_close(weighted[[0, 1, 2], 0], torch.tensor([4.0, 4.0, 6.0]))
    assert ranks(weighted)[1] == [4, 2, 3, 1, 0]
    with pytest.raises(ValueError, match="at least 2"):
        Reranker(ScriptedLM(), top=1)
    with pytest.raises(ValueError, match="multimodal LM"):
        Reranker(object())


def test_reranked_search_hits_carry_the_rerankers_score():
    hits = [SearchHit("a.png", 0.9, None, 1), SearchHit("b.png", 0.8, None, 2), SearchHit("c.png", 0.7, None, 3)]
    reranked = Reranker(ScriptedLM(), top=3, similarity_weight=1.0).rerank_hits("a text", hits, [-3.0, -1.0, -2.0])
    assert [h.path for h in reranked] == ["b.png", "c.png", "a.png"]
    assert [round(h.score, 4) for h in reranked] == [-0.2, -1.3, -2.1]
    assert Reranker(ScriptedLM()).rerank_hits("a text", [], []) == []
    assert Reranker(ScriptedLM()).similarity_weight == 20.0  # the default, chosen on Shapes val
