"""`multimodal evaluate`: run a model on a benchmark split, write metrics.json, a Markdown
report and plots (accuracy per question type, recall@K curves, a grid of predictions)."""

from __future__ import annotations

import io
import random
import textwrap
import time
from pathlib import Path
from typing import Any

from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..data.images import load_image
from ..data.splits import DataConfig, ImageStore, load_split
from .harness import (
    EvaluationExtra,
    evaluate_captions,
    evaluate_dialogues,
    evaluate_multiple_choice,
    evaluate_retrieval,
    evaluate_vqa,
    first_images,
)
from .metrics.caption import java_available


def evaluate_model(model, data: str | Path, out: str | Path, *, split: str = "test", limit: int | None = None,
                   progress: bool = True, reranker=None, extras: tuple[EvaluationExtra, ...] = ()) -> dict[str, Any]:
    """Run `model` on every task of the split that it can do, then the extras; write metrics.json,
    report.md and plots to `out`. reranker (index.rerank.Reranker): for a dual encoder, also
    text->image retrieval with a multimodal LM rescoring each caption's top images."""
    out = Path(out)
    split_data = first_images(load_split(DataConfig(root=str(data), eval_split=split), "eval"), limit)
    sources = [r.image for r in split_data.captions] + [r.image for r in split_data.vqa]
    sources += [s for r in split_data.conversations for s in r.images]
    store = ImageStore(sources, model.image_processor, progress=progress, desc="images")
    results: dict[str, Any] = {"model_type": model.model_type, "data": str(data), "split": split}
    start = time.perf_counter()
    if hasattr(model, "answer_batch") and split_data.vqa:
        results["vqa"] = evaluate_vqa(model, split_data.vqa, store, progress=progress)
    if hasattr(model, "caption_batch") and split_data.captions:
        java = java_available()
        results["captions"] = evaluate_captions(model, split_data.captions, store, tokenizer="auto", use_meteor=java,
                                                progress=progress)
    if hasattr(model, "generate_batch") and split_data.conversations:
        results["dialogue"] = evaluate_dialogues(model, split_data.conversations, store, progress=progress)
    if hasattr(model, "chat") and split_data.multiple_choice:
        results["multiple_choice"] = evaluate_multiple_choice(model, split_data.multiple_choice, progress=progress)
    if hasattr(model, "encode_image") and split_data.captions:
        rerank_store = None
        if reranker is not None:
            rerank_store = ImageStore([r.image for r in split_data.captions], reranker.model.image_processor,
                                      progress=progress, desc="reranker images")
        results["retrieval"] = evaluate_retrieval(model, split_data.captions, store, progress=progress,
                                                  reranker=reranker, rerank_store=rerank_store)
    for extra in extras:
        extra.run(model, split_data, store, results, progress=progress)
    results["seconds"] = round(time.perf_counter() - start, 1)
    write_report(results, split_data, store, out, extras)
    return results


def _without_predictions(value):
    if isinstance(value, dict):
        return {k: _without_predictions(v) for k, v in value.items() if k not in ("predictions", "perQuestion", "correct")}
    return value


def write_report(results: dict, split_data, store: ImageStore, out: Path, extras: tuple[EvaluationExtra, ...] = ()) -> None:
    out.mkdir(parents=True, exist_ok=True)
    metrics = _without_predictions(results)
    atomic_write_json(out / "metrics.json", metrics, indent=2)
    predictions = {k: v["predictions"] for k, v in results.items() if isinstance(v, dict) and "predictions" in v}
    if predictions:
        atomic_write_json(out / "predictions.json", {k: {str(i): p for i, p in v.items()} for k, v in predictions.items()})
    plots = []
    if "vqa" in results:
        plots.append(_bar_plot(out / "vqa_per_question_type.png", results["vqa"]["perQuestionType"],
                               "VQA accuracy per question type", "accuracy (%)"))
        plots.append(_prediction_grid(out / "vqa_samples.png", split_data, store, results["vqa"]["predictions"]))
    if "perQuestionType" in results.get("dialogue", {}):
        plots.append(_bar_plot(out / "dialogue_per_question_type.png", results["dialogue"]["perQuestionType"],
                               "Dialogue turn accuracy per form of question", "accuracy (%)"))
    if "captions" in results:
        plots.append(_caption_grid(out / "caption_samples.png", split_data, store, results["captions"]["predictions"]))
    if "retrieval" in results:
        plots.append(_recall_plot(out / "recall_at_k.png", results["retrieval"]))
    atomic_write_text(out / "report.md", markdown_report(metrics, [p.name for p in plots if p], extras))


