"""A native multimodal language model (LLaVA / nanoVLM style).

    image -> VisionTransformer -> patch tokens -> ModalityProjector -> K image embeddings
    text  -> token embeddings, with K <image> placeholder positions per image
    the image embeddings replace the placeholders; a causal decoder reads the whole sequence

It captions, answers and chats (several images, several turns, streamed tokens) through
the same decoder and the same chat template; `generation.py` holds the decoding strategies.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .chat import WordChatTemplate
from .generation import GenerationConfig, beam_search, generate_tokens, stream_text
from .layers import init_weights
from .pretrained import PretrainedModel
from .text import CausalDecoder, DecoderConfig
from .vision import VisionConfig, VisionTransformer

CAPTION_PROMPT = "describe the image."


@dataclass
class VLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    pixel_shuffle: int = 1  # merge s x s neighbouring patch tokens into one image token (s*s fewer tokens)
    projector: str = "mlp"  # "mlp" (Linear-GELU-Linear, LLaVA-1.5) | "linear"
    image_token_id: int = 4  # id of the <image> placeholder token in the tokenizer

    @property
    def tokens_per_image(self) -> int:
        return self.vision.num_patches // self.pixel_shuffle**2


class VLMOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None


def pixel_shuffle(tokens: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, g*g, C) -> (B, (g/s)^2, s*s*C): each output token holds an s x s block of patches."""
    if factor == 1:
        return tokens
    B, N, C = tokens.shape
    g = int(N**0.5)
    if g * g != N or g % factor:
        raise ValueError(f"pixel shuffle by {factor} needs a square grid divisible by it, got {N} tokens")
    x = tokens.view(B, g // factor, factor, g // factor, factor, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, (g // factor) ** 2, factor * factor * C)


class ModalityProjector(nn.Module):
    def __init__(self, config: VLMConfig):
        super().__init__()
        self.factor = config.pixel_shuffle
        source = config.vision.width * config.pixel_shuffle**2
        target = config.decoder.width
        if config.projector == "mlp":
            self.layers = nn.Sequential(nn.Linear(source, target), nn.GELU(), nn.Linear(target, target))
        elif config.projector == "linear":
            self.layers = nn.Sequential(nn.Linear(source, target))
        else:
            raise ValueError(f"unknown projector {config.projector!r}; expected 'mlp' or 'linear'")

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.layers(pixel_shuffle(patches, self.factor))


class VisionLanguageModel(PretrainedModel):
    model_type = "vlm"
    config_class = VLMConfig

    def __init__(self, config: VLMConfig):
        super().__init__(config)
        self.vision = VisionTransformer(config.vision)
        self.projector = ModalityProjector(config)
        init_weights(self.projector)
        self.decoder = CausalDecoder(config.decoder)

    # -- model -----------------------------------------------------------------------------

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, 3, H, W) -> image embeddings (N, K, C_decoder)."""
        tokens = self.vision(pixels).tokens
        if self.config.vision.class_token:
            tokens = tokens[:, 1:]
        return self.projector(tokens)

    def embed(self, ids: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the <image> placeholders replaced by image features, in order."""
        embeds = self.decoder.embed(ids)
        slots = ids == self.config.image_token_id
        count = int(slots.sum())
        given = 0 if features is None else features.shape[0] * features.shape[1]
        if count != given:
            raise ValueError(f"the text has {count} <image> positions but {given} image embeddings were given "
                             f"({self.config.tokens_per_image} per image)")
        if count:
            embeds = embeds.masked_scatter(slots[..., None], features.reshape(-1, features.shape[-1]).to(embeds.dtype))
        return embeds

    def forward(self, ids: torch.Tensor, pixels: torch.Tensor | None = None, *, features: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache=None) -> VLMOutput:
        """ids (B, T); pixels (N, 3, H, W) for the N images of the batch in reading order.

        labels (B, T): the token each position should predict next is labels[:, t+1];
        -100 marks positions that are not trained on.
        """
        if features is None and pixels is not None:
            features = self.image_features(pixels)
        logits = self.decoder(embeds=self.embed(ids, features), mask=mask, positions=positions, cache=cache)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return VLMOutput(logits, loss)

    # -- using it -------------------------------------------------------------------------

    def chat_template(self) -> WordChatTemplate:
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer attached; load it with multimodal_models.load()")
        return WordChatTemplate(self.tokenizer, self.config.tokens_per_image)

    def _pixels(self, images: list[Any]) -> torch.Tensor | None:
        if not images:
            return None
        if self.image_processor is None:
            raise RuntimeError("this model has no image processor attached; load it with multimodal_models.load()")
        return self.image_processor(images).to(self.device)

    @torch.no_grad()
    def chat(self, messages: list[dict], *, images: list[Any] | None = None, stream: bool = False,
             generation: GenerationConfig | None = None, **options) -> str | Iterator[str]:
        """The assistant's next turn. Images come inline ({"type": "image", "image": ...}) or, for
        parts without one, from `images` in order. stream=True returns an iterator of text pieces."""
        template = self.chat_template()
        encoding = template.encode(messages, add_generation_prompt=True)
        pending = list(images or [])
        resolved = []
        for image in encoding.images:
            if image is None:
                if not pending:
                    raise ValueError("the messages have more image parts than images were given")
                image = pending.pop(0)
            resolved.append(image)
        if pending:
            raise ValueError(f"{len(pending)} images were given but the messages have no place for them")
        config = generation or GenerationConfig(**options)
        session = VLMSession(self, torch.tensor([encoding.ids], device=self.device), self._pixels(resolved), config)
        stop_ids = template.stop_ids()
        decode = self.tokenizer.decode
        if config.num_beams > 1:
            if stream:
                raise ValueError("beam search cannot stream; use num_beams=1")
            return "".join(stream_text(iter(beam_search(session, config, stop_ids)), decode, config.stop))
        pieces = stream_text(generate_tokens(session, config, stop_ids), decode, config.stop)
        return pieces if stream else "".join(pieces)

    @torch.no_grad()
    def generate_batch(self, prompts: list[list[int]], features: torch.Tensor | None, *, max_new_tokens: int = 32,
                       stop_ids: set[int] | None = None) -> list[list[int]]:
        """Greedy decoding of many prompts at once (left-padded, one KV cache).

        prompts: token ids, each with its own <image> placeholders; features: the image
        embeddings of all their images in reading order (N, K, C). Returns the new ids of
        each prompt, without the stop token.
        """
        B, longest = len(prompts), max(len(p) for p in prompts)
        pad = self.tokenizer.pad_id if self.tokenizer is not None else 0
        ids = torch.full((B, longest), pad, dtype=torch.long, device=self.device)
        valid = torch.zeros(B, longest, dtype=torch.bool, device=self.device)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt):] = torch.tensor(prompt, device=self.device)
            valid[row, longest - len(prompt):] = True
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        causal = torch.ones(longest, longest, dtype=torch.bool, device=self.device).tril()
        eye = torch.eye(longest, dtype=torch.bool, device=self.device)
        mask = (causal & valid[:, None, :]) | eye  # (B, T, T); pads attend to themselves only
        cache = self.decoder.new_cache(B, longest + max_new_tokens)
        logits = self(ids, features=features, mask=mask[:, None], positions=positions, cache=cache).logits[:, -1]
        stop_ids = stop_ids if stop_ids is not None else self.chat_template().stop_ids()
        outputs: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        keys = valid
        next_position = positions[:, -1] + 1
        for _ in range(max_new_tokens):
            tokens = logits.argmax(-1)
            for row in range(B):
                if not done[row]:
                    token = int(tokens[row])
                    if token in stop_ids:
                        done[row] = True
                    else:
                        outputs[row].append(token)
            if bool(done.all()):
                break
            keys = torch.cat([keys, torch.ones(B, 1, dtype=torch.bool, device=self.device)], dim=1)
            logits = self.decoder(tokens[:, None], mask=keys[:, None, None, :], positions=next_position[:, None],
                                  cache=cache)[:, -1]
            next_position = next_position + 1
        return outputs

    def _user_prompts(self, texts: list[str]) -> list[list[int]]:
        template = self.chat_template()
        return [
            template.encode([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
                            add_generation_prompt=True).ids
            for t in texts
        ]

    @torch.no_grad()
    def answer_batch(self, questions: list[str], *, images: list[Any] | None = None, pixels: torch.Tensor | None = None,
                     max_new_tokens: int = 8) -> list[str]:
        """Answer one question about each image (images as files/PIL, or preprocessed pixels)."""
        pixels = pixels.to(self.device) if pixels is not None else self._pixels(images)
        outputs = self.generate_batch(self._user_prompts(questions), self.image_features(pixels),
                                      max_new_tokens=max_new_tokens)
        return [self.tokenizer.decode(o) for o in outputs]

    def caption_batch(self, *, images: list[Any] | None = None, pixels: torch.Tensor | None = None,
                      prompt: str = CAPTION_PROMPT, max_new_tokens: int = 48) -> list[str]:
        count = len(images) if images is not None else pixels.shape[0]
        return self.answer_batch([prompt] * count, images=images, pixels=pixels, max_new_tokens=max_new_tokens)

    def caption(self, image: Any, prompt: str = CAPTION_PROMPT, **options) -> str:
        return self.chat([{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}],
                         **options)

    def ask(self, image: Any, question: str, **options) -> str:
        return self.chat([{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}],
                         **options)


class VLMSession:
    """Decoding state for `generation.py`: the prompt, the image features, the KV cache."""

    def __init__(self, model: VisionLanguageModel, ids: torch.Tensor, pixels: torch.Tensor | None, config: GenerationConfig):
        self.model = model
        self.ids = ids
        self.features = model.image_features(pixels) if pixels is not None else None
        length = ids.shape[1] + config.max_new_tokens + 1
        if length > model.config.decoder.max_length:
            raise ValueError(f"prompt of {ids.shape[1]} tokens + max_new_tokens {config.max_new_tokens} exceeds the "
                             f"model's context of {model.config.decoder.max_length} tokens")
        self.cache = model.decoder.new_cache(1, length) if config.use_cache else None

    def prefill(self) -> torch.Tensor:
        return self.model(self.ids, features=self.features, cache=self.cache).logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        if self.cache is not None:
            return self.model.decoder(tokens[:, None], cache=self.cache)[:, -1]
        # the features belong to one conversation; beams are copies of it
        features = None if self.features is None else self.features.repeat(self.ids.shape[0], 1, 1)
        return self.model(self.ids, features=features).logits[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        self.ids = self.ids.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index)
