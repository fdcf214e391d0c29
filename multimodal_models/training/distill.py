"""Distillation: a trained teacher (any model `load` reads) teaches a smaller student, in the one loop.

A distill task is the student's own task (contrastive, vlm, or one built on them) with a
teacher beside it: the loss is

    (1 - alpha) x the student task's own loss + alpha x the distillation loss  [+ embedding term]

- Dual encoders (`distill-contrastive`): the KL divergence, at a temperature T, from the
  teacher's image->text and text->image similarity distributions over the batch to the
  student's (each row a softmax over the batch's B texts, or B images), times T^2; and, with
  `embedding_weight`, the cosine distance of the student's image and text embeddings to the
  teacher's (the student's embed_dim must then be the teacher's: the student learns to embed
  into the teacher's space).
- Multimodal LMs (`distill-vlm`): the KL divergence, at a temperature T, from the teacher's
  next-token distribution to the student's at every trained target token, times T^2 (Hinton
  et al. 2015). Teacher and student must share the tokenizer and the number of tokens per
  image, since the teacher reads the student's token ids; anything else is refused.

The teacher runs in eval mode under no_grad, on the same batch, step by step. It is not part
of the student (it is neither trained nor saved). It reads the images as the student does,
so their image preprocessing must match; a VLM teacher whose image features are the student's
own (both frozen on one tower) reuses them.

The distillation part is a mixin before the student task in the class's bases:
`DistillContrastiveTask(DistillsDualEncoder, ContrastiveTask)`; the Shapes world builds its
own the same way (shapes/distill.py). It wraps the task's `forward`, so any task whose `loss`
runs `self.forward` (all of them here) gets the student's outputs distilled without change.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.splits import SplitData
from ..loading import load
from ..models.inputs import tokenize
from .config import task_options
from .tasks import ContrastiveOptions, ContrastiveTask
from .vlm_task import VLMOptions, VLMTask


@dataclass
class DistillFields:
    teacher: str | None = None  # the teacher: a shipped name, a saved folder or a Hugging Face checkpoint (required)
    alpha: float = 0.5  # weight of the distillation loss; 1 - alpha weighs the student task's own loss
    temperature: float = 2.0  # both distributions are softened by it; the KL term is scaled by its square
    # start the student from the teacher's weights wherever a name and shape match, a shorter stack of blocks
    # from evenly spaced teacher blocks (start_from_teacher; DistilBERT's initialisation); needs the same tokenizer
    init_from_teacher: bool = False


@dataclass
class DualEncoderDistillFields(DistillFields):
    # weight of the embedding regression: 1 - cosine of the student's image and text embeddings to the
    # teacher's (0: off); needs the student's embed_dim to equal the teacher's
    embedding_weight: float = 0.0


def check_distill_options(options: DistillFields) -> None:
    """Refuse what the config's types cannot: a missing teacher, alpha outside [0, 1], T <= 0."""
    if not options.teacher:
        raise ValueError("task_options.teacher: a distill task needs its teacher (a shipped name, a saved model "
                         "folder or a Hugging Face checkpoint)")
    if not 0.0 <= options.alpha <= 1.0:
        raise ValueError(f"task_options.alpha: expected a weight in [0, 1], got {options.alpha!r}")
    if not options.temperature > 0:
        raise ValueError(f"task_options.temperature: expected a positive number, got {options.temperature!r}")
    if getattr(options, "embedding_weight", 0.0) < 0:
        raise ValueError(f"task_options.embedding_weight: expected a weight >= 0, got {options.embedding_weight!r}")


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the rows' softmax at `temperature`, averaged over the rows, times T^2
    (so that its gradients keep their size as T changes). Logits (N, K) -> a scalar."""
    T = temperature
    student = F.log_softmax(student_logits.float() / T, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / T, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * T * T


def start_from_teacher(student: torch.nn.Module, teacher: torch.nn.Module, keep: tuple[str, ...] = ()) -> int:
    """Copy the teacher's weights into the student wherever a name and shape match, except under the
    student modules named in `keep`; returns how many tensors were copied. Where the student has fewer blocks in a stack (`...blocks.I.`) its block i takes
    teacher block round(i (n_t - 1) / (n_s - 1)): the first and the last are kept, the rest evenly spaced
    (a single block takes the last)."""
    depths: dict[str, int] = {}
    for model, name in ((student, "student"), (teacher, "teacher")):
        for key in model.state_dict():
            stack, found, rest = key.partition(".blocks.")
            if found:
                index = int(rest.split(".")[0])
                depths[f"{name}:{stack}"] = max(depths.get(f"{name}:{stack}", 0), index + 1)
    theirs = teacher.state_dict()
    copied = 0
    with torch.no_grad():
        for key, tensor in student.state_dict().items():
            if any(key.startswith(prefix + ".") for prefix in keep):
                continue
            source = key
            stack, found, rest = key.partition(".blocks.")
            if found and f"teacher:{stack}" in depths:
                index, tail = rest.split(".", 1)
                n_s, n_t = depths[f"student:{stack}"], depths[f"teacher:{stack}"]
                mapped = n_t - 1 if n_s == 1 else round(int(index) * (n_t - 1) / (n_s - 1))
                source = f"{stack}.blocks.{mapped}.{tail}"
            if source in theirs and theirs[source].shape == tensor.shape:
                tensor.copy_(theirs[source])
                copied += 1
    return copied


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers (WordTokenizer or HFTokenizer) map the same tokens to the same ids."""
    return type(a) is type(b) and a.tokenizer.get_vocab() == b.tokenizer.get_vocab()


