"""The object head: grid targets from scene graphs, its loss, and training a dual encoder with it."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from multimodal_models.loading import load
from multimodal_models.models.packed_attention import PADDING
from multimodal_models.shapes.grounding import grounding_loss
from multimodal_models.shapes.object_head import ObjectHead, ObjectHeadConfig, ObjectSlots
from multimodal_models.shapes.objects import SHAPES_ATTRIBUTES, ObjectGrid
from multimodal_models.shapes.world import Scene, ShapeObject
from multimodal_models.training.config import config_from_raw
from multimodal_models.training.loop import train
from multimodal_models.training.vlm_task import next_token_loss, predicted_positions

from .conftest import TINY_MODELS, tiny_config

SCENES = {
    1: Scene((ShapeObject("star", "blue", "large", 0.30, 0.80), ShapeObject("circle", "red", "small", 0.90, 0.10))),
    2: Scene((ShapeObject("square", "white", "small", 0.52, 0.52),)),
}


def test_each_object_is_the_target_of_the_cell_holding_its_centre():
    targets = ObjectGrid(SCENES, grid=4).batch([1, 2])
    assert targets.present.shape == (2, 16) and targets.position.shape == (2, 16, 2) and targets.labels.shape == (2, 16, 3)
    # image 1: the star's centre (0.30, 0.80) is in column 1, row 3; the circle's (0.90, 0.10) in column 3, row 0
    assert targets.present[0].nonzero().flatten().tolist() == [3, 13]
    assert targets.labels[0, 13].tolist() == [SHAPES_ATTRIBUTES["shape"].index("star"),
                                              SHAPES_ATTRIBUTES["color"].index("blue"),
                                              SHAPES_ATTRIBUTES["size"].index("large")]
    assert targets.labels[0, 3].tolist() == [0, 0, 0]  # circle, red, small: the first of each list
    assert torch.allclose(targets.position[0, 13], torch.tensor([0.30, 0.80]))
    assert torch.allclose(targets.position[0, 3], torch.tensor([0.90, 0.10]))
    assert targets.labels[0, 0].tolist() == [-100, -100, -100] and targets.present[0].sum() == 2
    assert targets.present[1].nonzero().flatten().tolist() == [10]


def test_the_larger_object_wins_a_shared_cell_and_bad_annotations_are_named():
    crowded = {7: Scene((ShapeObject("star", "blue", "large", 0.1, 0.1), ShapeObject("circle", "red", "small", 0.15, 0.15)))}
    targets = ObjectGrid(crowded, grid=2).batch([7])
    assert targets.present[0].tolist() == [1, 0, 0, 0]
    assert targets.labels[0, 0, 0] == SHAPES_ATTRIBUTES["shape"].index("star")
    with pytest.raises(ValueError, match="image 3 has no scene graph"):
        ObjectGrid(SCENES, grid=4).batch([3])
    with pytest.raises(ValueError, match="object color 'mauve'"):
        ObjectGrid({5: Scene((ShapeObject("star", "mauve", "large", 0.5, 0.5),))}, grid=4).batch([5])
    with pytest.raises(ValueError, match="needs object annotations"):
        ObjectGrid(None, grid=4)


def test_the_head_learns_the_grid_targets_of_fixed_tokens():
    torch.manual_seed(0)
    targets = ObjectGrid(SCENES, grid=4).batch([1, 2])
    tokens = torch.randn(2, 16, 24)  # distinct random tokens: a linear head can fit any labelling of them
    head = ObjectHead(24, ObjectHeadConfig(attributes=SHAPES_ATTRIBUTES))
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        head.loss(tokens, targets).backward()
        optimizer.step()
    assert head.loss(tokens, targets).item() < 0.25  # about 5 at the start: learned within the step cap, with margin
    assert head.accuracy(tokens, targets) == {"objectness": 1.0, "shape": 1.0, "color": 1.0, "size": 1.0}


def test_a_dual_encoder_trains_with_the_object_head_and_reports_its_accuracy(tiny_shapes, tmp_path):
    raw = tiny_config("shapes-contrastive", tiny_shapes, tmp_path / "run")
    raw["model"] = {**TINY_MODELS["shapes-contrastive"], "object_head": {"weight": 1.0}}
    train(config_from_raw(raw), progress=False)
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    evaluation = [r["eval"] for r in log if "eval" in r][-1]
    assert {"objects/objectness", "objects/shape", "objects/color", "objects/size"} <= set(evaluation)
    model = load(tmp_path / "run/model")
    assert model.config.object_head.attributes == SHAPES_ATTRIBUTES
    assert model.object_head is not None and model.object_head.attributes["color"].out_features == 8


def test_the_object_head_without_scene_graphs_is_refused(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 20, 60)).save(tmp_path / "a.png")
    (tmp_path / "train.jsonl").write_text(json.dumps({"image": "a.png", "caption": "a red picture"}) + "\n")
    raw = {"task": "shapes-contrastive", "data": {"train": {"table": str(tmp_path / "train.jsonl")},
                                                 "eval": {"table": str(tmp_path / "train.jsonl")}},
           "model": {**TINY_MODELS["shapes-contrastive"], "object_head": {}}, "train": {"steps": 1}, "output": str(tmp_path / "run")}
    with pytest.raises(ValueError, match="needs object annotations"):
        train(config_from_raw(raw), progress=False)


def hand_made_head(width: int) -> ObjectHead:
    """A head that reads a token's objectness logit from feature 0 and its centre's (x, y) logits
    from features 1 and 2; its attribute layers are all zero (uniform probabilities)."""
    head = ObjectHead(width, ObjectHeadConfig(attributes={"shape": ["circle", "star"], "color": ["red", "blue", "green"]}))
    for parameter in head.parameters():
        torch.nn.init.zeros_(parameter)
    with torch.no_grad():
        head.objectness.weight[0, 0] = 1.0
        head.position.weight[0, 1] = head.position.weight[1, 2] = 1.0
    return head


def test_object_slots_keep_the_likeliest_cells_left_to_right_with_the_empty_ones_last():
    head = hand_made_head(4)
    slots = ObjectSlots(4, head.config, slots=4)
    slots.head.load_state_dict(head.state_dict())
    assert slots.width == 4 + 3 + 2 + 3
    # six cells: (objectness logit, x logit, y logit, marker); objects in cells 1, 3 and 4, cell 1 the rightmost
    cells = torch.tensor([[-4.0, 0.0, 0.0, 0.0], [5.0, 2.0, 0.0, 1.0], [-6.0, 0.0, 0.0, 2.0],
                          [3.0, -1.0, 1.0, 3.0], [4.0, 0.5, 0.0, 4.0], [-1.0, -3.0, 0.0, 5.0]])
    out = slots(cells[None])
    assert out.shape == (1, 4, 12)
    assert out[0, :, 3].tolist() == [3.0, 4.0, 1.0, 5.0]  # objects by x, then the likeliest empty cell
    assert torch.allclose(out[0, :, 4], torch.sigmoid(torch.tensor([3.0, 4.0, 5.0, -1.0])))
    assert torch.allclose(out[0, :, 5:7], torch.sigmoid(torch.tensor([[-1.0, 1.0], [0.5, 0.0], [2.0, 0.0], [-3.0, 0.0]])))
    assert torch.allclose(out[0, :, 7:9], torch.full((4, 2), 0.5)) and torch.allclose(out[0, :, 9:], torch.full((4, 3), 1 / 3))
    sines = ObjectSlots(4, head.config, slots=4, frequencies=2)
    sines.head.load_state_dict(head.state_dict())
    out2 = sines(cells[None])
    assert sines.width == 12 + 8 and torch.equal(out2[..., :12], out)
    x, y = out[0, :, 5], out[0, :, 6]
    angles = torch.pi * torch.stack([x, 2 * x, y, 2 * y], -1)  # pi * 2^k * (x, y), k < 2
    torch.testing.assert_close(out2[0, :, 12:], torch.cat([angles.sin(), angles.cos()], -1))
    with pytest.raises(ValueError, match="object_slots is 4 but the vision grid has only 3 cells"):
        slots(cells[None, :3])
    with pytest.raises(ValueError, match="object_slots must be at least 1"):
        ObjectSlots(4, head.config, slots=0)


def test_object_slots_merge_the_cells_that_name_one_centre():
    head = hand_made_head(4)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    # an object on a cell border, split 0.4 / 0.2 between two cells that both put it at x = sigmoid(1);
    # a clear object at x = sigmoid(-2); a faint cell elsewhere
    cells = torch.tensor([[logit(0.4), 1.0, 0.0, 0.0], [logit(0.2), 1.01, 0.0, 1.0], [5.0, -2.0, 0.0, 2.0],
                          [logit(0.1), -1.0, 2.0, 3.0], [-8.0, 0.0, -2.0, 4.0]])
    plain = ObjectSlots(4, head.config, slots=3)
    merged = ObjectSlots(4, head.config, slots=3, merge_radius=0.03, presence=0.3)
    for slots in (plain, merged):
        slots.head.load_state_dict(head.state_dict())
    assert plain.places(plain(cells[None]))[1].sum() == 1  # 0.4 < 0.5: the split object is missed
    out = merged(cells[None])
    centres, present = merged.places(out)
    assert present[0].tolist() == [True, True, False]
    assert out[0, :, 3].tolist() == [2.0, 0.0, 3.0]  # the second half of the split object is set aside
    assert out[0, :, 4].tolist() == pytest.approx([torch.sigmoid(torch.tensor(5.0)).item(), 0.6, 0.1], abs=1e-6)
    with pytest.raises(ValueError, match="object_merge_radius must be >= 0 and object_presence in"):
        ObjectSlots(4, head.config, slots=3, presence=1.0)


@pytest.fixture
def object_clip(tiny_shapes, tmp_path):
    """A tiny dual encoder trained with the object head: the tower a VLM starts from."""
    raw = tiny_config("shapes-contrastive", tiny_shapes, tmp_path / "clip")
    raw["model"] = {**TINY_MODELS["shapes-contrastive"], "object_head": {}}
    train(config_from_raw(raw), progress=False)
    return tmp_path / "clip" / "model"


def vlm_from_tower(tiny_shapes, out, tower, model=None, task="shapes-vlm", **options):
    raw = tiny_config(task, tiny_shapes, out)
    raw["model"] = {k: v for k, v in TINY_MODELS[task].items() if k != "vision"}  # the tower's own config
    raw["model"].update(model or {})
    raw["task_options"] = {"vision_from": str(tower), **options}
    train(config_from_raw(raw), progress=False)
    return load(out / "model")


def test_a_vlm_reads_one_token_per_object_through_the_towers_object_head(object_clip, tiny_shapes, tmp_path):
    clip = load(object_clip)
    objects = {"image_tokens": "objects", "object_slots": 6, "pixel_shuffle": 1}
    vlm = vlm_from_tower(tiny_shapes, tmp_path / "vlm", object_clip, objects, freeze_vision=True)
    assert vlm.config.tokens_per_image == 6 and vlm.config.object_head == clip.config.object_head
    head = clip.object_head.state_dict()
    assert all(torch.equal(vlm.objects.head.state_dict()[k], head[k]) for k in head)  # copied, then kept frozen
    image = sorted((tiny_shapes / "images" / "test").iterdir())[0]
    pixels = vlm.image_processor([image])
    assert vlm.image_features(pixels).shape == (1, 6, vlm.objects.width)  # one slot per object, before the projector
    assert vlm.projector(vlm.image_features(pixels)).shape == (1, 6, vlm.config.decoder.width)
    assert isinstance(vlm.ask(image, "how many shapes are there?", max_new_tokens=3), str)

    plain = tmp_path / "plain"
    raw = tiny_config("contrastive", tiny_shapes, plain)
    train(config_from_raw(raw), progress=False)
    with pytest.raises(ValueError, match="needs a vision tower with an object head"):
        vlm_from_tower(tiny_shapes, tmp_path / "refused", plain / "model", objects)
    raw = tiny_config("shapes-vlm", tiny_shapes, tmp_path / "scratch")
    raw["model"] = {**TINY_MODELS["shapes-vlm"], **objects}
    with pytest.raises(ValueError, match="needs a trained object head"):
        train(config_from_raw(raw), progress=False)
    with pytest.raises(ValueError, match="set pixel_shuffle to 1"):
        vlm_from_tower(tiny_shapes, tmp_path / "shuffled", object_clip, {**objects, "pixel_shuffle": 2})
    with pytest.raises(ValueError, match="leave vision_layer unset"):
        vlm_from_tower(tiny_shapes, tmp_path / "layer", object_clip, {**objects, "vision_layer": -2})


def test_a_vlm_starts_from_a_dual_encoders_vision_tower_and_can_keep_it_frozen(object_clip, tiny_shapes, tmp_path):
    """task_options.vision_from (LLaVA's recipe) copies the tower; freeze_vision leaves it untouched."""
    tower = load(object_clip).vision.state_dict()

    def vlm(name: str, **options):  # the general VLM task: a ShapesCLIP's tower is a dual encoder's tower
        return vlm_from_tower(tiny_shapes, tmp_path / name, object_clip, task="vlm", **options).vision.state_dict()

    frozen, tuned = vlm("frozen", freeze_vision=True), vlm("tuned")
    assert all(torch.equal(frozen[k], tower[k]) for k in tower)
    assert not all(torch.equal(tuned[k], tower[k]) for k in tower)
    raw = tiny_config("vlm", tiny_shapes, tmp_path / "scratch")
    raw["task_options"] = {"freeze_vision": True}
    with pytest.raises(ValueError, match="freeze_vision .* needs a trained one"):
        train(config_from_raw(raw), progress=False)


def test_evaluate_reports_the_object_heads_accuracy(tiny_shapes, tmp_path):
    from multimodal_models.cli import main

    raw = tiny_config("shapes-contrastive", tiny_shapes, tmp_path / "run")
    raw["model"] = {**TINY_MODELS["shapes-contrastive"], "object_head": {}}
    train(config_from_raw(raw), progress=False)
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(tmp_path / "run/model"), "--data", str(tiny_shapes), "--out", str(out)]) == 0
    objects = json.loads((out / "metrics.json").read_text())["objects"]
    assert set(objects) == {"objectness", "shape", "color", "size"} and all(0 <= v <= 100 for v in objects.values())
    assert "## Object head" in (out / "report.md").read_text()


