"""A native multimodal language model (LLaVA / nanoVLM style).

    image -> VisionTransformer -> patch tokens -> ModalityProjector -> K image embeddings
    text  -> token embeddings, with K <image> placeholder positions per image
    the image embeddings replace the placeholders; a causal decoder reads the whole sequence

With `image_attention: bidirectional` an image's tokens all see each other (a prefix-LM image
block, as in PaliGemma); text stays causal.

Extension points, for a model type built on this one (the Shapes world's ShapesVLM is one):
`image_token_width` and `image_features` (what the projector reads of an image) and
`block_hook` (a step after chosen decoder blocks, e.g. a cross-attention back to the image).
The model returns logits; the training task computes its loss.

It captions, answers and chats (several images, several turns, streamed tokens) through
the same decoder and the same chat template; `generation.py` holds the decoding strategies.

The same composition holds pretrained LLaVA and Idefics3/SmolVLM checkpoints
(`multimodal_models.pretrained.llava` / `.idefics3`): a few config options below choose
which vision layer and tokens feed the projector, the projector's activation and biases,
and the checkpoint's own (Jinja) chat template with its image-token layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data.hf_tokenizer import HFTokenizer
from ..data.idefics3 import idefics3_image_text, load_image_processor
from .chat import JinjaChatTemplate, WordChatTemplate, attach_images
from .generation import GenerationConfig, beam_search_batch, decode_tokens, stream_text
from .layers import KVCache, activation, causal_mask, init_weights
from .packed_attention import PackedAttention, rows
from .pretrained import PretrainedModel
from .text import CausalDecoder, DecoderConfig
from .vision import VisionConfig, VisionTransformer

CAPTION_PROMPT = "describe the image."
VISION_TOKENS = ("patches", "skip_first", "all")
IMAGE_ATTENTION = ("causal", "bidirectional")
CHAT_FORMATS = ("word", "jinja")
IMAGE_PROMPTS = ("repeat", "idefics3")


@dataclass
class VLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    pixel_shuffle: int = 1  # merge s x s neighbouring patch tokens into one image token (s*s fewer tokens)
    projector: str = "mlp"  # "mlp" (Linear-GELU-Linear, LLaVA-1.5) | "linear" (Idefics3: after pixel shuffle)
    projector_act: str = "gelu"  # the mlp projector's activation (models.layers.ACTIVATIONS)
    projector_bias: bool = True  # Idefics3's projection has no bias
    image_token_id: int = 4  # id of the <image> placeholder token in the tokenizer
    # Which vision tokens feed the projector. vision_layer: the output of that block (negative counts
    # from the end: LLaVA's penultimate layer is -2; before any final norm), None: the tower's final
    # output. vision_tokens: "patches" (drop the class token if there is one) | "skip_first" (drop the
    # first token whatever it is: LLaVA's "default" strategy) | "all" (keep them all: LLaVA's "full")
    vision_layer: int | None = None
    vision_tokens: str = "patches"
    # The prompt format: "word" (WordChatTemplate, the models trained here) | "jinja" (the tokenizer's
    # own chat template, pretrained checkpoints). image_token: the placeholder such a template writes
    # for an image; image_prompt: what replaces it, "repeat" (tokens_per_image image tokens) | "idefics3"
    # (<fake_token_around_image>, <row_i_col_j> / <global-img> and the image tokens of each tile)
    chat_format: str = "word"
    image_token: str = "<image>"
    image_prompt: str = "repeat"
    stop_token_ids: tuple[int, ...] = ()  # token ids that end an assistant turn besides the tokenizer's eos
    # How an image's tokens see each other in the decoder: "causal" (as text does) | "bidirectional" (every
    # image token sees all tokens of its image, a prefix-LM image block as in PaliGemma, so each can gather
    # the whole image; text stays causal)
    image_attention: str = "causal"
    # How captions are decoded unless a call says otherwise (caption, caption_batch, `multimodal caption`,
    # evaluation): the beam width, 1 for greedy. A caption is one long answer, where greedy decoding can
    # talk itself into a corner ("a hexagon and a ..." in an image of two hexagons) that a beam avoids
    caption_beams: int = 1

    @property
    def tokens_per_image(self) -> int:
        """Image tokens per image (per tile for Idefics3's split images)."""
        tokens = self.vision.num_patches
        if self.vision_tokens == "all":
            tokens += int(self.vision.class_token)
        elif self.vision_tokens == "skip_first":
            tokens += int(self.vision.class_token) - 1
        return tokens // self.pixel_shuffle**2

    def validate(self) -> None:
        for name, value, allowed in (("vision_tokens", self.vision_tokens, VISION_TOKENS),
                                     ("chat_format", self.chat_format, CHAT_FORMATS),
                                     ("image_prompt", self.image_prompt, IMAGE_PROMPTS),
                                     ("image_attention", self.image_attention, IMAGE_ATTENTION)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")
        if self.caption_beams < 1:
            raise ValueError(f"caption_beams must be at least 1 (1: greedy), got {self.caption_beams}")


class VLMOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, V); with predict_at, (M, V) at those M positions
    hook: Any = None  # the block hook of this pass (block_hook), with what it gathered; None without one


class BlockHook:
    """A step after some decoder blocks (`VisionLanguageModel.block_hook`): `blocks`, the blocks
    it follows, and a call (block, x) -> x. It sees a packed batch's real positions as (1, N, C)."""

    blocks: frozenset[int] = frozenset()

    def __call__(self, block: int, x: torch.Tensor) -> torch.Tensor:
        return x


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


class Activation(nn.Module):
    """An activation function by name, as a module (no parameters)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fn = activation(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


class ModalityProjector(nn.Module):
    def __init__(self, config: VLMConfig, source: int):
        super().__init__()
        self.factor = config.pixel_shuffle
        target = config.decoder.width
        bias = config.projector_bias
        if config.projector == "mlp":
            self.layers = nn.Sequential(nn.Linear(source, target, bias=bias), Activation(config.projector_act),
                                        nn.Linear(target, target, bias=bias))
        elif config.projector == "linear":
            self.layers = nn.Sequential(nn.Linear(source, target, bias=bias))
        else:
            raise ValueError(f"unknown projector {config.projector!r}; expected 'mlp' or 'linear'")

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.layers(pixel_shuffle(patches, self.factor))


class VisionLanguageModel(PretrainedModel):
    model_type = "vlm"
    config_class = VLMConfig

    def __init__(self, config: VLMConfig):
        super().__init__(config)
        config.validate()
        self.vision = VisionTransformer(config.vision)
        self.projector = ModalityProjector(config, self.image_token_width(config))
        init_weights(self.projector)
        self.decoder = CausalDecoder(config.decoder)

    # -- extension points ------------------------------------------------------------------

    @staticmethod
    def image_token_width(config: VLMConfig) -> int:
        """The width of the image tokens the projector reads (`image_features`, per token, before pixel shuffle
        merges them)."""
        return config.vision.width * config.pixel_shuffle**2

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, 3, H, W) -> the image tokens the language side reads (N, K, C_vision): the vision
        tokens before the projector, which `embed` applies."""
        tokens = self.vision(pixels, layer=self.config.vision_layer).tokens
        if self.config.vision_tokens == "skip_first" or (self.config.vision_tokens == "patches"
                                                          and self.config.vision.class_token):
            tokens = tokens[:, 1:]
        return tokens

    def vision_modules(self) -> list[nn.Module]:
        """The modules that make `image_features` from pixels (frozen together by freeze_vision)."""
        return [self.vision]

    def block_hook(self, ids: torch.Tensor, features: torch.Tensor | None, cache,
                   packed: PackedAttention | None, slots: torch.Tensor | None = None) -> BlockHook | None:
        """The step to run after some decoder blocks in this pass (None: none, as in LLaVA / nanoVLM).
        It is handed back in VLMOutput.hook. packed: the pass's packed attention, where it has one;
        slots (B, T): where the pass's image embeddings go (`image_slots`: the prompt's placeholders,
        not one the model generated)."""
        return None

    # Whether the server may decode this model's sequences side by side in one BatchedKVCache. A model
    # type whose block_hook keeps state in the cache's `context` says True only if that state pads
    # (BatchedKVCache.context); None: True unless block_hook is overridden.
    batched_decoding: bool | None = None

    def can_decode_in_batches(self) -> bool:
        if self.batched_decoding is not None:
            return self.batched_decoding
        return type(self).block_hook is VisionLanguageModel.block_hook

    # -- model -----------------------------------------------------------------------------

    def image_slots(self, ids: torch.Tensor, prompt_length: int | None = None, start: int = 0) -> torch.Tensor:
        """(B, T) True where an image embedding goes: the <image> placeholders of the prompt. ids starts
        at position `start` (the cached positions before it); with `prompt_length`, positions from there
        on hold generated tokens, and a placeholder the model generated is text, embedded as the token it
        is (as transformers does), not an image slot."""
        slots = ids == self.config.image_token_id
        if prompt_length is not None:
            generated = torch.arange(start, start + ids.shape[1], device=ids.device) >= prompt_length
            slots = slots & ~generated
        return slots

    def embed(self, ids: torch.Tensor, features: torch.Tensor | None, slots: torch.Tensor | None = None
              ) -> torch.Tensor:
        """Token embeddings with the image slots (default: every <image> placeholder; see `image_slots`)
        replaced by the projected image features (`image_features`), in order."""
        embeds = self.decoder.embed(ids)
        features = None if features is None else self.projector(features)
        slots = ids == self.config.image_token_id if slots is None else slots
        count = int(slots.sum())
        given = 0 if features is None else features.shape[0] * features.shape[1]
        if count != given:
            raise ValueError(f"the text has {count} <image> positions but {given} image embeddings were given "
                             f"({self.config.tokens_per_image} per image)")
        if count:  # index_copy, not masked_scatter: its backward is an index_select, not a slow masked_select
            where = slots.flatten().nonzero()[:, 0]
            flat = embeds.flatten(0, 1).index_copy(0, where, features.reshape(-1, features.shape[-1]).to(embeds.dtype))
            embeds = flat.view(embeds.shape)
        return embeds

    def forward(self, ids: torch.Tensor, pixels: torch.Tensor | None = None, *, features: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, positions: torch.Tensor | None = None, cache=None,
                segments: torch.Tensor | None = None, predict_at: torch.Tensor | None = None,
                prompt_length: int | None = None) -> VLMOutput:
        """ids (B, T); pixels (N, 3, H, W) for the N images of the batch in reading order (or their
        `image_features`). With a cache, later calls pass only the new ids.

        prompt_length (decoding): the positions from there on (cached ones counted) are generated
        tokens, where an <image> the model wrote is embedded as text (`image_slots`).

        segments (B, T), with a packed mask: 0 on each row's shared prefix, 1, 2, ... on its segments,
        -1 on padding; attention is then computed block by block (models/packed_attention.py), the same
        numbers for less work. predict_at (M,): the positions b * T + t whose logits are wanted (training:
        those with a next token to predict), returned as (M, V) in that order; the last decoder block's
        output projection and MLP, and the head, then run on those positions only.
        """
        if features is None and pixels is not None:
            features = self.image_features(pixels)
        start = cache.length if cache is not None else 0
        slots = self.image_slots(ids, prompt_length, start)
        if self.config.image_attention == "bidirectional":
            mask = self.image_block_mask(ids, mask, start=start, slots=slots)
        if segments is not None:
            if mask is None or cache is not None:
                raise ValueError("segments describe a packed batch: give its mask, and no cache")
            mask = PackedAttention.from_segments(segments, mask)
        packed = mask if isinstance(mask, PackedAttention) else None
        if predict_at is not None and cache is not None:
            raise ValueError("predict_at is for training: give no cache")
        hook = self.block_hook(ids, features, cache, packed, slots=slots)
        # a step after the last block reads all of its positions: the logits are then picked at the end
        last_hooked = hook is not None and self.decoder.config.depth - 1 in hook.blocks
        outputs_at = None
        if predict_at is not None and not last_hooked:
            outputs_at = predict_at if packed is None else packed.compact_index(predict_at)
        # a packed batch is embedded on its real positions only (models/packed_attention.py)
        embedded = ids if packed is None else packed.compact(ids)
        slots = slots if packed is None else packed.compact(slots)
        logits = self.decoder(embeds=self.embed(embedded, features, slots), mask=mask, positions=positions, cache=cache,
                              after_block=hook, outputs_at=outputs_at)
        if predict_at is not None and last_hooked:
            logits = rows(logits.flatten(0, 1), predict_at)
        return VLMOutput(logits, hook)

    def prefill_batch(self, prompts: list[list[int]], pixels: list[torch.Tensor | None], *,
                      room: int = 0) -> tuple[KVCache, torch.Tensor]:
        """Run several prompts at once into a new KVCache, as each runs alone: right-padded (each prompt at
        positions 0.., its pads seen by nothing), its images' pixels (or None) by prompt. Returns the cache
        (row i holds prompt i's len(prompts[i]) positions; `room` more positions are allocated) and each
        prompt's next-token logits (B, V). A batch's first step in continuous batching."""
        lengths = [len(p) for p in prompts]
        B, longest = len(prompts), max(lengths)
        pad = 0 if self.config.image_token_id != 0 else 1  # any id but the placeholder: pads are masked out
        ids = torch.full((B, longest), pad, dtype=torch.long, device=self.device)
        valid = torch.zeros(B, longest, dtype=torch.bool, device=self.device)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt, device=self.device)
            valid[row, : len(prompt)] = True
        given = [p for p in pixels if p is not None]
        features = self.image_features(torch.cat(given)) if given else None
        mask = None  # prompts of one length: plain causal attention
        if min(lengths) != longest:  # each pad sees itself only, so that its row has no empty softmax
            eye = torch.eye(longest, dtype=torch.bool, device=self.device)
            mask = ((causal_mask(longest, device=self.device) & valid[:, None, :]) | eye)[:, None]
        cache = self.decoder.new_cache(B, longest + room)
        logits = self(ids, features=features, mask=mask, cache=cache).logits
        last = torch.tensor(lengths, device=self.device) - 1
        return cache, logits[torch.arange(B, device=self.device), last]

    def decode_step(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """One decoding step of a batch of independent sequences (continuous batching): tokens (B,), the
        next token of each row of `cache` (a BatchedKVCache, each row at its own length and position).
        Returns the next-token logits (B, V), each row's as it would be decoded alone. Every token fed
        is a generated one (an <image> among them is text)."""
        return self(tokens[:, None], mask=cache.attention_mask()[:, None, None, :], positions=cache.positions(),
                    cache=cache, prompt_length=0).logits[:, -1]

    def image_block_mask(self, ids: torch.Tensor, mask: torch.Tensor | None, start: int = 0,
                         slots: torch.Tensor | None = None) -> torch.Tensor:
        """The attention mask (B, 1, T, start + T) with each image's tokens also seeing the later
        tokens of the same image. mask: the causal mask to extend (None: plain causal after
        `start` cached positions); an image is a run of consecutive image slots (default: <image>
        placeholders; see `image_slots`)."""
        B, T = ids.shape
        image = ids == self.config.image_token_id if slots is None else slots
        if mask is None:
            mask = causal_mask(T, start + T, ids.device).expand(B, 1, T, start + T)
        if not image.any():
            return mask
        first = image & ~F.pad(image[:, :-1], (1, 0), value=False)
        block = first.long().cumsum(1) * image  # k on the tokens of the k-th image, 0 elsewhere
        same = (block[:, :, None] == block[:, None, :]) & image[:, :, None]
        return mask | F.pad(same, (start, 0), value=False)[:, None]

    # -- using it -------------------------------------------------------------------------

    def chat_template(self) -> WordChatTemplate | JinjaChatTemplate:
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer attached; load it with multimodal_models.load()")
        if self.config.chat_format == "word":
            return WordChatTemplate(self.tokenizer, self.config.tokens_per_image)
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, list):  # tokenizer_config.json may hold named templates
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return JinjaChatTemplate(self.tokenizer, template, image_token=self.config.image_token,
                                 image_text=self._image_text, stop_ids=self.config.stop_token_ids)

    def _image_text(self, image: Any) -> str:
        """The prompt text one image becomes in a Jinja-templated prompt."""
        token, count = self.config.image_token, self.config.tokens_per_image
        if self.config.image_prompt == "repeat":
            return token * count
        rows, cols = 0, 0
        if getattr(self.image_processor, "do_image_splitting", False):
            if image is None:
                raise ValueError("this model splits each image into tiles, so the prompt needs the image itself")
            rows, cols = self.image_processor.grid(image)
        return idefics3_image_text(rows, cols, count, image_token=token)

    def attach_preprocessing(self, directory) -> None:
        """As the base class does; a tokenizer saved with its tokenizer_config.json (a pretrained
        checkpoint's) comes back as an HFTokenizer, an Idefics3 image processor as itself."""
        if not HFTokenizer.saved_in(directory):
            return super().attach_preprocessing(directory)
        self.tokenizer = HFTokenizer.from_folder(directory)
        self.image_processor = load_image_processor(directory)

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
        encoding = template.encode(attach_images(messages, images), add_generation_prompt=True)
        config = generation or GenerationConfig(**options)
        session = VLMSession(self, torch.tensor([encoding.ids], device=self.device), self._pixels(encoding.images),
                             config)
        if stream and config.num_beams > 1:
            raise ValueError("beam search cannot stream; use num_beams=1")
        pieces = stream_text(decode_tokens(session, config, template.stop_ids()), self.tokenizer.decode, config.stop)
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
        pad = getattr(self.tokenizer, "pad_id", None)
        pad = 0 if pad is None else pad  # any id: padding is masked out
        ids = torch.full((B, longest), pad, dtype=torch.long, device=self.device)
        valid = torch.zeros(B, longest, dtype=torch.bool, device=self.device)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt):] = torch.tensor(prompt, device=self.device)
            valid[row, longest - len(prompt):] = True
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        causal = causal_mask(longest, device=self.device)
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
            logits = self(tokens[:, None], mask=keys[:, None, None, :], positions=next_position[:, None], cache=cache,
                          prompt_length=longest).logits[:, -1]  # a generated <image> is text
            next_position = next_position + 1
        return outputs

    def user_prompts(self, texts: list[str], images: list[Any] | None = None) -> list[list[int]]:
        """One user turn per text, each about one image (given when the prompt depends on it)."""
        template = self.chat_template()
        images = images if images is not None else [None] * len(texts)
        return [
            template.encode([{"role": "user", "content": [{"type": "image", "image": image},
                                                          {"type": "text", "text": t}]}],
                            add_generation_prompt=True).ids
            for t, image in zip(texts, images)
        ]

    @torch.no_grad()
    def answer_batch(self, questions: list[str], *, images: list[Any] | None = None, pixels: torch.Tensor | None = None,
                     max_new_tokens: int = 8) -> list[str]:
        """Answer one question about each image (images as files/PIL, or preprocessed pixels)."""
        if pixels is not None and getattr(self.image_processor, "do_image_splitting", False):
            raise ValueError("this model splits each image into tiles: pass the images, not preprocessed pixels")
        pixels = pixels.to(self.device) if pixels is not None else self._pixels(images)
        outputs = self.generate_batch(self.user_prompts(questions, images), self.image_features(pixels),
                                      max_new_tokens=max_new_tokens)
        return [self.tokenizer.decode(o) for o in outputs]

    @torch.no_grad()
    def caption_batch(self, *, images: list[Any] | None = None, pixels: torch.Tensor | None = None,
                      prompt: str = CAPTION_PROMPT, max_new_tokens: int = 48, num_beams: int | None = None,
                      searches: int = 32) -> list[str]:
        """One caption per image, decoded as `caption` decodes it: greedy for all images at once, or
        with num_beams > 1 (default: config.caption_beams) a beam search per image, `searches` images'
        searches side by side."""
        count = len(images) if images is not None else pixels.shape[0]
        num_beams = self.config.caption_beams if num_beams is None else num_beams
        if num_beams == 1:
            return self.answer_batch([prompt] * count, images=images, pixels=pixels, max_new_tokens=max_new_tokens)
        splits = getattr(self.image_processor, "do_image_splitting", False)
        if images is not None and splits:  # several tiles per image: one search at a time
            return [self.caption(image, prompt, num_beams=num_beams, max_new_tokens=max_new_tokens) for image in images]
        if splits:
            raise ValueError("this model splits each image into tiles: pass the images, not preprocessed pixels")
        features = self.image_features(self._pixels(images) if images is not None else pixels.to(self.device))
        config = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=num_beams)
        stop_ids = self.chat_template().stop_ids()
        ids = torch.tensor(self.user_prompts([prompt]), device=self.device)  # the same prompt for every image
        captions = []
        for start in range(0, count, searches):
            chunk = features[start:start + searches]
            session = VLMSession(self, ids.expand(len(chunk), -1), None, config, features=chunk)
            found = beam_search_batch(session, config, stop_ids, searches=len(chunk))
            captions += ["".join(stream_text(iter(tokens), self.tokenizer.decode)) for tokens in found]
        return captions

    @torch.no_grad()
    def text_log_likelihoods(self, texts: list[str], features: torch.Tensor, *, prompt: str = CAPTION_PROMPT) -> torch.Tensor:
        """How likely the model finds each text as its answer to `prompt` about an image: the summed
        log-probabilities of the text's tokens and of the end of the turn, one number per text.
        texts[i] is about the image whose embeddings (`image_features`) are features[i], (N, K, C).
        A reranker's score: it ranks images for a caption, as BLIP's matching head reranks the
        candidates of its dual encoder."""
        if len(texts) != features.shape[0]:
            raise ValueError(f"got {len(texts)} texts and {features.shape[0]} images' features: pair them one to one")
        template = self.chat_template()
        encodings = [template.encode([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
                                      {"role": "assistant", "content": text}]) for text in texts]
        longest = max(len(e.ids) for e in encodings)
        pad = getattr(self.tokenizer, "pad_id", None) or 0  # right padding: no real token sees it
        ids = torch.full((len(texts), longest), pad, dtype=torch.long)
        scored = torch.zeros(len(texts), longest, dtype=torch.bool)
        for row, encoding in enumerate(encodings):
            ids[row, :len(encoding.ids)] = torch.tensor(encoding.ids)
            scored[row, :len(encoding.ids)] = torch.tensor(encoding.targets)
        ids, scored = ids.to(self.device), scored.to(self.device)
        log_probs = self(ids, features=features.to(self.device)).logits[:, :-1].float().log_softmax(-1)
        chosen = log_probs.gather(-1, ids[:, 1:, None])[..., 0]
        return (chosen * scored[:, 1:]).sum(-1).cpu()

    def caption(self, image: Any, prompt: str = CAPTION_PROMPT, **options) -> str | Iterator[str]:
        """A caption of one image; without decoding options, as config.caption_beams says (streamed
        or sampled captions are decoded token by token: beam search cannot stream)."""
        if not ({"num_beams", "generation", "do_sample"} & set(options)) and not options.get("stream"):
            options["num_beams"] = self.config.caption_beams
        return self.chat([{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}],
                         **options)

    def ask(self, image: Any, question: str, **options) -> str:
        return self.chat([{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}],
                         **options)


