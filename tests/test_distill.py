"""The distill tasks: a tiny teacher teaches a tiny student in a few steps, on the tiny Shapes world."""

from __future__ import annotations

import random

import pytest
import torch

from multimodal_models.errors import DataFormatError
from multimodal_models.loading import load
from multimodal_models.models.inputs import tokenize
from multimodal_models.training.config import config_from_raw
from multimodal_models.training.distill import soft_kl, start_from_teacher
from multimodal_models.training.loop import build_task, train

from .conftest import TINY_MODELS, tiny_config


def teacher_run(kind: str, data, out, **raw) -> str:
    """A tiny teacher trained for a few steps (sharper than a random one); returns its model folder."""
    config = tiny_config(kind, data, out, steps=6, eval_every=6, lr=0.01)
    config.update(raw)
    return train(config_from_raw(config), progress=False)["model"]


@pytest.fixture(scope="module")
def teachers(tiny_shapes, tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {kind: teacher_run(kind, tiny_shapes, root / kind) for kind in ("vlm", "contrastive", "shapes-contrastive")}


def distill_config(task: str, student: str, teacher: str, data, out, options: dict | None = None, **train_settings) -> dict:
    config = tiny_config(student, data, out, **train_settings)
    config["task"] = task
    config["task_options"] = {"teacher": teacher, **(options or {})}
    return config


def kl_before_and_after(task, steps: int = 15, lr: float = 3e-3) -> tuple[float, float]:
    """The distillation loss (alpha 1: the loss is nothing else) on one fixed batch, before and after
    `steps` steps on it."""
    torch.manual_seed(0)
    batch = task.make_batch(list(range(8)), random.Random(0))
    model = task.model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps + 1):
        loss = task.loss(model, batch)
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses[0], losses[-1]


def test_a_vlm_student_moves_its_next_token_distributions_to_the_teachers(tiny_shapes, teachers, tmp_path):
    config = config_from_raw(distill_config("distill-vlm", "vlm", teachers["vlm"], tiny_shapes, tmp_path / "s",
                                            {"alpha": 1.0, "temperature": 2.0}))
    task = build_task(config, progress=False)
    before, after = kl_before_and_after(task)
    assert before > 0.05  # a new student disagrees with its teacher
    assert after < 0.3 * before
    # the teacher is frozen and stays in eval mode: nothing of it trains
    assert not task.teacher.training
    assert all(p.grad is None and not p.requires_grad for p in task.teacher.parameters())


def test_the_vlm_distillation_loss_is_the_kl_of_the_teachers_distributions(tiny_shapes, teachers, tmp_path):
    """alpha 1: the loss is T^2 x KL(teacher || student) over the trained target tokens, computed here by hand."""
    config = config_from_raw(distill_config("distill-vlm", "vlm", teachers["vlm"], tiny_shapes, tmp_path / "s",
                                            {"alpha": 1.0, "temperature": 3.0}))
    task = build_task(config, progress=False)
    batch = task.make_batch(list(range(4)), random.Random(1))
    with torch.no_grad():
        loss = task.loss(task.model, batch)
        student, targets = task.forward(task.model, batch)
        teacher, _ = task.forward(task.teacher, batch)
    p = torch.softmax(teacher.logits / 3, -1)
    by_hand = (p * (p.log() - torch.log_softmax(student.logits / 3, -1))).sum(-1).mean() * 9
    assert len(targets) == int((batch["labels"][:, 1:] != -100).sum())
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-4)
    # alpha 0: the student task's own next-token loss alone
    task.alpha = 0.0
    with torch.no_grad():
        plain = torch.nn.functional.cross_entropy(task.forward(task.model, batch)[0].logits, targets)
        assert float(task.loss(task.model, batch)) == pytest.approx(float(plain), rel=1e-5)


def test_a_vlm_teacher_with_another_tokenizer_is_refused(tiny_shapes, tmp_path):
    raw = tiny_config("vlm", tiny_shapes, tmp_path / "t")
    raw["tokenizer"] = {"min_frequency": 50}  # a smaller vocabulary than the student's
    other = build_task(config_from_raw(raw), progress=False).model.save_pretrained(tmp_path / "other")
    config = config_from_raw(distill_config("distill-vlm", "vlm", str(other), tiny_shapes, tmp_path / "s"))
    with pytest.raises(ValueError, match="do not share the tokenizer"):
        build_task(config, progress=False)


def test_a_teacher_of_the_wrong_kind_is_refused(tiny_shapes, teachers, tmp_path):
    config = config_from_raw(distill_config("distill-vlm", "vlm", teachers["contrastive"], tiny_shapes, tmp_path / "s"))
    with pytest.raises(Exception, match="needs a vlm model"):
        build_task(config, progress=False)


@pytest.mark.parametrize("options, message", [
    ({"alpha": "high"}, "alpha"),
    ({"temperature": [2]}, "temperature"),
    ({"teachr": "shapes-clip"}, "teachr"),
])
def test_bad_options_are_refused_when_the_config_is_read(tiny_shapes, tmp_path, options, message):
    raw = distill_config("distill-contrastive", "contrastive", "shapes-clip", tiny_shapes, tmp_path / "s", options)
    with pytest.raises(DataFormatError, match=message):
        config_from_raw(raw)


@pytest.mark.parametrize("options, message", [
    ({"teacher": None}, "needs its teacher"),
    ({"alpha": 1.5}, r"alpha: expected a weight in \[0, 1\]"),
    ({"temperature": 0.0}, "temperature: expected a positive number"),
    ({"embedding_weight": -1.0}, "embedding_weight: expected a weight >= 0"),
])
def test_bad_option_values_are_refused_before_any_work(tiny_shapes, teachers, tmp_path, options, message):
    raw = distill_config("distill-contrastive", "contrastive", teachers["contrastive"], tiny_shapes, tmp_path / "s")
    raw["task_options"].update(options)
    with pytest.raises(ValueError, match=message):
        build_task(config_from_raw(raw), progress=False)


