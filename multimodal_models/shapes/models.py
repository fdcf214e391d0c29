"""The Shapes model types: the general dual encoder and multimodal LM, extended for scene graphs.

- `ShapesCLIP` ("shapes_clip"): a DualEncoder whose vision tower also carries an object head
  (object_head.py), trained on the scene graphs to make every patch token name the object
  centred in it. Retrieval itself is the DualEncoder's.
- `ShapesVLM` ("shapes_vlm"): a VisionLanguageModel that may read an image object by object
  (`image_tokens: objects`, through the tower's object head: ObjectSlots) instead of as a grid,
  and may look back at those objects after chosen decoder blocks with image readers
  (readers.py: places, sinks, counts, relations, separations), whose attention the Shapes
  task supervises with the questions' referents (grounding.py).

Both are built on the general classes through their extension points only:
`VisionLanguageModel.image_token_width / image_features / block_hook / vision_modules`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.dual_encoder import DualEncoder, DualEncoderConfig
from ..models.packed_attention import PackedAttention
from ..models.vlm import BlockHook, VisionLanguageModel, VLMConfig, pixel_shuffle
from .object_head import ObjectHead, ObjectHeadConfig, ObjectSlots
from .readers import ImageReader

IMAGE_TOKENS = ("grid", "objects")

# Zero-shot prompts for Shapes labels (ShapesCLIP's "shapes" prompts). The labels are noun phrases with
# their article, as the captions say them ("a red circle", "two stars"); "{}" is where the label goes.
SHAPES_TEMPLATES: tuple[str, ...] = (
    "{}.",
    "there is {}.",
    "an image of {}.",
    "a picture with {}.",
    "the scene shows {}.",
    "this image contains {}.",
)


# --- the dual encoder ------------------------------------------------------------------------


@dataclass
class ShapesCLIPConfig(DualEncoderConfig):
    # Dense object supervision of the vision tower's patch tokens during training (object_head.py);
    # None: none. Needs the scene graphs of the training images.
    object_head: ObjectHeadConfig | None = None
    prompts: str = "shapes"  # classify()'s default prompts: "shapes" (SHAPES_TEMPLATES), or the DualEncoder's


class ShapesCLIP(DualEncoder):
    model_type = "shapes_clip"
    config_class = ShapesCLIPConfig
    prompt_sets = ("shapes", *DualEncoder.prompt_sets)

    def __init__(self, config: ShapesCLIPConfig):
        super().__init__(config)
        self.object_head = ObjectHead(config.vision.width, config.object_head) if config.object_head else None

    def default_templates(self) -> tuple[str, ...]:
        return SHAPES_TEMPLATES if self.config.prompts == "shapes" else super().default_templates()


# --- the multimodal LM -----------------------------------------------------------------------


@dataclass
class ShapesVLMConfig(VLMConfig):
    # What the projector reads of an image: "grid" (every patch token, after pixel shuffle) | "objects"
    # (object_slots tokens, one per object, chosen and read by the tower's object head: ObjectSlots; needs
    # object_head, which training copies from a ShapesCLIP trained with one; keep that tower frozen,
    # task_options.freeze_vision, as the language loss does not train the head's choice)
    image_tokens: str = "grid"
    object_slots: int = 6
    object_position_frequencies: int = 0  # sine/cosine features of each object's centre (ObjectSlots)
    # cells whose predicted centres lie this close count as one object (ObjectSlots; 0: a plain top-k of
    # cells), and a slot holds an object where its (summed) objectness passes object_presence
    object_merge_radius: float = 0.0
    object_presence: float = 0.5
    object_head: ObjectHeadConfig | None = None
    # Image readers (readers.ImageReader): after each of these decoder blocks, a cross-attention from the
    # text positions to the image's tokens as the vision side gives them (before the projector), whose
    # heads training can point at the objects a question names (grounding). heads x head_dim is the
    # readers' inner width.
    image_reader_blocks: tuple[int, ...] = ()
    image_reader_heads: int = 4
    image_reader_head_dim: int = 32
    # each reader head may also attend to a learned "nothing" (a sink that reads zeros), which lets a
    # head's read grow with the number of objects it finds (counting) and be zero when none matches
    image_reader_sink: bool = False
    # with the sink: each head also hands on how many tokens beat it; true: every reader's heads, or a
    # list whose entries are a block of image_reader_blocks (all its reader's heads count) or a pair
    # [block, head] (that one head counts): [2, [4, 0]]
    image_reader_counts: bool | tuple[int | tuple[int, int], ...] = False
    # False: a counting head's sink only sets what it counts, and what it reads is weighed over the
    # tokens alone; the heads that do not count keep the sink's share
    image_reader_sink_share: bool = True
    # each reader head may also prefer tokens near to (or far from, or in a direction from) a place it
    # names, on the object slots' centres (image_tokens 'objects'): "closest to", "furthest from", "below"
    image_reader_places: bool = False
    # each reader after the first also measures every object against what the reader before it found at
    # the same position (places, same object, shared attributes); needs image_reader_places
    image_reader_relations: bool = False
    # the relating reader also hands on, into the residual, where what each earlier head found lies from
    # what each other one found ("is A above or below B?" from one number); needs image_reader_relations
    image_reader_separations: bool = False

    @property
    def counting_heads(self) -> dict[int, tuple[int, ...]]:
        """Block -> the heads of its image reader that hand on counts (image_reader_counts); blocks
        with no counting head are left out."""
        every = tuple(range(self.image_reader_heads))
        if isinstance(self.image_reader_counts, bool):
            return {block: every for block in self.image_reader_blocks} if self.image_reader_counts else {}
        out: dict[int, list[int]] = {}
        for entry in self.image_reader_counts:
            if isinstance(entry, int):
                out.setdefault(entry, []).extend(every)
            elif isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(v, int) for v in entry):
                out.setdefault(entry[0], []).append(entry[1])
            else:
                raise ValueError(f"image_reader_counts: {entry!r} is neither a block nor a pair [block, head]")
        return {block: tuple(heads) for block, heads in out.items()}

    @property
    def tokens_per_image(self) -> int:
        return self.object_slots if self.image_tokens == "objects" else super().tokens_per_image

    def validate(self) -> None:
        super().validate()
        if self.image_tokens not in IMAGE_TOKENS:
            raise ValueError(f"unknown image_tokens {self.image_tokens!r}; expected one of {IMAGE_TOKENS}")
        for block in self.image_reader_blocks:
            if not 0 <= block < self.decoder.depth:
                raise ValueError(f"image_reader_blocks: block {block} is not one of the decoder's "
                                 f"{self.decoder.depth} blocks (0..{self.decoder.depth - 1})")
        counting = self.counting_heads
        if counting and not self.image_reader_sink:
            raise ValueError("image_reader_counts counts the tokens that beat each head's sink: set image_reader_sink")
        readerless = sorted(set(counting) - set(self.image_reader_blocks))
        if readerless:
            raise ValueError(f"image_reader_counts: blocks {readerless} have no image reader "
                             f"(image_reader_blocks: {list(self.image_reader_blocks)})")
        for block, heads in counting.items():
            if len(set(heads)) < len(heads) or not all(0 <= h < self.image_reader_heads for h in heads):
                raise ValueError(f"image_reader_counts: block {block}'s counting heads {list(heads)} must be distinct "
                                 f"heads of 0..{self.image_reader_heads - 1} (image_reader_heads)")
        if not self.image_reader_sink_share and not counting:
            raise ValueError("image_reader_sink_share: false leaves a counting head's sink only its count: "
                             "it needs image_reader_counts")
        if self.image_reader_places and self.image_tokens != "objects":
            raise ValueError("image_reader_places measures distances between object centres: it needs "
                             "image_tokens 'objects'")
        if self.image_reader_relations and (not self.image_reader_places or len(self.image_reader_blocks) < 2):
            raise ValueError("image_reader_relations relate a reader to the one before it, by the places and attributes "
                             "its heads read: it needs image_reader_places and at least two image_reader_blocks")
        if self.image_reader_separations and not self.image_reader_relations:
            raise ValueError("image_reader_separations hands on where what the earlier reader's heads found lies "
                             "from each other: it needs image_reader_relations")
        if self.image_tokens == "objects":
            if self.object_head is None:
                raise ValueError("image_tokens 'objects' needs object_head, the config of the tower's object head; "
                                 "training copies it from the dual encoder named by task_options.vision_from")
            if self.pixel_shuffle != 1:
                raise ValueError("image_tokens 'objects' reads one patch token per object: set pixel_shuffle to 1")
            if self.vision_layer is not None or self.vision_tokens != "patches":
                raise ValueError("image_tokens 'objects' reads the tower's final patch tokens, which its object head "
                                 "was trained on: leave vision_layer unset and vision_tokens 'patches'")


class ShapesVLM(VisionLanguageModel):
    model_type = "shapes_vlm"
    config_class = ShapesVLMConfig

    def __init__(self, config: ShapesVLMConfig):
        super().__init__(config)
        self.objects = None
        if config.image_tokens == "objects":
            self.objects = self._object_slots(config)
        source = self.image_token_width(config)
        counting = config.counting_heads
        related = config.image_reader_heads if config.image_reader_relations else 0
        self.readers = nn.ModuleList(
            ImageReader(config.decoder.width, source, config.image_reader_heads, config.image_reader_head_dim,
                        sink=config.image_reader_sink, counts=counting.get(block, ()),
                        sink_share=config.image_reader_sink_share, places=config.image_reader_places,
                        relations=related if index else 0,
                        attribute_sizes=self.objects.attribute_sizes if related and index else (),
                        separations=config.image_reader_separations and index > 0)
            for index, block in enumerate(config.image_reader_blocks)
        )

    @staticmethod
    def _object_slots(config: ShapesVLMConfig) -> ObjectSlots:
        return ObjectSlots(config.vision.width, config.object_head, config.object_slots,
                           config.object_position_frequencies, merge_radius=config.object_merge_radius,
                           presence=config.object_presence)

    # -- the general model's extension points ---------------------------------------------------

    @staticmethod
    def image_token_width(config: ShapesVLMConfig) -> int:
        if config.image_tokens == "objects":
            return ObjectSlots.slot_width(config.vision.width, config.object_head, config.object_position_frequencies)
        return VisionLanguageModel.image_token_width(config)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The tower's patch tokens, or with image_tokens 'objects' one slot per object (ObjectSlots)."""
        tokens = super().image_features(pixels)
        return tokens if self.objects is None else self.objects(tokens)

    def vision_modules(self) -> list[nn.Module]:
        return super().vision_modules() + ([self.objects] if self.objects is not None else [])

    # the readers' context pads along its tokens (image_context's `valid` is False there): the server may
    # decode several sequences side by side (BatchedKVCache)
    batched_decoding = True

    def block_hook(self, ids: torch.Tensor, features: torch.Tensor | None, cache,
                   packed: PackedAttention | None, slots: torch.Tensor | None = None) -> ReaderHook | None:
        if not len(self.readers):
            return None
        return ReaderHook(self, *self.image_context(ids, features, cache, slots=slots), packed)

    # -- what the readers read --------------------------------------------------------------------

    def image_context(self, ids: torch.Tensor, features: torch.Tensor | None, cache=None,
                      slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the image readers read: each row's images' tokens side by side (B, S, C_projector_in), which
        of them are real (B, S; rows with fewer images are padded) and which each position may see
        (B, T, S: the tokens of images that start at or before it). With a cache the context of the
        prompt is kept there for the steps that follow. slots (B, T): where the images go (default: every
        <image> in ids); an <image> the model generated is text, not an image (`image_slots`)."""
        B, T = ids.shape
        if features is None and cache is not None and cache.context is not None:
            context, valid = cache.context
            return context, valid, valid[:, None, :].expand(B, T, -1)
        if features is None:  # no image anywhere: the readers read nothing
            empty = torch.zeros(B, 0, dtype=torch.bool, device=ids.device)
            width = self.projector.layers[0].in_features
            return torch.zeros(B, 0, width, device=ids.device), empty, empty[:, None, :].expand(B, T, 0)
        features = pixel_shuffle(features, self.config.pixel_shuffle)  # one token per placeholder, as projected
        placeholders = self.config.tokens_per_image
        K = features.shape[1]
        slots = ids == self.config.image_token_id if slots is None else slots
        starts = [slots[b].nonzero()[::placeholders, 0] for b in range(B)]
        most = max(len(s) for s in starts)
        context = features.new_zeros(B, most * K, features.shape[-1])
        valid = torch.zeros(B, most * K, dtype=torch.bool, device=ids.device)
        first = torch.full((B, most * K), T, dtype=torch.long, device=ids.device)  # position where a token shows
        image = 0
        for b, row_starts in enumerate(starts):
            for j, position in enumerate(row_starts.tolist()):
                context[b, j * K:(j + 1) * K] = features[image]
                valid[b, j * K:(j + 1) * K] = True
                first[b, j * K:(j + 1) * K] = position
                image += 1
        if cache is not None:
            cache.context = (context, valid)
        visible = torch.arange(T, device=ids.device)[None, :, None] >= first[:, None, :]
        return context, valid, visible & valid[:, None, :]

    def object_places(self, hook: ReaderHook) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each of a pass's context tokens lies (B, S, 2) and whether it is a real object (B, S)."""
        if self.objects is None:
            raise ValueError("grounding the image readers needs image_tokens 'objects': it matches object centres to "
                             "the object slots' predicted centres")
        centres, present = self.objects.places(hook.context)
        return centres, present & hook.valid


class ReaderHook(BlockHook):
    """The image readers of one forward pass, run after their decoder blocks; `logits` collects each
    reader's attention logits (B, H, T, S), its margins over the sink where it has one."""

    def __init__(self, model: ShapesVLM, context: torch.Tensor, valid: torch.Tensor, visible: torch.Tensor,
                 packed: PackedAttention | None):
        config = model.config
        self.context, self.valid, self.visible, self.packed = context, valid, visible, packed
        self.places = model.objects.places(context)[0] if config.image_reader_places else None
        self.attributes = model.objects.attributes(context) if config.image_reader_relations else None
        self.reader_at = dict(zip(config.image_reader_blocks, model.readers))
        self.blocks = frozenset(self.reader_at)
        self.logits: list[torch.Tensor] = []
        self.looked = None  # where the last reader's heads looked, for the next one to relate to

    def __call__(self, block: int, x: torch.Tensor) -> torch.Tensor:
        if block not in self.reader_at:
            return x
        # a packed batch's real positions (1, N, C) are read as rows (B, T, C): the readers' small products
        # batch well along T
        x = x if self.packed is None else self.packed.expand(x)
        x, logits, self.looked = self.reader_at[block](x, self.context, self.visible, self.places, self.attributes,
                                                       self.looked)
        self.logits.append(logits)
        return x if self.packed is None else self.packed.compact(x)
