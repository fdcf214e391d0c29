"""What the Shapes world's scene graphs let an evaluation measure beyond the general metrics.

Each is an evaluation extra (`evaluate.harness.EvaluationExtra`): `multimodal evaluate` and the
Shapes training tasks run them beside the general metrics, and each does nothing where the split
has no scene graphs (`SplitFiles.scenes`) or the model lacks what it measures.

- `CaptionClaims`: grounded caption accuracy. Word-overlap metrics cannot tell a fluent wrong
  caption from a right one; here each caption is parsed into the claims it makes (claims.py) and
  every claim is checked against the scene graph: claim precision (true claims / all claims),
  hallucination rate (captions that mention an object not in the scene: CHAIR_s) and object
  hallucination rate (object mentions that match nothing: CHAIR_i), in percent.
- `SceneCeiling`: the retrieval ambiguity ceiling decided from the scene graphs (a caption fits
  every image whose scene makes all its claims true) instead of from identical captions only.
- `ObjectHeadAccuracy`: a ShapesCLIP's object head, per attribute.
- `ReaderGrounding`: where a ShapesVLM's image readers look, against the questions' referents.
- `ParaphraseRobustness`: each VQA question asked again in other words (paraphrases.py): accuracy
  on the paraphrases and the share of answers that change.
- `SceneGroups`: the groups `multimodal evaluate --group-by color|shape|size` puts an item in: the
  attribute values of the objects a question names (its referents), or of a caption's image's objects.
"""

from __future__ import annotations

from collections import defaultdict
from functools import lru_cache
from pathlib import Path

import torch

from ..data import formats
from ..data.records import CaptionRecord, ConversationRecord, VQARecord
from ..data.splits import ImageStore, SplitData
from ..evaluate.harness import answered_turns, iterate_batches, retrieval_ceiling_of
from ..evaluate.metrics.vqa import normalize_answer, single_question_accuracy
from .claims import check_caption, fits, parse_caption
from .grounding import Grounding, matched_tokens, padded_points
from .layout import read_scenes
from .objects import ObjectGrid
from .paraphrases import paraphrases, pick


@lru_cache(maxsize=4)
def _read_scenes(path: str) -> dict:
    return read_scenes(path)


def scenes_of(split: SplitData) -> dict | None:
    """image_id -> Scene of the split's scene graphs, or None where it has none."""
    path = split.files.scenes if split.files is not None else None
    return _read_scenes(str(path)) if path else None


# --- grounded caption accuracy ------------------------------------------------------------------


def grounding_scores(predictions: dict, scenes: dict, *, precision: int = 2) -> dict:
    """predictions {image_id: caption}; scenes {image_id: Scene}."""
    unknown = [i for i in predictions if i not in scenes]
    if unknown:
        raise ValueError(f"{len(unknown)} predicted image ids have no scene graph, e.g. {unknown[:5]}")
    claims_by_kind: dict[str, list[bool]] = defaultdict(list)
    hallucinating_captions = mentions = hallucinated_mentions = without_claims = 0
    for image_id, caption in predictions.items():
        check = check_caption(caption, scenes[image_id])
        for claim in check.claims:
            claims_by_kind[claim.kind].append(claim.holds)
        mentions += check.mentions
        hallucinated_mentions += len(check.hallucinated)
        hallucinating_captions += bool(check.hallucinated)
        without_claims += not check.claims
    all_claims = [h for hs in claims_by_kind.values() for h in hs]

    def pct(numerator: float, denominator: float) -> float | None:
        return round(100 * numerator / denominator, precision) if denominator else None

    return {
        "claim_precision": pct(sum(all_claims), len(all_claims)),
        "hallucination_rate": pct(hallucinating_captions, len(predictions)),
        "object_hallucination_rate": pct(hallucinated_mentions, mentions),
        "perClaimType": {k: {"precision": pct(sum(v), len(v)), "num": len(v)} for k, v in sorted(claims_by_kind.items())},
        "num_captions": len(predictions),
        "num_claims": len(all_claims),
        "captions_without_claims": without_claims,
    }


def score_grounding_files(predictions: str | Path, scenes: str | Path) -> dict:
    """`multimodal score grounding`: a captions predictions file against a scene graphs file."""
    return grounding_scores(formats.read_caption_results(predictions), read_scenes(scenes))