def test_which_reader_heads_look_at_which_objects():
    from multimodal_models.shapes.grounding import Grounding

    a, b, e = ((0.1, 0.2),), ((0.5, 0.5), (0.7, 0.1)), ((0.9, 0.9),)
    grounding = Grounding(referents=(a, b), evidence=e)
    # first reader: one head per description; last reader: head 0 the evidence, then the descriptions again
    assert grounding.targets(2, 4) == [(0, 0, a, False), (0, 1, b, False), (1, 0, e, False), (1, 1, a, False),
                                       (1, 2, b, False)]
    assert grounding.targets(3, 2) == [(0, 0, a, False), (0, 1, b, False), (2, 0, e, False), (2, 1, a, False)]
    assert grounding.targets(1, 4) == [(0, 0, a, False), (0, 1, b, False)]
    none_cyan = Grounding(referents=((), b), evidence=None)  # "are there more cyan objects than squares?"
    assert none_cyan.targets(2, 4) == [(0, 1, b, False), (1, 2, b, False)]
    # exact (the heads that count, as (reader, head)): the first look and the evidence also say which
    # objects beat the sink, and an empty description or evidence is a target (nothing should); the
    # second look stays free even where it counts
    counting = {(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)}
    assert grounding.targets(2, 4, exact=counting) == [(0, 0, a, True), (0, 1, b, True), (1, 0, e, True),
                                                       (1, 1, a, False), (1, 2, b, False)]
    assert none_cyan.targets(2, 4, exact=counting) == [(0, 0, (), True), (0, 1, b, True), (1, 2, b, False)]
    # only the heads that count are taught how many: here the first reader's, then head 1 and the evidence
    assert grounding.targets(2, 4, exact={(0, 0), (0, 1)}) == [(0, 0, a, True), (0, 1, b, True), (1, 0, e, False),
                                                               (1, 1, a, False), (1, 2, b, False)]
    assert none_cyan.targets(2, 4, exact={(0, 1), (1, 0)}) == [(0, 1, b, True), (1, 2, b, False)]
    no_others = Grounding(referents=(a,), evidence=())  # "how many other objects are the same color as A?" 0
    assert no_others.targets(2, 4) == [(0, 0, a, False), (1, 1, a, False)]
    assert no_others.targets(2, 4, exact=counting) == [(0, 0, a, True), (1, 0, (), True), (1, 1, a, False)]
    assert no_others.targets(2, 4, exact={(0, 0), (0, 1)}) == [(0, 0, a, True), (1, 1, a, False)]
    # exact_grounding "numbers": the evidence is exact only where the answer counts it
    below = Grounding(referents=(a, b), evidence=a)  # "is A below B?" yes: A bears it out
    assert below.targets(2, 4, exact=counting, counted_evidence_only=True)[2] == (1, 0, a, False)
    assert Grounding((a, b), (), counted=False).targets(2, 4, exact=counting, counted_evidence_only=True) == [
        (0, 0, a, True), (0, 1, b, True), (1, 1, a, False), (1, 2, b, False)]  # a "no": nothing to look at
    assert no_others.counted is False and dataclasses.replace(no_others, counted=True).targets(
        2, 4, exact=counting, counted_evidence_only=True) == [(0, 0, a, True), (1, 0, (), True), (1, 1, a, False)]