class VLMSession:
    """Decoding state for `generation.py`: the prompt, the image features, the KV cache."""

    def __init__(self, model: VisionLanguageModel, ids: torch.Tensor, pixels: torch.Tensor | None, config: GenerationConfig,
                 *, features: torch.Tensor | None = None):
        """ids (B, T): one prompt, or B prompts of one length with one image each (beam_search_batch).
        The images as pixels, or as their features already computed (N, K, C)."""
        self.model = model
        self.ids = ids
        self.features = model.image_features(pixels) if pixels is not None else features
        if ids.shape[0] > 1 and (self.features is None or self.features.shape[0] != ids.shape[0]):
            raise ValueError(f"{ids.shape[0]} prompts decoded together need one image each")
        self.prompts = ids.shape[0]
        self.prompt_length = ids.shape[1]  # the positions after it are generated
        self.prompt_of = torch.arange(self.prompts, device=ids.device)  # which prompt each row continues
        length = ids.shape[1] + config.max_new_tokens + 1
        if length > model.config.decoder.max_length:
            raise ValueError(f"prompt of {ids.shape[1]} tokens + max_new_tokens {config.max_new_tokens} exceeds the "
                             f"model's context of {model.config.decoder.max_length} tokens")
        self.cache = model.decoder.new_cache(ids.shape[0], length) if config.use_cache else None

    def prefill(self) -> torch.Tensor:
        return self.model(self.ids, features=self.features, cache=self.cache).logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """The next logits after `tokens`; an <image> placeholder among the generated tokens is
        embedded as text (VisionLanguageModel.image_slots), as transformers does."""
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        if self.cache is not None:
            return self.model(tokens[:, None], cache=self.cache, prompt_length=self.prompt_length).logits[:, -1]
        # every row's images: those of the prompt it continues (one prompt: all the features, for each beam)
        features = self.features
        if features is not None and self.prompts == 1:
            features = features.repeat(self.ids.shape[0], 1, 1)
        elif features is not None:
            features = features.index_select(0, self.prompt_of)
        return self.model(self.ids, features=features, prompt_length=self.prompt_length).logits[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        self.ids = self.ids.index_select(0, index)
        self.prompt_of = self.prompt_of.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index)
