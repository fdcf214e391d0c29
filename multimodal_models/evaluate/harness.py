"""Run a model on a benchmark split and score it with the official metrics.

The same functions serve the evaluation inside training and `multimodal evaluate`. A
model takes part through the methods it has:

- `answer_batch(questions, pixels=...)`   VQA (native LM or fusion classifier)
- `caption_batch(pixels=...)`             captioning
- `chat(messages, images=...)`            dialogues, MMMU multiple choice
- `embed_images` / `encode_image`, `embed_texts`  retrieval (dual encoder)

Data that carries more than these records (scene graphs, say) is measured further by evaluation
extras that the caller passes in (`EvaluationExtra`); the Shapes world's are in
multimodal_models/shapes/evaluation.py.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Protocol

import torch
from tqdm import tqdm

from ..data.records import CaptionRecord, ConversationRecord, MultipleChoiceRecord, Turn, VQARecord
from ..models.chat import conversation_to_messages
from ..data.splits import ImageStore, SplitData, image_key
from .metrics.caption import caption_metrics
from .metrics.mmmu import mmmu_scores, refuse_hidden_answers
from .metrics.retrieval import image_to_text_ranks, retrieval_metrics, text_to_image_ranks
from .metrics.vqa import vqa_accuracy


class EvaluationExtra(Protocol):
    """An evaluation beside the general ones. `run` adds what it measures to `results` (and does
    nothing where the split or the model lacks what it needs); `report` gives its report.md lines."""

    def run(self, model, split: SplitData, store: ImageStore, results: dict, *, progress: bool = False) -> None: ...

    def report(self, metrics: dict) -> list[str]: ...


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
        files=split.files,
    )


def iterate_batches(items: list, size: int, desc: str, progress: bool):
    for start in tqdm(range(0, len(items), size), desc=desc, disable=not progress, leave=False):
        yield items[start : start + size]


@torch.no_grad()
def evaluate_vqa(model, records: list[VQARecord], store: ImageStore, *, batch_size: int = 64,
                 progress: bool = False) -> dict:
    predictions: dict = {}
    for batch in iterate_batches(records, batch_size, "vqa", progress):
        pixels = store.batch([store.position(r.image) for r in batch])
        answers = model.answer_batch([r.question for r in batch], pixels=pixels)
        predictions.update({r.question_id: a for r, a in zip(batch, answers)})
    scores = vqa_accuracy(predictions, records)
    scores["predictions"] = predictions
    return scores


@torch.no_grad()
def evaluate_captions(model, records: list[CaptionRecord], store: ImageStore, *, batch_size: int = 64,
                      tokenizer: str = "python", use_meteor: bool | None = False, progress: bool = False) -> dict:
    predictions: dict = {}
    for batch in iterate_batches(records, batch_size, "captions", progress):
        pixels = store.batch([store.position(r.image) for r in batch])
        predictions.update({r.image_id: c for r, c in zip(batch, model.caption_batch(pixels=pixels))})
    references = {r.image_id: list(r.captions) for r in records}
    scores = caption_metrics(predictions, references, tokenizer=tokenizer, use_meteor=use_meteor)
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
    messages = conversation_to_messages(record)
    at = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    return [(template.encode(messages[:k], add_generation_prompt=True).ids, asked, answer)
            for k, (asked, answer) in zip(at, record.exchanges(), strict=True)]


@torch.no_grad()
def evaluate_multiple_choice(model, records: list[MultipleChoiceRecord], *, progress: bool = False) -> dict:
    """MMMU-style items: the options are listed in the prompt, the answer is extracted officially."""
    refuse_hidden_answers(records)  # before the model runs: MMMU's test split cannot be scored
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


def vlm_split_scores(model, split: SplitData, *, store: ImageStore, progress: bool = False,
                     extras: tuple[EvaluationExtra, ...] = ()) -> dict[str, Any]:
    """VQA, captions and dialogues of a split, for a native multimodal LM; then the extras."""
    results: dict[str, Any] = {}
    if split.vqa:
        results["vqa"] = evaluate_vqa(model, split.vqa, store, progress=progress)
    if split.captions:
        results["captions"] = evaluate_captions(model, split.captions, store, progress=progress)
    if split.conversations:
        results["dialogue"] = evaluate_dialogues(model, split.conversations, store, progress=progress)
    for extra in extras:
        extra.run(model, split, store, results, progress=progress)
    return results


def headline(results: dict[str, Any]) -> dict[str, float]:
    """The flat numbers worth a line in a training log."""
    flat: dict[str, float] = {}
    if "vqa" in results:
        flat["vqa"] = results["vqa"]["overall"]
        flat.update({f"vqa/{k}": v for k, v in results["vqa"]["perQuestionType"].items()})
    if "captions" in results:
        flat["cider"] = results["captions"]["CIDEr"]
        if "grounding" in results["captions"]:  # an extra's grounded caption scores (the Shapes world's CaptionClaims)
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
    if "objects" in results:  # an extra's accuracy per attribute (e.g. the Shapes object head's)
        flat.update({f"objects/{k}": v for k, v in results["objects"].items()})
    return flat


@torch.no_grad()
def evaluate_retrieval(model, records: list[CaptionRecord], store: ImageStore, *,
                       ceiling: dict | None = None, batch_size: int = 256, progress: bool = False,
                       reranker=None, rerank_store: ImageStore | None = None) -> dict:
    """Image->text and text->image recall@K over all captions of the split, with the ambiguity ceiling.

    With a reranker (index.rerank.Reranker) also text->image recall@K after it rescored each
    caption's top images ("reranked"); rerank_store holds the images as the reranker preprocesses them."""
    image_embeds = torch.cat([
        model.encode_image(store.batch([store.position(r.image) for r in chunk]).to(model.device))
        for chunk in iterate_batches(records, batch_size, "embed images", progress)
    ])
    texts = [c for r in records for c in r.captions]
    text_to_image = [i for i, r in enumerate(records) for _ in r.captions]
    text_embeds = model.embed_texts(texts)
    similarity = (image_embeds.float() @ text_embeds.float().T).cpu()
    scores = retrieval_metrics(similarity, text_to_image, ks=tuple(range(1, 11)))
    # each query's rank (1-based), for metrics per group of items (evaluate/groups.py); not in metrics.json
    scores["ranks"] = {"text_to_image": text_to_image_ranks(similarity, text_to_image).tolist(),
                       "image_to_text": image_to_text_ranks(similarity, text_to_image).tolist()}
    scores["ceiling"] = ceiling if ceiling is not None else retrieval_ceiling(records)
    scores["num_images"], scores["num_texts"] = len(records), len(texts)
    if reranker is not None:
        if rerank_store is None:
            raise ValueError("reranking needs rerank_store: the images preprocessed for the reranker")
        features = torch.cat([
            reranker.image_features(rerank_store.batch([rerank_store.position(r.image) for r in chunk]))
            for chunk in iterate_batches(records, batch_size, "reranker images", progress)
        ])
        reranked = retrieval_metrics(reranker.rerank_similarity(similarity, texts, features, progress=progress),
                                     text_to_image, ks=tuple(range(1, 11)))
        scores["reranked"] = {"text_to_image": reranked["text_to_image"], "top": reranker.top,
                              "similarity_weight": reranker.similarity_weight}
    return scores


def retrieval_ceiling(records: list[CaptionRecord]) -> dict:
    """The best text->image R@1 any model can expect when several images fit a caption equally well.

    Here a caption fits another image only where that image has an identical caption (an extra that
    knows more, such as scene graphs, decides it better: `retrieval_ceiling_of`). A perfect model can
    rank the images a caption fits in no better than random order, so it expects R@1 = 1 / (#images
    fitting).
    """
    by_text: dict[str, set[int]] = defaultdict(set)
    for i, r in enumerate(records):
        for caption in r.captions:
            by_text[" ".join(caption.lower().split())].add(i)
    fitting = [by_text[" ".join(c.lower().split())] for r in records for c in r.captions]
    return retrieval_ceiling_of(records, fitting, "identical captions")


def retrieval_ceiling_of(records: list[CaptionRecord], fitting: list[set[int]], basis: str) -> dict:
    """The ceiling given, for each caption in order, the images (indices into records) it fits."""
    owners = [i for i, r in enumerate(records) for _ in r.captions]
    expected = [1.0 / len(f | {i}) for i, f in zip(owners, fitting, strict=True)]
    return {"text_to_image_R@1": round(100 * sum(expected) / len(expected), 2) if expected else None, "basis": basis}