class Distills:
    """What every distill task shares: its options, the teacher (loaded, frozen, in eval mode), the
    loss mixing, and the student outputs of the step (captured from the task's own forward)."""

    teacher_type: str = ""  # the model_type the teacher must be (load's `expect`)

    def __init__(self, config, train: SplitData, evaluation: SplitData, *, progress: bool = True):
        options = task_options(config, self.Options)
        check_distill_options(options)
        self.teacher = load(options.teacher, expect=self.teacher_type, needed_by="task_options.teacher of this task")
        self.teacher.requires_grad_(False)
        self.alpha, self.temperature = options.alpha, options.temperature
        self._student_out = None
        super().__init__(config, train, evaluation, progress=progress)
        if options.init_from_teacher:
            if not same_vocabulary(self.teacher.tokenizer, self.model.tokenizer):
                raise ValueError("task_options.init_from_teacher copies the teacher's token embeddings too: the student "
                                 "needs the teacher's tokenizer")
            copied = start_from_teacher(self.model, self.teacher, keep=self.kept_at_start())
            if progress:
                print(f"distill: the student starts from {copied} of the teacher's weight tensors "
                      f"(of {len(self.model.state_dict())})", flush=True)
        if self.teacher.image_processor != self.model.image_processor:
            raise ValueError(f"the teacher {options.teacher} reads images differently from the student "
                             f"({self.teacher.image_processor} against {self.model.image_processor}); the teacher reads "
                             "the student's pixels, so their image preprocessing (model.vision.image_size) must match")

    def kept_at_start(self) -> tuple[str, ...]:
        """The student modules init_from_teacher leaves as the student task made them (none here)."""
        return ()

    def forward(self, model, batch: dict, **options):
        out = super().forward(model, batch, **options)
        self._student_out = out  # loss() distils the outputs the task's own loss was computed on
        return out

    def teacher_forward(self, batch: dict, **options):
        """The teacher's outputs on this batch (as the task's forward gives them), in eval mode, without gradients."""
        teacher = self.teacher
        device = batch["ids"].device
        if teacher.device != device:
            teacher.to(device)
        teacher.eval()
        with torch.no_grad():
            return super().forward(teacher, batch, **options)

    def loss(self, model, batch: dict, **options) -> torch.Tensor:
        own = super().loss(model, batch, **options)
        distilled = self.distillation_loss(self._student_out, batch, **options)
        self._student_out = None
        return (1 - self.alpha) * own + distilled

    def distillation_loss(self, student_out, batch: dict, **options) -> torch.Tensor:
        """alpha x the soft-target loss (and any other term), from the student's outputs of this step."""
        raise NotImplementedError


