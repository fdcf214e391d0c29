"""Training task of the native multimodal LM: captions, questions and dialogues as chats.

Everything said about one image shares one forward pass. A training sequence is

    <bos> <user> <image>xK | q1 <assistant> a1 <eos> | q2 <assistant> a2 <eos> | caption chat | dialogue ...
    ---- shared prefix --- ---- segment 1 --------- ---- segment 2 --------

and the attention mask lets every segment see the prefix and itself, never another
segment, with position ids restarting after the prefix. Each segment is therefore
trained exactly as if it were its own sequence `prefix + segment` (the prompt a user
sends at inference), while the image is encoded once for a dozen examples. The batch also
says which segment each position is in, and the model computes that mask block by block on
the real positions only (models/packed_attention.py). Where the vision tower is frozen, its
features of the training images are computed once (frozen_features).

A task built on this one (the Shapes world's grounded task is one) may attach an annotation to
each answer (`annotation`), which packing carries to the answer's place in the batch, add
targets of its own to a batch (`add_targets`), and add to the loss and the evaluation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.preprocess import ImageProcessor
from ..data.records import ImageSource
from ..data.splits import ImageStore, SplitData, image_key
from ..data.tokenizer import WordTokenizer
from ..evaluate.harness import first_images, vlm_split_scores
from ..loading import base_reference, load, resolve
from ..models.chat import CHAT_SPECIAL_TOKENS, ChatEncoding, conversation_to_messages
from ..models.layers import causal_mask
from ..models.lora import LoRAConfig, apply_lora, merge_lora
from ..models.packed_attention import PADDING
from ..models.pretrained import config_from_dict
from ..models.vision import VisionConfig
from ..models.vlm import CAPTION_PROMPT, VisionLanguageModel, VLMConfig, VLMOutput
from ..pretrained.peft_adapters import LoRAAdapter, adapter_from_model
from .config import task_options
from .loop import autocast_context

# The most memory the frozen vision tower's features of the training images may take (VLMTask.frozen_features).
FROZEN_FEATURES_BYTES = 2**30

# How many distinct training chats' encodings VLMTask.encode keeps (~1 kB each).
ENCODINGS_KEPT = 1_000_000

# Ways of asking for a caption seen in training; CAPTION_PROMPT is the one inference uses.
CAPTION_PROMPTS = (CAPTION_PROMPT, "what is in the picture?", "write a caption.", "describe this image.")

Annotations = tuple[Any, ...]  # what the task attaches to each assistant turn of a chat, in order (VLMTask.annotation)


@dataclass(frozen=True)
class QuestionAnswer:
    """One training question about an image, its target answer, its type (None: untyped) and annotation."""

    question: str
    answer: str
    question_type: str | None
    annotation: Any = None


@dataclass
class ImageExamples:
    """Everything to learn about one image (or one free-form conversation)."""

    images: list[ImageSource]
    captions: list[str] = field(default_factory=list)
    qa: list[QuestionAnswer] = field(default_factory=list)
    # conversations as chat messages, each with the annotation of each assistant turn
    chats: list[tuple[list[dict], Annotations]] = field(default_factory=list)
    shared_prefix: bool = True  # False: a conversation with several images or a late image, packed alone


@dataclass
class Unit:
    """One training sequence: the images it shows, a shared prefix and its segments."""

    images: list[ImageSource]
    prefix: list[int]
    segments: list[tuple[list[int], list[bool], Annotations]]  # (ids, is-target, annotations) after the prefix


@dataclass
class VLMOptions:
    questions_per_image: int = 0  # questions per image and step, drawn afresh each time (0: all of them)
    # the share of each named question type's questions a step trains on (each kept with that chance, drawn
    # again every time its image comes round); types not named keep every question
    question_rates: dict[str, float] = field(default_factory=dict)
    captions_per_image: int = 1  # captions per image and step
    max_length: int | None = None  # a packed sequence's longest (None: the decoder's max_length)
    vision_from: str | None = None  # start from this model's vision tower (LLaVA's recipe)
    init_from: str | None = None  # fine-tune this saved, shipped or Hugging Face model, with its own tokenizer
    # LoRA on the decoder, everything else frozen: model/ is the merged model (lora.merge), and with init_from
    # adapter/ holds the adapter alone in peft's layout
    lora: LoRAConfig | None = None
    freeze_vision: bool = False  # keep the (pretrained) vision side as it is


class VLMTask:
    name = "vlm"
    Options = VLMOptions
    model_class = VisionLanguageModel  # a task built on this one may train a subclass

    @classmethod
    def prepare_data(cls, config) -> None:
        """Before the data is read (on the main process): nothing here; a task over generated data makes it."""

    def __init__(self, config, train: SplitData, evaluation: SplitData, *, progress: bool = True):
        self.config = config
        options = self.options = task_options(config, self.Options)
        self.questions_per_image = options.questions_per_image  # 0: all of them
        self.captions_per_image = options.captions_per_image
        if options.init_from:  # fine-tune a saved or Hugging Face model with its own tokenizer and template
            self.model = load_model(options.init_from, self.model_class.model_type)
        else:
            self.model = self._fresh_model(config, train, options.vision_from)
        self.tokenizer = self.model.tokenizer
        if options.freeze_vision:  # LLaVA's recipe: keep the (pretrained) vision tower as it is
            if not (options.vision_from or options.init_from):
                raise ValueError("task_options.freeze_vision keeps the vision tower fixed, so it needs a trained one: "
                                 "set task_options.vision_from (or init_from)")
            for parameter in (p for module in self.model.vision_modules() for p in module.parameters()):
                parameter.requires_grad_(False)
        self.lora = options.lora
        if self.lora is not None and not self.lora.merge and not options.init_from:
            raise ValueError("task_options.lora.merge: false saves the adapter alone, which applies to the model the "
                             "run started from: set task_options.init_from (or leave lora.merge true)")
        if self.lora is not None:  # LoRA on the decoder; everything else frozen
            for parameter in self.model.parameters():
                parameter.requires_grad_(False)
            apply_lora(self.model.decoder, targets=self.lora.targets, rank=self.lora.rank, alpha=self.lora.alpha,
                       dropout=self.lora.dropout)
        self.template = self.model.chat_template()
        self._encodings: dict[tuple, ChatEncoding] = {}  # encode()'s cache
        self.train_split, self.eval_split = train, evaluation
        self.units = self._build_units(train)
        self.question_rates = self._question_rates(options.question_rates)
        self.max_length = options.max_length or self.model.config.decoder.max_length
        self.store = ImageStore([s for u in self.units for s in u.images], self.model.image_processor,
                                preload=config.data.preload_images, progress=progress, desc="train images")
        self.eval_store: ImageStore | None = None
        self.progress = progress
        self._frozen_features: torch.Tensor | bool | None = None  # see frozen_features

    def _fresh_model(self, config, train: SplitData, vision_from: str | None) -> VisionLanguageModel:
        """A new model with a word tokenizer built from the training text."""
        tokenizer = WordTokenizer.train(train.texts() + list(CAPTION_PROMPTS), extra_special_tokens=CHAT_SPECIAL_TOKENS,
                                        **config.tokenizer)
        model_config: VLMConfig = config_from_dict(self.model_class.config_class, config.model, source="model")
        model_config.decoder.vocab_size = tokenizer.vocab_size
        model_config.image_token_id = tokenizer.image_id
        tower = None
        if vision_from:  # LLaVA's recipe: start from a contrastively trained vision tower
            tower = load_model(vision_from)
            if "vision" in config.model and config_from_dict(VisionConfig, config.model["vision"]) != tower.vision.config:
                raise ValueError(f"model.vision differs from the vision tower of {vision_from}; "
                                 "leave model.vision out to take the tower's own config")
            model_config.vision = tower.vision.config
        model = self.model_class(self.configure_model(model_config, tower))
        if tower is not None:
            self.copy_tower(model, tower)
        size = model_config.vision.image_size
        model.tokenizer = tokenizer
        model.image_processor = ImageProcessor(size={"height": size, "width": size})
        return model

    def configure_model(self, model_config: VLMConfig, tower) -> VLMConfig:
        """The new model's config, given the model whose vision tower it starts from (None: a new tower)."""
        return model_config

    def copy_tower(self, model: VisionLanguageModel, tower) -> None:
        """Start the new model's vision side from `tower`'s."""
        model.vision.load_state_dict(tower.vision.state_dict())

    def export_model(self, model: VisionLanguageModel) -> VisionLanguageModel | LoRAAdapter:
        """The model to save at the end (as <output>/model). With LoRA on a model the run started from
        (init_from), the adapter alone is first written to <output>/adapter in peft's layout (it names
        that model as its base); then the model with the updates folded into its weights, or with
        lora.merge false the adapter itself, is what <output>/model holds."""
        if self.lora is None:
            return model
        adapter = None
        if self.options.init_from:
            adapter = adapter_from_model(model, base=base_reference(self.options.init_from),
                                         base_folder=resolve(self.options.init_from))
            dtype = None if self.config.save_dtype == "float32" else getattr(torch, self.config.save_dtype)
            adapter.save_pretrained(Path(self.config.output) / "adapter", dtype=dtype)
        if not self.lora.merge:
            return adapter
        return merge_lora(model)

    # -- building sequences ----------------------------------------------------------------

    def _build_units(self, split: SplitData) -> list[ImageExamples]:
        """Group everything said about each image: captions, questions, single-image dialogues."""
        by_image: dict[str, ImageExamples] = {}

        def entry(source: ImageSource) -> ImageExamples:
            return by_image.setdefault(image_key(source), ImageExamples([source]))

        for record in split.captions:
            entry(record.image).captions.extend(record.captions)
        for record in split.vqa:
            answer = record.answer or (record.answers[0] if record.answers else "")
            entry(record.image).qa.append(QuestionAnswer(record.question, answer, record.question_type,
                                                         self.annotation(record, answer)))
        free_form = []
        for record in split.conversations:
            messages = conversation_to_messages(record)
            first = messages[0]
            if len(record.images) == 1 and first["role"] == "user" and first["content"].lstrip().startswith("<image>"):
                entry(record.images[0]).chats.append((messages, self.turn_annotations(record)))
            else:  # several images, or the image later in the chat: a sequence of its own
                free_form.append(ImageExamples(list(record.images), chats=[(messages, self.turn_annotations(record))],
                                               shared_prefix=False))
        return list(by_image.values()) + free_form

    def annotation(self, item, answer: str) -> Any:
        """What to carry with an answer to its place in a batch (`add_targets`): item is the VQARecord or the
        user Turn it answers. None here; a task built on this one may read the item's own annotations."""
        return None

    def turn_annotations(self, record) -> Annotations:
        """Each assistant turn's annotation: from the user turn just before it."""
        return tuple(self.annotation(asked, answer.text) if asked is not None else None
                     for asked, answer in record.exchanges())

    def _question_rates(self, rates: dict[str, float]) -> dict[str, float]:
        """task_options.question_rates: the share of each question type's questions a step trains on
        (each question kept with that chance, drawn again every time its image comes round); types
        not named keep every question. A data mixture: types learned long before the others cost
        their tokens every step all the same."""
        known = {q.question_type for u in self.units for q in u.qa} - {None}
        unknown = sorted(set(rates) - known)
        if unknown:
            raise ValueError(f"task_options.question_rates names question types the training questions do not have: "
                             f"{unknown}; they have: {sorted(known)}")
        for question_type, rate in rates.items():
            if not 0 < rate <= 1:
                raise ValueError(f"task_options.question_rates.{question_type}: expected a share in (0, 1], got {rate!r}")
        return {t: float(r) for t, r in rates.items()}

    def unit_sequence(self, item: ImageExamples, rng: random.Random) -> Unit:
        """The packed sequence of one image for this step (captions and questions sampled by rng).

        The shared prefix is the longest common start of all the image's chats that ends before
        the first trained token; it must hold every image placeholder (the image comes first)."""
        chats = self._chats(item, rng)
        encodings = [self.encode(messages) for messages, _ in chats]
        answers = [a for _, a in chats]
        if not item.shared_prefix or len(encodings) == 1:
            encoding = encodings[0]
            return Unit(item.images, encoding.ids[:1], [(encoding.ids[1:], encoding.targets[1:], answers[0])])
        common = 0
        shortest = min(len(e.ids) for e in encodings)
        while common < shortest and len({e.ids[common] for e in encodings}) == 1:
            common += 1
        common = min([common] + [e.targets.index(True) for e in encodings if True in e.targets])
        image_id = self.model.config.image_token_id
        if any(image_id in e.ids[common:] for e in encodings):
            raise ValueError("the chat template does not put the image before the text it varies; "
                             "these conversations cannot share one image prefix")
        segments = [(e.ids[common:], e.targets[common:], a) for e, a in zip(encodings, answers)]
        rng.shuffle(segments)
        return Unit(item.images, encodings[0].ids[:common], segments)

    def encode(self, messages: list[dict]) -> ChatEncoding:
        """The chat template's encoding of a training chat, remembered: an image's chats come back every
        epoch (the first ENCODINGS_KEPT distinct ones are kept; callers only read them)."""
        key = tuple((m["role"], m["content"] if isinstance(m["content"], str)
                     else tuple((p["type"], p.get("text")) for p in m["content"])) for m in messages)
        encoding = self._encodings.get(key)
        if encoding is None:
            encoding = self.template.encode(messages)
            if len(self._encodings) < ENCODINGS_KEPT:
                self._encodings[key] = encoding
        return encoding

    def _chats(self, item: ImageExamples, rng: random.Random) -> list[tuple[list[dict], Annotations]]:
        """This step's chats about the item, each with the annotation of each of its answers."""
        if not item.shared_prefix:
            return item.chats
        image_part = {"type": "image"}
        chats = []
        for caption in rng.sample(item.captions, min(self.captions_per_image, len(item.captions))):
            chats.append(([{"role": "user", "content": [image_part, {"type": "text", "text": rng.choice(CAPTION_PROMPTS)}]},
                           {"role": "assistant", "content": caption}], (None,)))
        qa = item.qa if not self.questions_per_image else rng.sample(item.qa, min(self.questions_per_image, len(item.qa)))
        if self.question_rates:
            kept = [q for q in qa if q.question_type not in self.question_rates
                    or rng.random() < self.question_rates[q.question_type]]
            # an image with nothing else to say keeps one question: every sequence trains on something
            qa = kept if kept or chats or item.chats or not qa else [rng.choice(qa)]
        for q in qa:
            chats.append(([{"role": "user", "content": [image_part, {"type": "text", "text": q.question}]},
                           {"role": "assistant", "content": q.answer}], (q.annotation,)))
        return chats + item.chats

    def __len__(self) -> int:
        return len(self.units)

    def make_batch(self, indices: list[int], rng: random.Random) -> dict:
        units = [self.unit_sequence(self.units[i], rng) for i in indices]
        rows = [pack(u, self.max_length) for u in units]
        T = max(len(r[0]) for r in rows)

        def padded(column: int, fill: int) -> torch.Tensor:  # one (B, T) tensor from the rows' lists
            return torch.tensor([r[column] + [fill] * (T - len(r[0])) for r in rows], dtype=torch.long)

        ids, targets = padded(0, self.tokenizer.pad_id), padded(1, False).bool()
        labels = torch.where(targets, ids, -100)
        positions, segments = padded(2, 0), padded(3, PADDING)
        # a real position sees the earlier positions of its own segment and of its row's prefix (segment 0);
        # padding attends to itself only
        same = (segments[:, :, None] == segments[:, None, :]) | (segments[:, None, :] == 0)
        real = (segments != PADDING)[:, :, None]
        mask = torch.where(real, same & causal_mask(T), torch.eye(T, dtype=torch.bool))
        images = [self.store.position(s) for u in units for s in u.images]
        features = self.frozen_features(images) if images else None
        pixels = self.store.batch(images) if images and features is None else None
        batch = {"ids": ids, "labels": labels, "positions": positions, "mask": mask[:, None], "segments": segments,
                 "pixels": pixels, "features": features,
                 "examples": sum(len(u.segments) for u in units), "tokens": int((labels != -100).sum())}
        self.add_targets(batch, rows)
        return batch

    def add_targets(self, batch: dict, rows: list) -> None:
        """Targets of a task built on this one, from the packed rows (`pack`: each segment's place and the
        annotations of its answers). Nothing here."""

    def frozen_features(self, images: list[int]) -> torch.Tensor | None:
        """The image features (N, K, C) of the training images at these store positions, where the
        vision tower is frozen: computed once for every training image (in the training precision, as
        a step would), in a fixed order, the first time they are needed (a resumed run reads the same
        numbers), and kept in float32. None where the tower trains, or where they would take more than
        FROZEN_FEATURES_BYTES: make_batch then sends the pixels."""
        if self._frozen_features is None:
            self._frozen_features = self._encode_frozen_tower()
        if self._frozen_features is False:
            return None
        return self._frozen_features[torch.as_tensor(images, dtype=torch.long)]

    def _encode_frozen_tower(self) -> torch.Tensor | bool:
        model = self.model
        if any(p.requires_grad for module in model.vision_modules() for p in module.parameters()):
            return False
        device = next(model.parameters()).device
        chunk = 64
        encoded = []
        with torch.no_grad(), autocast_context(self.config.train.precision, device):  # as a step would
            for start in tqdm(range(0, len(self.store), chunk), desc="image features (frozen tower)",
                              disable=not self.progress, leave=False):
                images = list(range(start, min(start + chunk, len(self.store))))
                encoded.append(model.image_features(self.store.batch(images).to(device)).float().cpu())
                if start == 0 and encoded[0][0].numel() * 4 * len(self.store) > FROZEN_FEATURES_BYTES:
                    return False
        return torch.cat(encoded)

    def evaluate(self, model, limit: int) -> dict:
        """VQA accuracy, caption metrics and dialogue turn accuracy on the eval split (and the extras of a
        task built on this one)."""
        split = first_images(self.eval_split, limit)
        if self.eval_store is None:  # the same images every evaluation: decode them once
            sources = [r.image for r in split.captions] + [r.image for r in split.vqa]
            sources += [s for r in split.conversations for s in r.images]
            self.eval_store = ImageStore(sources, model.image_processor, progress=False)
        return vlm_split_scores(model, split, store=self.eval_store, extras=self.evaluation_extras())

    def evaluation_extras(self) -> tuple:
        """Evaluations to run beside the general ones (evaluate.harness.vlm_split_scores' extras)."""
        return ()

    @staticmethod
    def primary_metric(flat: dict) -> float:
        """The number that picks the best checkpoint (higher is better)."""
        for key in ("vqa", "dialogue", "cider"):
            if flat.get(key) is not None:
                return flat[key]
        return 0.0

    def forward(self, model, batch: dict, *, targets_only: bool = True) -> tuple[VLMOutput, torch.Tensor]:
        """The model's pass over a batch, and the tokens its logits should predict. The head runs only where
        a next token is trained on; targets_only=False computes every position's logits (the same loss,
        as training did before; benchmarks/training_throughput.py's reference)."""
        wanted, targets = predicted_positions(batch["labels"])
        out = model(batch["ids"], batch["pixels"], features=batch.get("features"), mask=batch["mask"],
                    segments=batch.get("segments"), positions=batch["positions"],
                    predict_at=wanted if targets_only else None)
        return out, targets

    def loss(self, model, batch: dict, *, targets_only: bool = True) -> torch.Tensor:
        """The next-token loss over the answers' tokens."""
        out, targets = self.forward(model, batch, targets_only=targets_only)
        return next_token_loss(out.logits, batch["labels"], targets, targets_only=targets_only)


