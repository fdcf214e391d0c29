"""Run a model on a benchmark split and score it with the official metrics.

The same functions serve the evaluation inside training and `multimodal evaluate`. A
model takes part through the methods it has:

- `answer_batch(questions, pixels=...)`   VQA (native LM or fusion classifier)
- `caption_batch(pixels=...)`             captioning
- `chat(messages, images=...)`            dialogues, MMMU multiple choice
- `embed_images` / `encode_image`, `embed_texts`  retrieval (dual encoder)
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from tqdm import tqdm

from ..data.records import CaptionRecord, ConversationRecord, MultipleChoiceRecord, Turn, VQARecord
from ..data.splits import ImageStore, SplitData, image_key
from .metrics.vqa import vqa_accuracy


def first_images(split: SplitData, limit: int | None) -> SplitData:
    """The part of a split about its first `limit` images (all of it when limit is falsy)."""
    if not limit:
        return split
    order: list[str] = []
    for source in [r.image for r in split.captions] + [r.image for r in split.vqa] + [
        s for r in split.conversations for s in r.images
    ]:
        key = image_key(source)
        if key not in order:
            order.append(key)
            if len(order) == limit:
                break
    keep = set(order)
    return SplitData(
        name=split.name,
        captions=[r for r in split.captions if image_key(r.image) in keep],
        vqa=[r for r in split.vqa if image_key(r.image) in keep],
        conversations=[r for r in split.conversations if r.images and all(image_key(s) in keep for s in r.images)],
        multiple_choice=split.multiple_choice[: 2 * limit],
        scenes=split.scenes,
    )


def _batches(items: list, size: int, desc: str, progress: bool):
    for start in tqdm(range(0, len(items), size), desc=desc, disable=not progress, leave=False):
        yield items[start : start + size]


@torch.no_grad()
def evaluate_vqa(model, records: list[VQARecord], store: ImageStore, *, batch_size: int = 64,
                 progress: bool = False) -> dict:
    predictions: dict = {}
    for batch in _batches(records, batch_size, "vqa", progress):
        pixels = store.batch([store.position(r.image) for r in batch])
        answers = model.answer_batch([r.question for r in batch], pixels=pixels)
        predictions.update({r.question_id: a for r, a in zip(batch, answers)})
    scores = vqa_accuracy(predictions, records)
    scores["predictions"] = predictions
    return scores


@torch.no_grad()
def evaluate_captions(model, records: list[CaptionRecord], store: ImageStore, *, scenes: dict | None = None,
                      batch_size: int = 64, tokenizer: str = "python", use_meteor: bool | None = False,
                      progress: bool = False) -> dict:
    from .metrics.caption import caption_metrics

    predictions: dict = {}
    for batch in _batches(records, batch_size, "captions", progress):
        pixels = store.batch([store.position(r.image) for r in batch])
        predictions.update({r.image_id: c for r, c in zip(batch, model.caption_batch(pixels=pixels))})
    references = {r.image_id: list(r.captions) for r in records}
    scores = caption_metrics(predictions, references, tokenizer=tokenizer, use_meteor=use_meteor)
    if scenes is not None:
        from .metrics.grounding import grounding_scores

        scores["grounding"] = grounding_scores(predictions, scenes)
    scores["predictions"] = predictions
    return scores


@torch.no_grad()
def evaluate_dialogues(model, conversations: list[ConversationRecord], store: ImageStore, *,
                       progress: bool = False) -> dict:
    """Turn accuracy: each assistant turn generated after the gold history, compared exactly; per
    turn number, and per form of question where the user turns carry a question_type.

    All turns that share a position in their dialogues are answered in one batch."""
    prompts, pixels_of, gold, turn_number, forms = [], [], [], [], []
    template = model.chat_template()
    for record in conversations:
        for number, (prompt, asked, answer) in enumerate(answered_turns(record, template), start=1):
            prompts.append(prompt)
            pixels_of.append([store.position(s) for s in record.images])
            gold.append(answer.text.strip())
            turn_number.append(number)
            forms.append(asked.question_type if asked else None)
    predictions = []
    for start in tqdm(range(0, len(prompts), 64), desc="dialogues", disable=not progress, leave=False):
        rows = range(start, min(start + 64, len(prompts)))
        positions = [p for r in rows for p in pixels_of[r]]
        features = model.image_features(store.batch(positions)) if positions else None
        outputs = model.generate_batch([prompts[r] for r in rows], features, max_new_tokens=16)
        predictions += [model.tokenizer.decode(o).strip() for o in outputs]
    by_turn: dict[int, list[bool]] = defaultdict(list)
    by_form: dict[str, list[bool]] = defaultdict(list)
    for number, form, prediction, answer in zip(turn_number, forms, predictions, gold, strict=True):
        by_turn[number].append(prediction == answer)
        if form is not None:
            by_form[form].append(prediction == answer)
    hits = [h for hs in by_turn.values() for h in hs]
    scores = {
        "turn_accuracy": round(100 * sum(hits) / len(hits), 2) if hits else None,
        "perTurn": {str(k): round(100 * sum(v) / len(v), 2) for k, v in sorted(by_turn.items())},
        "num_turns": len(hits),
        "num_dialogues": len(conversations),
    }
    if by_form:
        scores["perQuestionType"] = {k: round(100 * sum(v) / len(v), 2) for k, v in sorted(by_form.items())}
        scores["numPerQuestionType"] = {k: len(v) for k, v in sorted(by_form.items())}
    return scores


def answered_turns(record: ConversationRecord, template) -> list[tuple[list[int], Turn | None, Turn]]:
    """Each assistant turn of a conversation with the prompt that asks for it after the gold history
    (the chat template's ids) and the user turn it answers (None where none came just before)."""
    from ..models.chat import conversation_to_messages

    messages = conversation_to_messages(record)
    at = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    return [(template.encode(messages[:k], add_generation_prompt=True).ids, asked, answer)
            for k, (asked, answer) in zip(at, record.exchanges(), strict=True)]


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
    from ..models.image_reader import matched_tokens, padded_points
    from ..training.vlm_task import Grounding

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
    for batch in _batches(items, batch_size, "reader grounding", progress):
        lengths = [len(ids) for _, ids, _, _ in batch]
        ids = torch.full((len(batch), max(lengths)), getattr(model.tokenizer, "pad_id", None) or 0, dtype=torch.long)
        for b, (_, prompt, _, _) in enumerate(batch):  # padded after the prompt: causal, so it changes nothing
            ids[b, :len(prompt)] = torch.tensor(prompt)
        ids = ids.to(model.device)
        features = image_features[[row_of[store.position(image)] for image, _, _, _ in batch]]
        margins = torch.stack(model(ids, features=features).reader_logits).float()  # (readers, B, H, T, S)
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


@torch.no_grad()
def evaluate_multiple_choice(model, records: list[MultipleChoiceRecord], *, progress: bool = False) -> dict:
    """MMMU-style items: the options are listed in the prompt, the answer is extracted officially."""
    from .metrics.mmmu import mmmu_scores

    responses = {}
    for record in tqdm(records, desc="multiple choice", disable=not progress, leave=False):
        question = record.question
        for k in range(1, len(record.images) + 1):
            question = question.replace(f"<image {k}>", "").strip()
        options = " ".join(f"({chr(65 + i)}) {option}" for i, option in enumerate(record.options))
        content = [{"type": "image", "image": image} for image in record.images]
        content.append({"type": "text", "text": f"{question} {options}"})
        responses[record.id] = model.chat([{"role": "user", "content": content}], max_new_tokens=16)
    scores = mmmu_scores(responses, records)
    return scores


def vlm_split_scores(model, split: SplitData, *, store: ImageStore, progress: bool = False) -> dict[str, Any]:
    """VQA, captions and dialogues of a split, for a native multimodal LM."""
    results: dict[str, Any] = {}
    if split.vqa:
        results["vqa"] = evaluate_vqa(model, split.vqa, store, progress=progress)
    if split.captions:
        results["captions"] = evaluate_captions(model, split.captions, store, scenes=split.scenes, progress=progress)
    if split.conversations:
        results["dialogue"] = evaluate_dialogues(model, split.conversations, store, progress=progress)
    return results


def headline(results: dict[str, Any]) -> dict[str, float]:
    """The flat numbers worth a line in a training log."""
    flat: dict[str, float] = {}
    if "vqa" in results:
        flat["vqa"] = results["vqa"]["overall"]
        flat.update({f"vqa/{k}": v for k, v in results["vqa"]["perQuestionType"].items()})
    if "captions" in results:
        flat["cider"] = results["captions"]["CIDEr"]
        if "grounding" in results["captions"]:
            flat["claim_precision"] = results["captions"]["grounding"]["claim_precision"]
            flat["hallucination"] = results["captions"]["grounding"]["hallucination_rate"]
    if "dialogue" in results:
        flat["dialogue"] = results["dialogue"]["turn_accuracy"]
        flat.update({f"dialogue/{k}": v for k, v in results["dialogue"].get("perQuestionType", {}).items()})
    if "retrieval" in results:
        flat["t2i_R@1"] = results["retrieval"]["text_to_image"]["R@1"]
        flat["t2i_ceiling"] = results["retrieval"]["ceiling"]["text_to_image_R@1"]
        flat["i2t_R@1"] = results["retrieval"]["image_to_text"]["R@1"]
        if "reranked" in results["retrieval"]:
            flat["t2i_R@1_reranked"] = results["retrieval"]["reranked"]["text_to_image"]["R@1"]
    if "objects" in results:  # the object head's accuracy (dual encoders trained with one)
        flat.update({f"objects/{k}": v for k, v in results["objects"].items()})
    return flat


@torch.no_grad()
def evaluate_retrieval(model, records: list[CaptionRecord], store: ImageStore, *, scenes: dict | None = None,
                       ceiling: dict | None = None, batch_size: int = 256, progress: bool = False,
                       reranker=None, rerank_store: ImageStore | None = None) -> dict:
    """Image->text and text->image recall@K over all captions of the split, with the ambiguity ceiling.

    With a reranker (index.rerank.Reranker) also text->image recall@K after it rescored each
    caption's top images ("reranked"); rerank_store holds the images as the reranker preprocesses them."""
    from .metrics.retrieval import retrieval_metrics

    image_embeds = torch.cat([
        model.encode_image(store.batch([store.position(r.image) for r in chunk]).to(model.device))
        for chunk in _batches(records, batch_size, "embed images", progress)
    ])
    texts = [c for r in records for c in r.captions]
    text_to_image = [i for i, r in enumerate(records) for _ in r.captions]
    text_embeds = model.embed_texts(texts)
    similarity = (image_embeds.float() @ text_embeds.float().T).cpu()
    scores = retrieval_metrics(similarity, text_to_image, ks=tuple(range(1, 11)))
    scores["ceiling"] = ceiling if ceiling is not None else retrieval_ceiling(records, scenes)
    scores["num_images"], scores["num_texts"] = len(records), len(texts)
    if reranker is not None:
        if rerank_store is None:
            raise ValueError("reranking needs rerank_store: the images preprocessed for the reranker")
        features = torch.cat([
            reranker.image_features(rerank_store.batch([rerank_store.position(r.image) for r in chunk]))
            for chunk in _batches(records, batch_size, "reranker images", progress)
        ])
        reranked = retrieval_metrics(reranker.rerank_similarity(similarity, texts, features, progress=progress),
                                     text_to_image, ks=tuple(range(1, 11)))
        scores["reranked"] = {"text_to_image": reranked["text_to_image"], "top": reranker.top,
                              "similarity_weight": reranker.similarity_weight}
    return scores


@torch.no_grad()
def object_accuracy(model, records: list[CaptionRecord], store: ImageStore, grid, *, batch_size: int = 256) -> dict:
    """A dual encoder's object head: its accuracy per attribute (and objectness) on these records'
    images, in %; grid: a training.objects.ObjectGrid of their scene graphs."""
    images = list({r.image_id: r for r in records}.values())
    totals: dict[str, float] = {}
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = store.batch([store.position(r.image) for r in chunk]).to(model.device)
        tokens = model.grid_tokens(model.vision(pixels).tokens)
        for name, value in model.object_head.accuracy(tokens, grid.batch([r.image_id for r in chunk])).items():
            totals[name] = totals.get(name, 0.0) + value * len(chunk)
    return {name: round(100 * value / len(images), 2) for name, value in totals.items()}


def retrieval_ceiling(records: list[CaptionRecord], scenes: dict | None = None) -> dict:
    """The best text->image R@1 any model can expect when several images fit a caption equally well.

    A caption "fits" an image when it describes it correctly: on Shapes this is decided from
    the scene graphs (grounding.fits: every claim holds, and an inventory names every object);
    elsewhere only an identical caption of another image counts. A perfect model can rank the
    images a caption fits in no better than random order, so it expects R@1 = 1 / (#images fitting).
    (It is a ceiling for models that read captions for what they say; one that also learns how
    often the generator picks each relation or extreme of a scene could edge past it.)
    """
    texts = [(i, c) for i, r in enumerate(records) for c in r.captions]
    if scenes is not None and all(r.image_id in scenes for r in records):
        from ..data.shapes.grounding import fits, parse_caption

        scene_list = [scenes[r.image_id] for r in records]
        fitting_images: dict[str, set[int]] = {}
        for _, caption in texts:
            if caption not in fitting_images:
                parsed = parse_caption(caption)
                fitting_images[caption] = {k for k, scene in enumerate(scene_list) if fits(parsed, scene)}
        fitting = [fitting_images[c] for _, c in texts]
        basis = "scene graphs"
    else:
        by_text: dict[str, set[int]] = defaultdict(set)
        for i, caption in texts:
            by_text[" ".join(caption.lower().split())].add(i)
        fitting = [by_text[" ".join(c.lower().split())] for _, c in texts]
        basis = "identical captions"
    expected = [1.0 / len(f | {i}) for (i, _), f in zip(texts, fitting)]
    return {"text_to_image_R@1": round(100 * sum(expected) / len(expected), 2) if expected else None, "basis": basis}