class CaptionClaims:
    """Claim precision and hallucination of the captions, in results["captions"]["grounding"]."""

    def run(self, model, split: SplitData, store: ImageStore, results: dict, *, progress: bool = False) -> None:
        scenes = scenes_of(split)
        if scenes is not None and "captions" in results:
            results["captions"]["grounding"] = grounding_scores(results["captions"]["predictions"], scenes)

    def report(self, metrics: dict) -> list[str]:
        if "grounding" not in metrics.get("captions", {}):
            return []
        g = metrics["captions"]["grounding"]
        return ["## Captions against the scene graphs", "",
                f"Grounded claim precision **{g['claim_precision']}%**, hallucination rate **{g['hallucination_rate']}%** "
                f"(object-level {g['object_hallucination_rate']}%) over {g['num_captions']} captions.", ""]


# --- the retrieval ceiling from scene graphs -------------------------------------------------------


class SceneCeiling:
    """The text->image ambiguity ceiling decided from the scene graphs: a caption fits an image when every
    claim of it holds in the image's scene and, for an inventory ("two red circles and a blue star"), when
    it names all of its objects."""

    def run(self, model, split: SplitData, store: ImageStore, results: dict, *, progress: bool = False) -> None:
        ceiling = scene_ceiling(split) if "retrieval" in results else None
        if ceiling is not None:
            results["retrieval"]["ceiling"] = ceiling

    def report(self, metrics: dict) -> list[str]:
        return []  # the retrieval section states the ceiling and its basis


def scene_ceiling(split: SplitData) -> dict | None:
    """evaluate.harness.retrieval_ceiling with the images a caption fits read off the scene graphs; None
    where the split has none, or they lack some of its images."""
    scenes = scenes_of(split)
    records = split.captions
    if scenes is None or not all(r.image_id in scenes for r in records):
        return None
    scene_list = [scenes[r.image_id] for r in records]
    fitting_images: dict[str, set[int]] = {}
    for r in records:
        for caption in r.captions:
            if caption not in fitting_images:
                parsed = parse_caption(caption)
                fitting_images[caption] = {k for k, scene in enumerate(scene_list) if fits(parsed, scene)}
    return retrieval_ceiling_of(records, [fitting_images[c] for r in records for c in r.captions], "scene graphs")


# --- the object head -------------------------------------------------------------------------------


class ObjectHeadAccuracy:
    """A ShapesCLIP's object head: accuracy per attribute (and objectness) on the split's images, in
    results["objects"]."""

    def run(self, model, split: SplitData, store: ImageStore, results: dict, *, progress: bool = False) -> None:
        scenes = scenes_of(split)
        if getattr(model, "object_head", None) is None or scenes is None or not split.captions:
            return
        results["objects"] = object_accuracy(model, split.captions, store, ObjectGrid.for_model(model, scenes))

    def report(self, metrics: dict) -> list[str]:
        if "objects" not in metrics:
            return []
        return ["## Object head (per-cell attributes from the scene graphs)", "",
                "| " + " | ".join(metrics["objects"]) + " |", "|" + "---|" * len(metrics["objects"]),
                "| " + " | ".join(str(v) for v in metrics["objects"].values()) + " |", ""]


@torch.no_grad()
def object_accuracy(model, records: list[CaptionRecord], store: ImageStore, grid, *, batch_size: int = 256) -> dict:
    """A dual encoder's object head: its accuracy per attribute (and objectness) on these records'
    images, in %; grid: an ObjectGrid of their scene graphs."""
    images = list({r.image_id: r for r in records}.values())
    totals: dict[str, float] = {}
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = store.batch([store.position(r.image) for r in chunk]).to(model.device)
        tokens = model.grid_tokens(model.vision(pixels).tokens)
        for name, value in model.object_head.accuracy(tokens, grid.batch([r.image_id for r in chunk])).items():
            totals[name] = totals.get(name, 0.0) + value * len(chunk)
    return {name: round(100 * value / len(images), 2) for name, value in totals.items()}


# --- where the image readers look ------------------------------------------------------------------


class ReaderGrounding:
    """Where a ShapesVLM's image readers look, in results["reader_grounding"]."""

    def run(self, model, split: SplitData, store: ImageStore, results: dict, *, progress: bool = False) -> None:
        grounding = evaluate_reader_grounding(model, split.vqa, split.conversations, store, progress=progress)
        if grounding is not None:
            results["reader_grounding"] = grounding

    def report(self, metrics: dict) -> list[str]:
        if "reader_grounding" not in metrics:
            return []
        return _reader_grounding_table(metrics["reader_grounding"]["perQuestionType"])