def predicted_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """labels (B, T), -100 where nothing is trained -> the positions b * T + t whose next token
    labels[b, t + 1] is trained on, in order, and those tokens."""
    following = labels[:, 1:]
    row, t = (following != -100).nonzero(as_tuple=True)
    return row * labels.shape[1] + t, following[row, t]


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, *,
                    targets_only: bool = True) -> torch.Tensor:
    """Cross-entropy of the next tokens: logits (M, V) at the predicted positions (targets_only), or
    (B, T, V) at every position, scored against labels (B, T) shifted by one."""
    if targets_only:
        return F.cross_entropy(logits.float(), targets)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def load_model(name_or_path: str, model_type: str | None = None):
    """A saved, shipped or Hugging Face model to start from (for its vision tower, or all of it)."""
    model = load(name_or_path, expect=model_type, needed_by=f"the {model_type} task")
    if not hasattr(model, "vision"):
        raise ValueError(f"{name_or_path} ({model.model_type}) has no vision encoder to start from")
    return model


def pack(unit: Unit, max_length: int) -> tuple[list[int], list[bool], list[int], list[int], list]:
    """ids, targets, positions and segment numbers (0 = prefix) of a packed sequence, and where each
    packed segment starts and ends, with its answers' annotations.

    Segments that would run past max_length are left for another step (dropped here)."""
    ids, targets = list(unit.prefix), [False] * len(unit.prefix)
    positions, segments = list(range(len(unit.prefix))), [0] * len(unit.prefix)
    placed = []
    for number, (seg_ids, seg_targets, answers) in enumerate(unit.segments, start=1):
        if len(unit.prefix) + len(seg_ids) > max_length:
            continue
        placed.append((len(ids), len(ids) + len(seg_ids), answers))
        ids += seg_ids
        targets += seg_targets
        positions += range(len(unit.prefix), len(unit.prefix) + len(seg_ids))
        segments += [number] * len(seg_ids)
    return ids, targets, positions, segments, placed