def test_groundings_know_whether_their_answer_is_a_count():
    from multimodal_models.data.records import ConversationRecord, Turn, VQARecord
    from multimodal_models.shapes.grounding import Grounding
    from multimodal_models.shapes.tasks import ShapesVLMTask

    a = ((0.1, 0.2),)
    record = VQARecord(question_id="1", image_id="x", image="x.png", question="how many circles?", answer="2", referents=(a + a,),
                       evidence=a + a)
    assert Grounding.of(record, "2").counted and not Grounding.of(record, "yes").counted
    assert Grounding.of(VQARecord(question_id="2", image_id="x", image="x.png", question="what?", answer="red"), "red") is None
    chat = ConversationRecord(id="c", images=("x.png",), turns=(
        Turn("user", "<image>\nis there a circle?", referents=(a,), evidence=a), Turn("assistant", "yes"),
        Turn("user", "how many other objects have the same color as it?", referents=(a,), evidence=()),
        Turn("assistant", "0"), Turn("user", "thanks."), Turn("assistant", "you are welcome.")))
    # each assistant turn's annotation, as the Shapes VLM task packs it (it needs nothing of a built task)
    task = object.__new__(ShapesVLMTask)
    assert task.turn_annotations(chat) == (Grounding((a,), a, counted=False), Grounding((a,), (), counted=True), None)


