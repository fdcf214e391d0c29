"""Two-stage text-to-image retrieval: a dual encoder proposes, a multimodal LM reranks.

A dual encoder scores a whole collection with one dot product per image, fast enough for
millions of images, but one pooled vector per image holds counts and places poorly. A
multimodal LM reads the caption against the image token by token: far too slow for a
collection, right for its top few. So the dual encoder's `top` best images for a text are
rescored by

    score = log p(text | image) under the LM  +  similarity_weight * cosine similarity

and reordered; the images below the top keep the dual encoder's order. This is how BLIP and
ALBEF rerank their contrastive candidates with an image-text matching head; here the LM's
caption likelihood plays that head (`VisionLanguageModel.text_log_likelihoods`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .defaults import DEFAULT_SIMILARITY_WEIGHT, DEFAULT_TOP


@dataclass
class Reranker:
    model: Any  # a VisionLanguageModel
    top: int = DEFAULT_TOP  # how many of the dual encoder's best images are rescored per text
    similarity_weight: float = DEFAULT_SIMILARITY_WEIGHT  # times the dual encoder's cosine, added to the score
    batch_size: int = 160  # (text, image) pairs per forward pass

    def __post_init__(self):
        if self.top < 2:
            raise ValueError(f"rerank top must be at least 2 (the images rescored per text), got {self.top}")
        if not hasattr(self.model, "text_log_likelihoods"):
            raise ValueError(f"a reranker must be a multimodal LM (model_type vlm), got {type(self.model).__name__}")

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels preprocessed by the LM's own image processor -> its image embeddings (N, K, C)."""
        return self.model.image_features(pixels.to(self.model.device)).cpu()

    def scores(self, texts: list[str], features: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
        """The reranking score of pairs: texts[i] with the image of features[i], whose dual-encoder
        cosine similarity is similarity[i]."""
        likelihoods = torch.cat([
            self.model.text_log_likelihoods(texts[start:start + self.batch_size], features[start:start + self.batch_size])
            for start in range(0, len(texts), self.batch_size)
        ])
        return likelihoods + self.similarity_weight * similarity.float().cpu()

    def rerank_similarity(self, similarity: torch.Tensor, texts: list[str], features: torch.Tensor,
                          progress: bool = False) -> torch.Tensor:
        """similarity (images, texts) of the dual encoder -> a matrix that ranks each text's top
        images by the reranking score, above all the others (kept in their order), for recall@K.
        features: the LM's embeddings of every image (images, K, C)."""
        from tqdm.auto import tqdm

        top = min(self.top, similarity.shape[0])
        candidates = similarity.T.topk(top, dim=1).indices  # (texts, top)
        reranked = similarity.float().clone()
        per_batch = max(1, self.batch_size // top)
        for start in tqdm(range(0, len(texts), per_batch), desc="rerank", disable=not progress):
            rows = list(range(start, min(start + per_batch, len(texts))))
            images = candidates[rows].flatten()
            pair_texts = [texts[t] for t in rows for _ in range(top)]
            pair_similarity = similarity[images, torch.tensor(rows).repeat_interleave(top)]
            score = self.scores(pair_texts, features[images], pair_similarity).view(len(rows), top)
            for row, t in enumerate(rows):  # the others keep their order and gaps, below the lowest rescored image
                column = reranked[:, t]
                reranked[:, t] = column - column.max() + score[row].min() - 1
                reranked[candidates[t], t] = score[row]
        return reranked

    def search(self, index, model, text: str, k: int = 10) -> list:
        """Search an ImageIndex (built by the dual encoder `model`) by text, rescore its best
        max(k, top) images and return the best k of them, each with the reranking score."""
        if index.root is None:
            raise ValueError(f"the index {index.path} does not know its image folder, so the reranker cannot read "
                             "the images")
        hits = index.search(model, text=text, k=max(k, self.top))
        return self.rerank_hits(text, hits, [index.root / hit.path for hit in hits])[:k]

    def rerank_hits(self, text: str, hits: list, images: list[Any]) -> list:
        """Search hits of one text (best first, with .score the cosine similarity) and their images
        -> the hits reordered by the reranking score, which replaces .score."""
        if not hits:
            return hits
        pixels = self.model.image_processor(images)
        scores = self.scores([text] * len(hits), self.image_features(pixels),
                             torch.tensor([h.score for h in hits]))
        order = scores.argsort(descending=True).tolist()
        return [hits[i]._replace(score=float(scores[i])) for i in order]