def markdown_report(metrics: dict, plots: list[str], extras: tuple[EvaluationExtra, ...] = ()) -> str:
    lines = [f"# Evaluation: {metrics['model_type']} on {metrics['data']} ({metrics['split']})", ""]
    if "vqa" in metrics:
        v = metrics["vqa"]
        lines += ["## VQA (official VQA v2 accuracy)", "", f"Overall: **{v['overall']}** on {v['num_questions']} questions", "",
                  "| question type | accuracy |", "|---|---|"]
        lines += [f"| {k} | {a} |" for k, a in sorted(v["perQuestionType"].items())]
        lines += ["", "| answer type | accuracy |", "|---|---|"]
        lines += [f"| {k} | {a} |" for k, a in sorted(v["perAnswerType"].items())]
        lines.append("")
    if "captions" in metrics:
        c = metrics["captions"]
        keys = [k for k in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr") if k in c]
        lines += ["## Captions (coco-caption metrics)", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                  "| " + " | ".join(f"{c[k]:.4f}" for k in keys) + " |", ""]
        lines += [f"- {note}" for note in c.get("notes", [])] + [""]
    if "dialogue" in metrics:
        d = metrics["dialogue"]
        lines += ["## Dialogue", "", f"Turn accuracy **{d['turn_accuracy']}%** over {d['num_turns']} turns "
                  f"({d['num_dialogues']} dialogues); per turn: {d['perTurn']}", ""]
        if "perQuestionType" in d:
            lines += ["| form of question | accuracy | turns |", "|---|---|---|"]
            lines += [f"| {k} | {a} | {d['numPerQuestionType'][k]} |" for k, a in d["perQuestionType"].items()]
            lines.append("")
    if "multiple_choice" in metrics:
        m = metrics["multiple_choice"]
        lines += ["## Multiple choice (MMMU layout, official answer extraction)", "",
                  f"Accuracy {m['overall']['acc']} on {m['overall']['num']} items", ""]
    if "retrieval" in metrics:
        r = metrics["retrieval"]
        lines += ["## Retrieval", "", "| direction | R@1 | R@5 | R@10 | median rank |", "|---|---|---|---|---|"]
        for direction, key in (("text→image", "text_to_image"), ("image→text", "image_to_text")):
            x = r[key]
            lines.append(f"| {direction} | {x['R@1']:.2f} | {x['R@5']:.2f} | {x['R@10']:.2f} | {x['median_rank']} |")
        if "reranked" in r:
            x = r["reranked"]["text_to_image"]
            lines.append(f"| text→image, top {r['reranked']['top']} reranked by the LM | {x['R@1']:.2f} | {x['R@5']:.2f} | "
                         f"{x['R@10']:.2f} | {x['median_rank']} |")
        lines += ["", f"Ambiguity ceiling of text→image R@1: **{r['ceiling']['text_to_image_R@1']}** (the best expected "
                  f"R@1 when several images fit a caption equally well, decided from {r['ceiling']['basis']}).", ""]
    for extra in extras:
        lines += extra.report(metrics)
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bar_plot(path: Path, values: dict[str, float], title: str, ylabel: str) -> Path:
    plt = _pyplot()
    names = sorted(values)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names)), 4))
    bars = ax.bar(names, [values[n] for n in names], color="tab:blue")
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_ylim(0, 105)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=45)
    return _save(fig, path)


def _recall_plot(path: Path, retrieval: dict) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("text_to_image", "text→image"), ("image_to_text", "image→text")):
        ks = sorted(int(k[2:]) for k in retrieval[key] if k.startswith("R@"))
        line = ax.plot(ks, [retrieval[key][f"R@{k}"] for k in ks], marker="o", label=label)[0]
        if key == "text_to_image":
            ax.axhline(retrieval["ceiling"]["text_to_image_R@1"], color=line.get_color(), linestyle="--", alpha=0.6,
                       label="text→image R@1 ceiling")
    if "reranked" in retrieval:
        reranked = retrieval["reranked"]["text_to_image"]
        ks = sorted(int(k[2:]) for k in reranked if k.startswith("R@"))
        ax.plot(ks, [reranked[f"R@{k}"] for k in ks], marker="o",
                label=f"text→image, top {retrieval['reranked']['top']} reranked")
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("cross-modal retrieval")
    return _save(fig, path)


def _prediction_grid(path: Path, split_data, store: ImageStore, predictions: dict, count: int = 12) -> Path:
    plt = _pyplot()
    rng = random.Random(0)
    records = rng.sample(split_data.vqa, min(count, len(split_data.vqa)))
    columns = 4
    rows = (len(records) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, record in zip(axes.flat, records):
        ax.imshow(load_image(record.image), interpolation="nearest")
        predicted = predictions.get(record.question_id, "")
        ok = predicted == record.answer
        ax.set_title("\n".join(textwrap.wrap(record.question, 34)) + f"\n→ {predicted}  (gold: {record.answer})",
                     fontsize=8, color="tab:green" if ok else "tab:red")
    return _save(fig, path)


def _caption_grid(path: Path, split_data, store: ImageStore, predictions: dict, count: int = 8) -> Path:
    plt = _pyplot()
    records = split_data.captions[:count]
    columns = 4
    rows = (len(records) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, record in zip(axes.flat, records):
        ax.imshow(load_image(record.image), interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(predictions.get(record.image_id, ""), 36)), fontsize=8)
    return _save(fig, path)