def test_a_dual_encoder_student_learns_the_teachers_similarities_and_embeddings(tiny_shapes, teachers, tmp_path):
    config = config_from_raw(distill_config("distill-contrastive", "contrastive", teachers["contrastive"], tiny_shapes,
                                            tmp_path / "s", {"alpha": 1.0, "embedding_weight": 1.0}))
    task = build_task(config, progress=False)
    assert not task.teacher_tokenizes  # the same data and settings: the same tokenizer, the ids are shared
    before, after = kl_before_and_after(task, steps=20)
    assert after < 0.3 * before
    batch = task.make_batch(list(range(8)), random.Random(0))
    with torch.no_grad():
        student, teacher = task.forward(task.model, batch), task.forward(task.teacher, batch)
    cosine = torch.nn.functional.cosine_similarity(student.image_embeds, teacher.image_embeds).mean()
    assert cosine > 0.5  # the student embeds into the teacher's space


def test_a_dual_encoder_teacher_with_its_own_tokenizer_reads_the_same_captions(tiny_shapes, tmp_path):
    model = {**TINY_MODELS["contrastive"], "text": {**TINY_MODELS["contrastive"]["text"], "max_length": 64}}
    raw = {**tiny_config("contrastive", tiny_shapes, tmp_path / "t"), "model": model, "tokenizer": {"min_frequency": 50}}
    other = build_task(config_from_raw(raw), progress=False).model.save_pretrained(tmp_path / "other")
    raw = distill_config("distill-contrastive", "contrastive", str(other), tiny_shapes, tmp_path / "s")
    task = build_task(config_from_raw({**raw, "model": model}), progress=False)
    assert task.teacher_tokenizes
    indices = list(range(6))
    batch = task.make_batch(indices, random.Random(5))
    captions = [task.tokenizer.decode(row.tolist()) for row in batch["ids"]]  # what the student read
    ids, mask = tokenize(task.teacher.tokenizer, captions, 64)
    assert torch.equal(batch["teacher_ids"], ids) and torch.equal(batch["teacher_mask"], mask)  # the teacher read the same
    assert (batch["teacher_ids"] == task.teacher.tokenizer.unk_id).any()  # in its own vocabulary
    assert batch["teacher_ids"].shape[0] == len(indices)
    assert float(task.loss(task.model, batch).detach()) > 0


def test_embedding_regression_needs_the_teachers_embedding_width(tiny_shapes, teachers, tmp_path):
    raw = distill_config("distill-contrastive", "contrastive", teachers["contrastive"], tiny_shapes, tmp_path / "s",
                         {"embedding_weight": 1.0})
    raw["model"] = {**TINY_MODELS["contrastive"], "embed_dim": 16}
    with pytest.raises(ValueError, match="model.embed_dim must be the teacher's 32"):
        build_task(config_from_raw(raw), progress=False)


def test_the_shapes_distill_task_trains_in_the_loop_and_exports_the_student_alone(tiny_shapes, teachers, tmp_path):
    config = distill_config("shapes-distill-contrastive", "shapes-contrastive", teachers["shapes-contrastive"],
                            tiny_shapes, tmp_path / "s", {"embedding_weight": 1.0}, steps=4, eval_every=4)
    config["model"] = {**config["model"], "object_head": {"weight": 1.0}, "vision": {**TINY_MODELS["contrastive"]["vision"],
                                                                                      "width": 16}}
    summary = train(config_from_raw(config), progress=False)
    student, teacher = load(summary["model"]), load(teachers["shapes-contrastive"])
    assert student.model_type == "shapes_clip" and student.config.vision.width == 16
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    assert {"retrieval", "objects"} <= set(summary["final_eval"])  # evaluated as shapes-contrastive is


def test_a_shallower_student_starts_from_evenly_spaced_teacher_blocks(tiny_shapes, teachers, tmp_path):
    teacher = load(teachers["contrastive"])
    deep = {**TINY_MODELS["contrastive"], "text": {**TINY_MODELS["contrastive"]["text"], "depth": 3}}
    raw = {**tiny_config("contrastive", tiny_shapes, tmp_path / "t"), "model": deep}
    three = build_task(config_from_raw(raw), progress=False).model  # a teacher with 3 text blocks
    student = build_task(config_from_raw({**raw, "model": {**deep, "text": {**deep["text"], "depth": 2}}}),
                         progress=False).model
    assert start_from_teacher(student, three) == len(student.state_dict())  # everything has a source
    for mine, theirs in ((0, 0), (1, 2)):  # 2 of 3 blocks: the first and the last
        for (name, a), (_, b) in zip(student.text.blocks[mine].state_dict().items(),
                                     three.text.blocks[theirs].state_dict().items()):
            assert torch.equal(a, b), name
    assert torch.equal(student.vision.stem.state_dict()["layers.0.weight"], three.vision.stem.state_dict()["layers.0.weight"])
    # through the task option, the student's outputs start as the teacher's where nothing was left out
    config = config_from_raw(distill_config("distill-contrastive", "contrastive", teachers["contrastive"], tiny_shapes,
                                            tmp_path / "s", {"init_from_teacher": True}))
    task = build_task(config, progress=False)
    batch = task.make_batch(list(range(4)), random.Random(0))
    with torch.no_grad():
        assert torch.allclose(task.forward(task.model, batch).logits_per_image,
                              task.forward(task.teacher, batch).logits_per_image, atol=1e-5)
    assert sum(p.numel() for p in teacher.parameters()) == sum(p.numel() for p in task.model.parameters())
