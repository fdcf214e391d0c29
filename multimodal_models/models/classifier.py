"""Visual question answering as classification over a fixed answer vocabulary.

The first-generation recipe: an image encoder and a text encoder run independently, a
fusion (early, cross-attention or late; see `fusion.py`) turns their outputs into one
vector, and an MLP head scores every answer in `config.answers`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .inputs import as_image_list, evaluating, preprocess_images, require_preprocessing, tokenize
from .fusion import FusionConfig, build_fusion
from .layers import init_weights
from .pretrained import PretrainedModel
from .text import TextEncoder, TextEncoderConfig
from .vision import VisionConfig, VisionTransformer


@dataclass
class FusionClassifierConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    answers: tuple[str, ...] = ("yes", "no")  # the answer vocabulary; logit i scores answers[i]
    hidden: int = 512  # hidden width of the answer head's MLP

    def validate(self) -> None:
        if not self.answers:
            raise ValueError("the answer vocabulary is empty; give at least one answer")
        duplicates = sorted(a for a, n in Counter(self.answers).items() if n > 1)
        if duplicates:
            raise ValueError(f"answers appear more than once: {duplicates}")


class AnswerHead(nn.Module):
    """norm -> fc1 -> GELU -> fc2: fused vector (B, C) -> answer logits (B, A)."""

    def __init__(self, dim: int, hidden: int, num_answers: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, num_answers)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class FusionClassifier(PretrainedModel):
    model_type = "fusion_classifier"
    config_class = FusionClassifierConfig

    def __init__(self, config: FusionClassifierConfig):
        super().__init__(config)
        config.validate()
        self.vision = VisionTransformer(config.vision)
        self.text = TextEncoder(config.text)
        self.fusion = build_fusion(config.fusion, config.vision.width, config.text.width)
        self.head = AnswerHead(self.fusion.out_dim, config.hidden, len(config.answers))
        init_weights(self.head)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """pixels (B, 3, H, W), ids (B, T), attention_mask (B, T) with 1 on real tokens -> logits (B, A)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        image = self.vision(pixels)
        text = self.text(ids, attention_mask)
        return self.head(self.fusion(image, text, attention_mask))

    # -- user-level helpers --------------------------------------------------------------

    def answer(self, image, question: str) -> tuple[str, float]:
        """One image and one question -> (answer, softmax confidence)."""
        answers, confidences = self.predict([question], images=[image])
        return answers[0], confidences[0]

    def answer_batch(self, questions: Sequence[str], *, images: Sequence | None = None,
                     pixels: torch.Tensor | None = None) -> list[str]:
        """questions[i] about images[i] (files, PIL images) or pixels[i] (preprocessed) -> answers."""
        return self.predict(questions, images=images, pixels=pixels)[0]

    def predict(self, questions: Sequence[str], *, images: Sequence | None = None, pixels: torch.Tensor | None = None,
                batch_size: int = 64) -> tuple[list[str], list[float]]:
        """Answers and their softmax confidences, in order."""
        require_preprocessing(self, tokenizer=True, image_processor=pixels is None)
        if isinstance(questions, str):
            raise TypeError("expected a list of questions, got one string; use answer() for one pair")
        questions = list(questions)
        if pixels is None:
            images = as_image_list(images if images is not None else [])
            count = len(images)
        else:
            count = pixels.shape[0]
        if count != len(questions):
            raise ValueError(f"got {count} images but {len(questions)} questions; give one question per image")
        if not questions:
            raise ValueError("no questions given (empty list)")
        answers: list[str] = []
        confidences: list[float] = []
        with evaluating(self):
            for start in range(0, count, batch_size):
                if pixels is None:
                    chunk = preprocess_images(self.image_processor, images[start : start + batch_size],
                                              self.config.vision.image_size, self.device)
                else:
                    chunk = pixels[start : start + batch_size].to(self.device)
                ids, mask = tokenize(self.tokenizer, questions[start : start + batch_size],
                                     self.config.text.max_length, self.device)
                probs = self(chunk, ids, mask).float().softmax(dim=-1)  # (b, A)
                confidence, index = probs.max(dim=-1)
                answers += [self.config.answers[i] for i in index.tolist()]
                confidences += confidence.tolist()
        return answers, confidences