def test_grounded_questions_supervise_the_image_readers_at_the_answer_position(object_clip, tiny_shapes, tmp_path):
    """Questions whose annotations name their objects train the readers' heads to look at them."""
    import random

    from multimodal_models.training.loop import autocast_context, build_task

    raw = tiny_config("shapes-vlm", tiny_shapes, tmp_path / "grounded")
    raw["model"] = {k: v for k, v in TINY_MODELS["shapes-vlm"].items() if k != "vision"}
    raw["model"].update({"image_tokens": "objects", "object_slots": 6, "pixel_shuffle": 1, "image_reader_blocks": [0, 1],
                         "image_reader_sink": True, "image_reader_counts": [0, [1, 0]],  # the first look, the evidence
                         "image_reader_places": True, "image_reader_relations": True,
                         "image_reader_separations": True})
    raw["task_options"] = {"vision_from": str(object_clip), "freeze_vision": True, "grounding_weight": 0.5,
                           "exact_grounding": True}
    task = build_task(config_from_raw(raw), progress=False)
    heads = task.model.config.image_reader_heads
    assert task.exact_heads == {(0, head) for head in range(heads)} | {(1, 0)}
    batch = task.make_batch(list(range(6)), random.Random(0))
    targets = batch["grounding"]
    assert len(targets) > 6 and set(targets.readers.tolist()) == {0, 1} and set(targets.heads.tolist()) <= {0, 1, 2}
    # exact: the first look and the evidence (reader 1's head 0), never a second look
    assert targets.exact.any() and not targets.exact.all()
    assert ((targets.readers == 0) | (targets.heads == 0))[targets.exact].all()
    assert ((targets.readers == 0) == targets.exact)[targets.readers == 0].all()
    labels, ids = batch["labels"], batch["ids"]
    tokenizer = task.tokenizer
    user = tokenizer.token_to_id("<user>")
    questions = []
    for row, position, head in zip(targets.rows.tolist(), targets.positions.tolist(), targets.heads.tolist()):
        assert labels[row, position] == -100 and labels[row, position + 1] != -100  # predicts the answer's first token
        assert tokenizer.decode(ids[row, position - 1:position].tolist()) == "?"  # right after the question
        turn = max(t for t in range(position) if ids[row, t] == user)
        questions.append(tokenizer.decode(ids[row, turn:position].tolist()))
    assert any(q.endswith(" it?") for q in questions)  # dialogue turns are grounded too, "it" included
    # the tiny tower has hardly learned to find objects: put the targets' objects in its slots (one image per row)
    model = task.model
    assert batch["pixels"] is None  # the frozen tower's features, computed once for the run
    images = [task.store.position(source) for unit in task.units[:6] for source in unit.images]
    with torch.no_grad(), autocast_context(task.config.train.precision, torch.device("cpu")):  # as a step runs it
        torch.testing.assert_close(batch["features"], model.image_features(task.store.batch(images)).float())
    features = batch["features"].clone()
    C = model.config.vision.width  # slot = patch token, objectness, centre, attributes
    features[:, :, C] = 0.0
    for row in range(features.shape[0]):
        chosen = targets.rows == row
        points = {tuple(p) for p, n in zip(targets.points[chosen].tolist(), targets.counts[chosen].tolist()) for p in p[:n]}
        for slot, point in enumerate(sorted(points)):
            features[row, slot, C:C + 3] = torch.tensor([1.0, *point])
    batch["features"] = features
    labels = batch["labels"]
    wanted, next_tokens = predicted_positions(labels)

    def run(segments=None, targets_only=False, grounding=targets):
        """The model's pass, its next-token loss and its readers' grounding loss, as ShapesVLMTask.loss adds them."""
        out = model(batch["ids"], features=features, mask=batch["mask"], positions=batch["positions"],
                    segments=segments, predict_at=wanted if targets_only else None)
        centres, present = model.object_places(out.hook)
        return (out, next_token_loss(out.logits, labels, next_tokens, targets_only=targets_only),
                grounding_loss(out.hook.logits, centres, present, grounding))

    _, out_loss, out_grounding = run()
    assert out_grounding > 0
    torch.testing.assert_close(task.loss(model, batch), out_loss + 0.5 * out_grounding)
    # packed as the task runs it (the readers on the real positions only): what the dense mask gives
    # and with the logits only where a next token is trained on (a reader follows the last block here)
    results = []
    for segments, targets_only in ((None, False), (batch["segments"], False), (batch["segments"], True)):
        model.zero_grad()
        passed, loss, ground = run(segments, targets_only)
        (loss + ground).backward()
        results.append((passed, loss.detach(), ground.detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (dense, dense_loss, dense_grounding, dense_grads) = results[0]
    real = batch["segments"] != PADDING
    assert model.config.image_reader_blocks[-1] == model.decoder.config.depth - 1
    for packed, packed_loss, packed_grounding, packed_grads in results[1:]:
        torch.testing.assert_close(packed_grounding, dense_grounding)
        torch.testing.assert_close(packed_loss, dense_loss)
        packed_logits = packed.logits if packed.logits.dim() == 2 else packed.logits.flatten(0, 1)[wanted]
        torch.testing.assert_close(packed_logits, dense.logits.flatten(0, 1)[wanted])
        for read, dense_read in zip(packed.hook.logits, dense.hook.logits, strict=True):
            torch.testing.assert_close(read.transpose(1, 2)[real], dense_read.transpose(1, 2)[real])
        assert dense_grads.keys() == packed_grads.keys() and any(n.startswith("readers.1.relate") for n in dense_grads)
        for name in dense_grads:
            torch.testing.assert_close(packed_grads[name], dense_grads[name], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[1][0].logits[real], dense.logits[real])
    model.zero_grad()
    inexact = run(grounding=dataclasses.replace(targets, exact=None))[2]
    assert 0 < inexact < out_grounding  # the sink's cross-entropy comes on top
    out_grounding.backward(retain_graph=True)  # the second reader's relations to the first one's findings are trained
    assert model.readers[0].relate is None and model.readers[1].relate.weight.grad.abs().sum() > 0
    out_loss.backward()  # and the separations it hands on, by the answers' loss
    assert model.readers[0].separation is None and model.readers[1].separation.weight.grad.abs().sum() > 0
    train(config_from_raw(raw), progress=False)
    vlm = load(tmp_path / "grounded" / "model")
    assert vlm.config.image_reader_blocks == (0, 1) and len(vlm.readers) == 2
    assert all(r.sink is not None and r.place is not None for r in vlm.readers)
    assert vlm.readers[1].relations == heads and vlm.readers[1].attribute_sizes == vlm.objects.attribute_sizes
    assert vlm.readers[0].separation is None and vlm.readers[1].separation is not None
    assert [r.counting_heads for r in vlm.readers] == [tuple(range(heads)), (0,)]  # read back from config.json
    image = sorted((tiny_shapes / "images" / "val").glob("*.png"))[0]
    question = "what color is the object closest to the circle?"
    cached = vlm.ask(image, question, max_new_tokens=5, num_beams=2)
    assert cached == vlm.ask(image, question, max_new_tokens=5, num_beams=2, use_cache=False)


def test_evaluate_tells_where_each_supervised_reader_head_looks(object_clip, tiny_shapes, tmp_path):
    """For each form of question and each head its grounding supervises: whether the head's largest
    logit is on a named object, and for counting heads whether exactly the named ones beat the sink."""
    from multimodal_models.data.records import ConversationRecord, Turn, VQARecord
    from multimodal_models.data.splits import ImageStore
    from multimodal_models.evaluate.report import markdown_report
    from multimodal_models.shapes.evaluation import EXTRAS, evaluate_reader_grounding
    from multimodal_models.training.loop import build_task

    raw = tiny_config("shapes-vlm", tiny_shapes, tmp_path / "probe")
    raw["model"] = {k: v for k, v in TINY_MODELS["shapes-vlm"].items() if k != "vision"}
    raw["model"].update({"image_tokens": "objects", "object_slots": 6, "pixel_shuffle": 1, "image_reader_blocks": [0, 1],
                         "image_reader_sink": True, "image_reader_counts": [0, [1, 0]], "image_reader_places": True})
    raw["task_options"] = {"vision_from": str(object_clip), "freeze_vision": True}
    model = build_task(config_from_raw(raw), progress=False).model.eval()
    image = sorted((tiny_shapes / "images" / "val").glob("*.png"))[0]
    store = ImageStore([image], model.image_processor, progress=False)
    # the tower sees two objects, token 0 at P and token 1 at Q; every head's margin is +2 on P, -1 on Q
    P, Q = (0.2, 0.2), (0.7, 0.7)
    features = model.image_features(store.batch([0])).detach()
    C = model.config.vision.width
    features[:, :, C] = 0.0
    features[:, 0, C:C + 3] = torch.tensor([1.0, *P])
    features[:, 1, C:C + 3] = torch.tensor([1.0, *Q])
    model.image_features = lambda pixels: features.expand(len(pixels), -1, -1)
    real_forward = model.forward

    def forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        margins = torch.full_like(out.hook.logits[0], float("-inf"))
        margins[..., 0], margins[..., 1] = 2.0, -1.0
        out.hook.logits = [margins, margins]
        return out

    model.forward = forward
    vqa = [VQARecord(1, 1, image, "is the red circle above the blue star?", answer="yes", question_type="spatial",
                     referents=((P,), (Q,)), evidence=(P,)),
           VQARecord(2, 1, image, "how many cyan stars are there?", answer="0", question_type="count",
                     referents=((),), evidence=()),
           VQARecord(3, 1, image, "what color is the star?", answer="blue", question_type="query_color")]  # not grounded
    chat = ConversationRecord("c", (image,), (
        Turn("user", "<image>\nis there a blue star?", referents=((Q,),), evidence=(Q,), question_type="exist"),
        Turn("assistant", "yes"),
        Turn("user", "is it above the circle?", referents=((Q,), (P,)), evidence=(), question_type="spatial_it"),
        Turn("assistant", "no")))
    found = evaluate_reader_grounding(model, vqa, [chat], store)["perQuestionType"]

    def look(hit, exact=None):
        return {"look": hit, "look_n": 0 if hit is None else 1, "exact": exact, "exact_n": 0 if exact is None else 1}

    assert found == {
        # the count's description names nothing: no head to look with, and P wrongly beats the sinks
        "count": {"reader 0 head 0": look(None, 0.0), "reader 1 head 0": look(None, 0.0)},
        "spatial": {"reader 0 head 0": look(100.0, 100.0), "reader 0 head 1": look(0.0, 0.0),
                    "reader 1 head 0": look(100.0, 100.0), "reader 1 head 1": look(100.0), "reader 1 head 2": look(0.0)},
        "dialogue/exist": {"reader 0 head 0": look(0.0, 0.0), "reader 1 head 0": look(0.0, 0.0),
                           "reader 1 head 1": look(0.0)},
        "dialogue/spatial_it": {"reader 0 head 0": look(0.0, 0.0), "reader 0 head 1": look(100.0, 100.0),
                                "reader 1 head 0": look(None, 0.0), "reader 1 head 1": look(0.0),
                                "reader 1 head 2": look(100.0)},
    }
    report = markdown_report({"model_type": "shapes_vlm", "data": "d", "split": "val",
                              "reader_grounding": {"perQuestionType": found}}, [], EXTRAS).splitlines()
    assert "| form of question | reader 0 head 0 | reader 0 head 1 | reader 1 head 0 | reader 1 head 1 | reader 1 head 2 |" in report
    assert "| spatial | 100.0 (100.0) | 0.0 (0.0) | 100.0 (100.0) | 100.0 | 0.0 |" in report
    assert "| count | – (0.0) |  | – (0.0) |  |  |" in report
    model.forward = real_forward
    assert evaluate_reader_grounding(model, [], [], store) is None  # nothing annotated


def test_readers_without_grounded_questions_are_warned_about(object_clip, tiny_shapes, tmp_path):
    import shutil

    data = tmp_path / "ungrounded"
    shutil.copytree(tiny_shapes, data)
    for path in list((data / "vqa").glob("*annotations.json")) + list((data / "dialogues").glob("*.json")):
        text = json.loads(path.read_text())
        for entry in text["annotations"] if isinstance(text, dict) else [m for c in text for m in c["conversations"]]:
            entry.pop("referents", None)
            entry.pop("evidence", None)
        path.write_text(json.dumps(text))
    raw = tiny_config("shapes-vlm", data, tmp_path / "out")
    raw["model"] = {k: v for k, v in TINY_MODELS["shapes-vlm"].items() if k != "vision"}
    raw["model"].update({"image_tokens": "objects", "object_slots": 6, "pixel_shuffle": 1, "image_reader_blocks": [1]})
    raw["task_options"] = {"vision_from": str(object_clip), "freeze_vision": True}
    from multimodal_models.training.loop import build_task

    with pytest.warns(UserWarning, match="no training question carries referents"):
        build_task(config_from_raw(raw), progress=False)
    raw["task_options"]["exact_grounding"] = True  # without a sink there is nothing to beat
    with pytest.raises(ValueError, match="exact_grounding .* needs model.image_reader_sink and image_reader_counts"):
        build_task(config_from_raw(raw), progress=False)
    raw["task_options"]["exact_grounding"] = "sometimes"
    with pytest.raises(ValueError, match="task_options.exact_grounding: expected true, false or 'numbers', got 'sometimes'"):
        build_task(config_from_raw(raw), progress=False)


def test_the_object_head_trains_under_torchrun(tiny_shapes, tmp_path):
    """Two processes: the object head is reached inside DistributedDataParallel, and both losses are gathered."""
    import os
    import subprocess
    import sys

    import yaml

    from .test_gathered_loss import free_port

    raw = tiny_config("shapes-contrastive", tiny_shapes, tmp_path / "run", steps=2, eval_every=2, log_every=1)
    raw["model"] = {**TINY_MODELS["shapes-contrastive"], "object_head": {"weight": 1.0}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "-m",
         "multimodal_models.cli", "train", str(tmp_path / "config.yaml"), "--quiet"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    assert load(tmp_path / "run/model").config.object_head is not None
