"""Visual question answering as classification over a fixed answer vocabulary.

The first-generation recipe: an image encoder (a ViT or a small CNN) and a text encoder run
independently, a fusion (early, cross-attention, late, FiLM or relation; see `fusion.py`)
turns their outputs into one vector, and an MLP head scores every answer in `config.answers`.

Several questions about one image encode the image once: `forward(..., image_index=...)`
takes each question's row in `pixels`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .cnn import CNNConfig, ConvEncoder
from .fusion import FusionConfig, build_fusion, pool_grid, with_coordinates
from .inputs import as_image_list, evaluating, preprocess_images, require_preprocessing, tokenize
from .layers import init_weights
from .pretrained import PretrainedModel
from .text import TextEncoder, TextEncoderConfig
from .vision import VisionConfig, VisionOutput, VisionTransformer

ENCODERS = ("vit", "cnn")


@dataclass
class FusionClassifierConfig:
    encoder: str = "vit"  # the image encoder: "vit" (`vision`) | "cnn" (`cnn`)
    vision: VisionConfig = field(default_factory=VisionConfig)
    cnn: CNNConfig = field(default_factory=CNNConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    answers: tuple[str, ...] = ("yes", "no")  # the answer vocabulary; logit i scores answers[i]
    hidden: int = 512  # hidden width of the answer head's MLP

    @property
    def image_size(self) -> int:
        return self.cnn.image_size if self.encoder == "cnn" else self.vision.image_size

    @property
    def image_width(self) -> int:
        """The width of the encoder's image tokens."""
        return self.cnn.width if self.encoder == "cnn" else self.vision.width

    @property
    def grid(self) -> int:
        """The side of the encoder's grid of image tokens."""
        return self.cnn.grid if self.encoder == "cnn" else self.vision.grid

    def validate(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; expected one of {ENCODERS}")
        if self.grid % self.fusion.token_pool:
            raise ValueError(f"model.fusion.token_pool {self.fusion.token_pool} does not divide the encoder's grid of "
                             f"{self.grid} x {self.grid}")
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
        self.vision = ConvEncoder(config.cnn) if config.encoder == "cnn" else VisionTransformer(config.vision)
        self.text = TextEncoder(config.text)
        fusion = config.fusion
        self.grid = config.grid // fusion.token_pool
        image_dim = config.image_width + 2 * int(fusion.adds_coordinates)
        self.fusion = build_fusion(fusion, image_dim, config.text.width, grid=self.grid)
        self.head = AnswerHead(self.fusion.out_dim, config.hidden, len(config.answers))
        init_weights(self.head)

    def image_tokens(self, pixels: torch.Tensor) -> VisionOutput:
        """pixels (I, 3, H, W) -> the image tokens the fusion reads: pooled k x k and with their
        coordinates where the fusion config says so."""
        image = self.vision(pixels)
        fusion = self.config.fusion
        tokens = image.tokens
        if fusion.token_pool > 1:  # a class token is not on the grid: pooling leaves it out
            tokens, _ = pool_grid(tokens[:, -self.config.grid ** 2 :], self.config.grid, fusion.token_pool)
        if fusion.adds_coordinates:
            tokens = with_coordinates(tokens, self.grid)
        return VisionOutput(tokens, image.pooled)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                image_index: torch.Tensor | None = None) -> torch.Tensor:
        """pixels (I, 3, H, W), ids (B, T), attention_mask (B, T) with 1 on real tokens -> logits (B, A).

        image_index (B,): the row of `pixels` that question b asks about, so that an image with
        several questions is encoded once; None: question b asks about image b (I = B)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        image = self.image_tokens(pixels)
        if image_index is not None:
            image = VisionOutput(image.tokens[image_index], image.pooled[image_index])
        elif pixels.shape[0] != ids.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images for {ids.shape[0]} questions: pass image_index")
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
                                              self.config.image_size, self.device)
                else:
                    chunk = pixels[start : start + batch_size].to(self.device)
                ids, mask = tokenize(self.tokenizer, questions[start : start + batch_size],
                                     self.config.text.max_length, self.device)
                probs = self(chunk, ids, mask).float().softmax(dim=-1)  # (b, A)
                confidence, index = probs.max(dim=-1)
                answers += [self.config.answers[i] for i in index.tolist()]
                confidences += confidence.tolist()
        return answers, confidences