@torch.no_grad()
def evaluate_reader_grounding(model, records: list[VQARecord], conversations: list[ConversationRecord],
                              store: ImageStore, *, batch_size: int = 64, progress: bool = False) -> dict | None:
    """Where a VLM's image readers look, on the questions and dialogue turns annotated with
    referents / evidence: for each form of question and each head that training supervises there
    (`Grounding.targets`: the first look's head i on the i-th description, the last reader's head 0
    on the evidence, ...), "look", the share whose largest logit at the answer position is on one of
    its objects, and for the counting heads "exact", the share where exactly those objects beat the
    head's sink (none, where they are none). None for a model without readers over object tokens.

    Dialogue turns are scored after the gold history, their forms prefixed "dialogue/"."""
    readers = getattr(model, "readers", ())
    if not len(readers) or getattr(model, "objects", None) is None:
        return None
    heads = model.config.image_reader_heads
    counting = frozenset((i, head) for i, reader in enumerate(readers) for head in reader.counting_heads)
    template = model.chat_template()
    items = []  # (image, prompt ids, grounding, form)
    for r in records:
        grounding = Grounding.of(r, r.answer or (r.answers[0] if r.answers else ""))
        if grounding is not None:  # asked as answer_batch asks it
            items.append((r.image, model.user_prompts([r.question])[0], grounding, r.question_type or "vqa"))
    for record in conversations:
        if len(record.images) != 1:
            continue
        for prompt, asked, answer in answered_turns(record, template):
            grounding = Grounding.of(asked, answer.text) if asked is not None else None
            if grounding is not None:
                items.append((record.images[0], prompt, grounding, "dialogue/" + (asked.question_type or "turn")))
    if not items:
        return None
    # each image's features once (an image has a dozen questions and a dialogue)
    positions = sorted({store.position(image) for image, _, _, _ in items})
    row_of = {position: k for k, position in enumerate(positions)}
    image_features = torch.cat([model.image_features(store.batch(positions[k:k + 256]).to(model.device))
                                for k in range(0, len(positions), 256)])
    tally: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0, 0, 0]))
    for batch in iterate_batches(items, batch_size, "reader grounding", progress):
        lengths = [len(ids) for _, ids, _, _ in batch]
        ids = torch.full((len(batch), max(lengths)), getattr(model.tokenizer, "pad_id", None) or 0, dtype=torch.long)
        for b, (_, prompt, _, _) in enumerate(batch):  # padded after the prompt: causal, so it changes nothing
            ids[b, :len(prompt)] = torch.tensor(prompt)
        ids = ids.to(model.device)
        features = image_features[[row_of[store.position(image)] for image, _, _, _ in batch]]
        margins = torch.stack(model(ids, features=features).hook.logits).float()  # (readers, B, H, T, S)
        context, valid, _ = model.image_context(ids, features)
        centres, present = model.objects.places(context)
        present = present & valid
        # every target of the batch at once: (row, reader, head, points, exact, form)
        targets = [(b, reader, head, points, exact, form) for b, (_, _, grounding, form) in enumerate(batch)
                   for reader, head, points, exact in grounding.targets(len(readers), heads, exact=counting)]
        if not targets:
            continue
        rows, readers_of, heads_of = (torch.tensor(column, device=ids.device) for column in list(zip(*targets))[:3])
        points, counts = padded_points([t[3] for t in targets])
        named = matched_tokens(points.to(ids.device), counts.to(ids.device), centres[rows].float(), present[rows])  # (G, S)
        answer_at = torch.tensor(lengths, device=ids.device)[rows] - 1
        row_margins = margins[readers_of, rows, heads_of, answer_at].masked_fill(~present[rows], float("-inf"))
        looked = named.gather(1, row_margins.argmax(-1, keepdim=True))[:, 0]
        exactly = ((row_margins > 0) == named).all(-1)
        for (_, reader, head, _, exact, form), has, hit, all_right in zip(
                targets, named.any(-1).tolist(), looked.tolist(), exactly.tolist()):
            seen = tally[form][f"reader {reader} head {head}"]
            if has:
                seen[0] += hit
                seen[1] += 1
            if exact:
                seen[2] += all_right
                seen[3] += 1
    return {"perQuestionType": {
        form: {target: {"look": _percent(c[0], c[1]), "look_n": c[1], "exact": _percent(c[2], c[3]), "exact_n": c[3]}
               for target, c in sorted(by_head.items())}
        for form, by_head in sorted(tally.items())}}