# --- dual encoders -------------------------------------------------------------------------------


class DistillsDualEncoder(Distills):
    """Similarity distillation (and optionally embedding regression) for a contrastive task."""

    teacher_type = "dual_encoder"

    def __init__(self, config, train: SplitData, evaluation: SplitData, *, progress: bool = True):
        super().__init__(config, train, evaluation, progress=progress)
        self.embedding_weight = self.options.embedding_weight
        teacher_dim, student_dim = self.teacher.config.embed_dim, self.model.config.embed_dim
        if self.embedding_weight > 0 and teacher_dim != student_dim:
            raise ValueError(f"task_options.embedding_weight regresses the student's embeddings onto the teacher's, "
                             f"so model.embed_dim must be the teacher's {teacher_dim} (it is {student_dim}); "
                             "or set embedding_weight: 0 to distil the similarities only")
        # where the tokenizers differ, the teacher tokenizes the captions itself
        self.teacher_tokenizes = not same_vocabulary(self.teacher.tokenizer, self.tokenizer)

    def make_batch(self, indices: list[int], rng: random.Random) -> dict:
        replay = random.Random()
        replay.setstate(rng.getstate())
        batch = super().make_batch(indices, rng)
        if self.teacher_tokenizes:
            # the student task drew each image's caption first, with this rng: draw them again
            captions = [replay.choice(self.records[i].captions) for i in indices]
            text = self.model.config.text
            ids, _ = tokenize(self.tokenizer, captions, text.max_length, padding=text.padding)
            if not torch.equal(ids, batch["ids"]):
                raise RuntimeError("the captions of the distillation batch could not be recovered (the student "
                                   "task's make_batch changed its order of draws)")
            teacher_text = self.teacher.config.text
            batch["teacher_ids"], batch["teacher_mask"] = tokenize(self.teacher.tokenizer, captions,
                                                                   teacher_text.max_length, padding=teacher_text.padding)
        return batch

    def distillation_loss(self, student_out, batch: dict, **options) -> torch.Tensor:
        teacher_batch = {"pixels": batch["pixels"], "ids": batch.get("teacher_ids", batch["ids"]),
                         "mask": batch.get("teacher_mask", batch["mask"])}  # no extra negatives: B x B only
        teacher_out = self.teacher_forward(teacher_batch)
        student_logits, teacher_logits = student_out.logits_per_image, teacher_out.logits_per_image
        T = self.temperature
        similarity = (soft_kl(student_logits, teacher_logits, T) + soft_kl(student_logits.T, teacher_logits.T, T)) / 2
        loss = self.alpha * similarity
        if self.embedding_weight > 0:
            regression = (embedding_distance(student_out.image_embeds, teacher_out.image_embeds)
                          + embedding_distance(student_out.text_embeds, teacher_out.text_embeds)) / 2
            loss = loss + self.embedding_weight * regression
        return loss


def embedding_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of each student embedding to its teacher embedding, averaged."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


@dataclass
class DistillContrastiveOptions(ContrastiveOptions, DualEncoderDistillFields):
    pass


class DistillContrastiveTask(DistillsDualEncoder, ContrastiveTask):
    """The contrastive task, its student taught by a dual encoder teacher."""

    name = "distill-contrastive"
    Options = DistillContrastiveOptions


# --- multimodal LMs --------------------------------------------------------------------------------


class DistillsVLM(Distills):
    """Token-level logit distillation for a VLM task: the teacher's next-token distribution at every
    trained target token."""

    teacher_type = "vlm"

    def __init__(self, config, train: SplitData, evaluation: SplitData, *, progress: bool = True):
        super().__init__(config, train, evaluation, progress=progress)
        teacher, student, name = self.teacher, self.model, self.options.teacher
        if not same_vocabulary(teacher.tokenizer, student.tokenizer):
            t_vocab, s_vocab = teacher.tokenizer.tokenizer.get_vocab(), student.tokenizer.tokenizer.get_vocab()
            differing = sorted(set(t_vocab.items()) ^ set(s_vocab.items()), key=lambda item: item[1])[:5]
            raise ValueError(f"the teacher {name} and the student do not share the tokenizer ({len(t_vocab)} against "
                             f"{len(s_vocab)} tokens; differing entries such as {differing}): token-level distillation "
                             "compares their distributions token by token; train the student on the teacher's data "
                             "with the same tokenizer settings, or start it from a model with the teacher's tokenizer")
        if teacher.config.decoder.vocab_size != student.config.decoder.vocab_size:
            raise ValueError(f"the teacher {name} predicts {teacher.config.decoder.vocab_size} tokens and the student "
                             f"{student.config.decoder.vocab_size}: they must predict the same vocabulary")
        if (teacher.config.image_token_id, teacher.config.tokens_per_image) != (student.config.image_token_id,
                                                                                student.config.tokens_per_image):
            raise ValueError(f"the teacher {name} reads {teacher.config.tokens_per_image} tokens per image (placeholder "
                             f"id {teacher.config.image_token_id}) and the student {student.config.tokens_per_image} "
                             f"(id {student.config.image_token_id}): the teacher reads the student's token ids, so "
                             "these must match")
        self._batch_images: list[int] = []
        self._shares_features: bool | None = None  # decided on the first batch (shared_features)

    def kept_at_start(self) -> tuple[str, ...]:
        """A vision side that task_options.vision_from gave stays that model's."""
        if not self.options.vision_from:
            return ()
        vision = [id(module) for module in self.model.vision_modules()]
        return tuple(name for name, module in self.model.named_modules() if id(module) in vision)

    def frozen_features(self, images: list[int]) -> torch.Tensor | None:
        self._batch_images = images  # the store positions of this batch's images, for the teacher
        return super().frozen_features(images)

    def make_batch(self, indices: list[int], rng: random.Random) -> dict:
        self._batch_images = []
        batch = super().make_batch(indices, rng)
        if batch["features"] is not None and self._batch_images and not self.shared_features():
            batch["teacher_pixels"] = self.store.batch(self._batch_images)
        return batch

    def shared_features(self) -> bool:
        """Whether the teacher's image features are the student's frozen ones (the same tower, frozen in
        both), so that the teacher reads those instead of encoding the pixels again: decided once, on the
        first training images."""
        if self._shares_features is None:
            probe = self.store.batch(list(range(min(8, len(self.store)))))
            with torch.no_grad():
                mine = self.model.image_features(probe.to(self.model.device))
                theirs = self.teacher.to(self.model.device).image_features(probe.to(self.model.device))
            self._shares_features = mine.shape == theirs.shape and torch.allclose(mine, theirs, atol=1e-5)
        return self._shares_features

    def distillation_loss(self, student_out, batch: dict, **options) -> torch.Tensor:
        out, _ = student_out
        teacher_batch = batch
        if batch.get("teacher_pixels") is not None:  # the student's features are its own: the teacher encodes
            teacher_batch = {**batch, "features": None, "pixels": batch["teacher_pixels"]}
        teacher_out, _ = self.teacher_forward(teacher_batch, **options)
        logits, teacher_logits = out.logits, teacher_out.logits
        if logits.dim() == 3:  # every position's logits (targets_only=False): the trained ones
            trained = batch["labels"][:, 1:] != -100
            logits, teacher_logits = logits[:, :-1][trained], teacher_logits[:, :-1][trained]
        return self.alpha * soft_kl(logits, teacher_logits, self.temperature)


@dataclass
class DistillVLMOptions(VLMOptions, DistillFields):
    pass


class DistillVLMTask(DistillsVLM, VLMTask):
    """The VLM task, its student taught token by token by a VLM teacher."""

    name = "distill-vlm"
    Options = DistillVLMOptions