def _percent(hits: int, n: int) -> float | None:
    return round(100 * hits / n, 2) if n else None


def _reader_grounding_table(per_form: dict) -> list[str]:
    """One row per form of question, one column per supervised head: look % (exact %)."""
    targets = sorted({t for heads in per_form.values() for t in heads})
    lines = ["## Where the image readers look", "",
             "Share of the annotated questions whose head puts its largest logit on an object it is trained "
             "to look at (in brackets, for counting heads: exactly those objects beat the head's sink).", "",
             "| form of question | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    for form, heads in per_form.items():
        cells = []
        for target in targets:
            x = heads.get(target)
            cell = "" if x is None else ("–" if x["look"] is None else f"{x['look']}")
            if x is not None and x["exact"] is not None:
                cell += f" ({x['exact']})"
            cells.append(cell)
        lines.append(f"| {form} | " + " | ".join(cells) + " |")
    return lines + [""]


# --- paraphrased questions ------------------------------------------------------------------------


class ParaphraseRobustness:
    """Each VQA question the Shapes forms parse, asked again in one other generator wording ("seen")
    and in one wording the generator never uses ("new"), picked by `seed` per question; in
    results["paraphrases"]: per kind, accuracy on the originals and on the paraphrases (official VQA
    accuracy), the share of answers that change (normalised as VQA scoring does), and the share of
    paraphrases holding a word the model's tokenizer does not know; per question type too."""

    def __init__(self, seed: int = 0, batch_size: int = 64):
        self.seed = seed
        self.batch_size = batch_size

    def run(self, model, split: SplitData, store: ImageStore, results: dict, *, progress: bool = False) -> None:
        if not hasattr(model, "answer_batch") or "predictions" not in results.get("vqa", {}):
            return
        asked: dict[str, list[tuple[VQARecord, str]]] = {"seen": [], "new": []}
        unparsed = 0
        for record in split.vqa:
            found = paraphrases(record.question, record.question_type)
            if found is None:
                unparsed += 1
                continue
            for kind, options in (("seen", found.seen), ("new", found.new)):
                if options:
                    asked[kind].append((record, pick(options, f"{kind}:{record.question_id}", self.seed)))
        if not asked["new"]:
            return
        original = results["vqa"]["predictions"]
        out: dict = {"seed": self.seed, "unparsed": unparsed, "predictions": {}}
        for kind, items in asked.items():
            if not items:
                continue
            answers = _answer(model, items, store, self.batch_size, progress)
            records = [r for r, _ in items]
            out["predictions"].update({f"{kind}:{r.question_id}": a for r, a in zip(records, answers)})
            out[kind] = _paraphrase_scores(records, [q for _, q in items], answers, original,
                                           results["vqa"]["perQuestion"], getattr(model, "tokenizer", None))
        results["paraphrases"] = out

    def report(self, metrics: dict) -> list[str]:
        if "paraphrases" not in metrics:
            return []
        p = metrics["paraphrases"]
        lines = ["## Question paraphrases (Shapes)", "",
                 "Each question asked again in other words, one paraphrase of each kind per question: **seen**, another "
                 "wording the generator uses (or the two objects swapped with the relation turned round); **new**, a "
                 "wording it never uses. *changed*: the share of answers that differ from the answer to the original.", "",
                 "| wording | questions | accuracy on originals | accuracy on paraphrases | answers changed | "
                 "with unknown words |", "|---|---|---|---|---|---|"]
        for kind in ("seen", "new"):
            if kind in p:
                x = p[kind]
                unknown = "–" if x["unknown_words"] is None else f"{x['unknown_words']}%"
                lines.append(f"| {kind} | {x['num']} | {x['original_accuracy']} | {x['paraphrase_accuracy']} | "
                             f"{x['changed']}% | {unknown} |")
                if x.get("known_words", {}).get("num") and x["unknown_words"]:
                    k = x["known_words"]
                    lines.append(f"| {kind}, known words only | {k['num']} | {k['original_accuracy']} | "
                                 f"{k['paraphrase_accuracy']} | {k['changed']}% | 0% |")
        lines += ["", "| question type | " + " | ".join(f"{k} accuracy | {k} changed" for k in ("seen", "new") if k in p)
                  + " |", "|---|" + "---|---|" * sum(k in p for k in ("seen", "new"))]
        types = sorted({t for k in ("seen", "new") if k in p for t in p[k]["perQuestionType"]})
        for t in types:
            cells = []
            for k in ("seen", "new"):
                if k in p:
                    x = p[k]["perQuestionType"].get(t)
                    cells += [f"{x['paraphrase_accuracy']}", f"{x['changed']}%"] if x else ["–", "–"]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        return lines + [""]


@torch.no_grad()
def _answer(model, items: list[tuple[VQARecord, str]], store: ImageStore, batch_size: int, progress: bool) -> list[str]:
    answers: list[str] = []
    for batch in iterate_batches(items, batch_size, "paraphrases", progress):
        pixels = store.batch([store.position(r.image) for r, _ in batch])
        answers += model.answer_batch([q for _, q in batch], pixels=pixels)
    return answers


def _paraphrase_scores(records: list[VQARecord], questions: list[str], answers: list[str], original: dict,
                       original_accuracy: dict, tokenizer) -> dict:
    per_question = {r.question_id: single_question_accuracy(a, r.answers or (r.answer,)) for r, a in zip(records, answers)}
    changed = {r.question_id: normalize_answer(a) != normalize_answer(original[r.question_id])
               for r, a in zip(records, answers)}
    unknown = [_has_unknown_word(tokenizer, q) for q in questions]
    by_type: dict[str, list[VQARecord]] = defaultdict(list)
    for r in records:
        by_type[r.question_type or "vqa"].append(r)

    def summary(subset: list[VQARecord]) -> dict:
        return {"num": len(subset),
                "original_accuracy": _mean_pct([original_accuracy[r.question_id] / 100 for r in subset]),
                "paraphrase_accuracy": _mean_pct([per_question[r.question_id] for r in subset]),
                "changed": _mean_pct([changed[r.question_id] for r in subset])}

    out = {**summary(records), "unknown_words": _mean_pct([u for u in unknown if u is not None]),
           "perQuestionType": {t: summary(rs) for t, rs in sorted(by_type.items())}}
    if any(u is not None for u in unknown):  # wording apart from vocabulary: the paraphrases of known words only
        out["known_words"] = summary([r for r, u in zip(records, unknown, strict=True) if u is False])
    return out


def _mean_pct(values: list) -> float | None:
    return round(100 * sum(values) / len(values), 2) if values else None


def _has_unknown_word(tokenizer, text: str) -> bool | None:
    unk = getattr(tokenizer, "unk_id", None)
    if unk is None or not hasattr(tokenizer, "encode"):
        return None
    return unk in tokenizer.encode(text)


# --- groups of the objects a question names --------------------------------------------------------


class SceneGroups:
    """`--group-by color|shape|size` on Shapes data: a question is in the group of each value that the
    objects it names (its referents, matched to the scene graph by centre) have; a caption, and a
    retrieval query about its image, in the group of each value among its image's objects."""

    FIELDS = ("color", "shape", "size")

    def run(self, model, split: SplitData, store: ImageStore, results: dict, *, progress: bool = False) -> None:
        return None  # nothing to measure: it only names groups

    def report(self, metrics: dict) -> list[str]:
        return []

    def group_values(self, split: SplitData, field: str) -> dict | None:
        scenes = scenes_of(split)
        if field not in self.FIELDS or scenes is None:
            return None
        out: dict[str, dict] = {}
        if split.vqa:
            values = {}
            for r in split.vqa:
                scene = scenes.get(r.image_id)
                if scene is None:
                    continue
                at = {(round(o.x, 4), round(o.y, 4)): o for o in scene.objects}
                named = [at.get((round(x, 4), round(y, 4))) for points in r.referents for x, y in points]
                values[r.question_id] = tuple(sorted({getattr(o, field) for o in named if o is not None}))
            out["vqa"] = values
        if split.captions:
            out["captions"] = {r.image_id: tuple(sorted({getattr(o, field) for o in scenes[r.image_id].objects}))
                               for r in split.captions if r.image_id in scenes}
        return out


# what `multimodal evaluate` and the Shapes tasks run beside the general metrics
EXTRAS = (CaptionClaims(), SceneCeiling(), ObjectHeadAccuracy(), ReaderGrounding())
