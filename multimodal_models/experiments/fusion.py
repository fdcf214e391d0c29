"""The fusion experiment: which way of combining image and question learns to answer, and on what.

Every model answers the same VQA questions, trained with the same loop, the same data (the
training split's questions only: no captions or dialogues for the native LM either), the same
number of optimizer steps and the same images per step, each image with all of its questions
(the classifiers encode it once for them; the native LM packs them into one sequence). The
classifiers share one small CNN encoder, one question encoder and the tokens' coordinates; only
the fusion differs:

- early: one transformer over the question's and the image's tokens (ViLT);
- middle: question tokens cross-attend to the image's (ALBEF / Flamingo style);
- late: the pooled image and the pooled question meet only at the answer (gated);
- FiLM: the question scales and shifts the channels of conv blocks over the image (Perez et al. 2018);
- relation: an MLP over every pair of image tokens with the question (Santoro et al. 2017);
- native LM: a decoder reads the image's tokens before the question (LLaVA / nanoVLM recipe).

Each is scored with the official VQA accuracy per question type on the test split and on the
compositional split (colour-shape pairs never seen in training), beside the blind baseline
(answers from the question alone), with its parameter count, training time and per-question
inference latency.
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.splits import ImageStore, load_split
from ..io import atomic_write_figure, atomic_write_json, atomic_write_text
from ..loading import load
from ..models.layers import count_parameters
from ..shapes.baselines import blind_scores
from ..training.config import DataConfig, OptimConfig, RunConfig
from ..training.loop import train
from .questions import scored_questions, split_questions, vqa_scores

CNN = {"image_size": 64, "channels": [32, 64, 64, 64, 64], "strides": [1, 2, 2, 2, 1]}
VISION = {"image_size": 64, "patch_size": 8, "width": 128, "depth": 3, "heads": 4, "stem": "conv", "pool": "mean",
          "class_token": False}  # the native LM's encoder: a ViT, as LLaVA's
TEXT = {"max_length": 32, "width": 128, "depth": 2, "heads": 4, "causal": False, "pool": "mean"}


def _classifier(fusion: dict) -> tuple[str, dict]:
    return "vqa", {"encoder": "cnn", "cnn": CNN, "text": TEXT, "fusion": {**fusion, "coordinates": True}}


MODELS = {
    "early fusion": _classifier({"kind": "early", "width": 128, "depth": 3, "heads": 4}),
    "middle fusion": _classifier({"kind": "middle", "width": 128, "depth": 3, "heads": 4}),
    "late fusion": _classifier({"kind": "late", "width": 256, "late_mode": "gated"}),
    "FiLM": _classifier({"kind": "film", "width": 64, "depth": 4}),
    # pairs of the 4 x 4 grid pooled from the 8 x 8 one: 256 pairs per question (64 x 64 would be 4,096)
    "relation": _classifier({"kind": "relation", "width": 128, "depth": 3, "token_pool": 2}),
    "native LM": ("vlm", {"vision": VISION, "decoder": {"width": 128, "depth": 5, "heads": 4, "max_length": 96},
                          "pixel_shuffle": 2}),
}


def run_fusion_experiment(data: str | Path, out: str | Path, *, steps: int = 300, batch_size: int = 32,
                          lr: float = 2e-3, eval_samples: int = 300, models: list[str] | None = None,
                          progress: bool = True) -> dict:
    """Train and score each model of MODELS (or those named) for `steps` steps of `batch_size` images;
    results.json is written after each, and a model whose row is there is not trained again."""
    data, out = str(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = models or list(MODELS)
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown models {unknown}; the experiment has {list(MODELS)}")
    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "eval_samples": eval_samples}
    rows = _finished_rows(out / "results.json", settings)  # every model's, those not named this time too
    for name in tqdm(names, desc="fusion experiment", disable=not progress):
        if any(r["model"] == name for r in rows):
            continue
        task, model = MODELS[name]
        run_dir = out / "runs" / name.replace(" ", "_")
        if run_dir.exists():  # an interrupted run: start it again
            shutil.rmtree(run_dir)
        config = RunConfig(
            task=task,
            data=DataConfig(root=data, train=split_questions(data, "train"), eval=split_questions(data, "val"), train_split="train",
                            eval_split="val"),
            model=copy.deepcopy(model),
            train=OptimConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=max(1, steps // 10), eval_every=steps,
                              eval_samples=100, save_every=steps, log_every=max(1, steps // 20), precision="fp32"),
            output=str(run_dir),
        )
        start = time.perf_counter()
        train(config, progress=progress)
        seconds = time.perf_counter() - start
        trained = load(run_dir / "model")
        row = {"model": name, "task": task, "parameters": count_parameters(trained), "train_seconds": round(seconds, 1),
               **settings}
        for split in ("test", "test_compositional"):
            row[split] = vqa_scores(trained, scored_questions(data, split, eval_samples))
        row["latency_ms"] = _latency(trained, data)
        rows.append(row)
        atomic_write_json(out / "results.json", {"settings": settings, "blind": _blind(data, eval_samples), "rows": rows},
                          indent=2)
    results = json.loads((out / "results.json").read_text())
    rows = sorted((r for r in results["rows"] if r["model"] in names), key=lambda r: list(MODELS).index(r["model"]))
    atomic_write_text(out / "report.md", _table(rows, results["blind"], settings))
    _plot(rows, results["blind"], out / "accuracy_per_question_type.png")
    return {"report": str(out / "report.md"),
            "overall": {r["model"]: {s: r[s]["overall"] for s in ("test", "test_compositional")} for r in rows},
            "blind": {s: results["blind"][s]["overall"] for s in ("test", "test_compositional")}}


def _finished_rows(path: Path, settings: dict) -> list[dict]:
    """The rows of an earlier run of the experiment with the same settings (others are redone)."""
    if not path.is_file():
        return []
    results = json.loads(path.read_text())
    if not isinstance(results, dict) or results.get("settings") != settings:  # another budget, or an older layout
        return []
    return results.get("rows", [])


def _blind(data: str, limit: int) -> dict:
    """The question-only baseline, fitted on the training questions, on the same test questions."""
    questions = load_split(DataConfig(train=split_questions(data, "train")), "train").vqa
    return {split: blind_scores(questions, scored_questions(data, split, limit).vqa) for split in ("test", "test_compositional")}


@torch.no_grad()
def _latency(model, data: str, repeats: int = 30) -> float:
    """Median milliseconds to answer one question about one image (batch of one, one thread)."""
    split_data = load_split(DataConfig(eval=split_questions(data, "test")), "eval")
    records = split_data.vqa[:repeats]
    store = ImageStore([r.image for r in records], model.image_processor, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for r in records:
            pixels = store.batch([store.position(r.image)])
            start = time.perf_counter()
            model.answer_batch([r.question], pixels=pixels)
            times.append(1000 * (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    return round(statistics.median(times), 2)


def _table(rows: list[dict], blind: dict, settings: dict) -> str:
    types = sorted(rows[0]["test"]["perQuestionType"])
    lines = ["# Fusion experiment", "", __doc__.strip(), "",
             f"{settings['steps']} steps of {settings['batch_size']} images (with all their questions), "
             f"learning rate {settings['lr']}; scored on the first {settings['eval_samples']} images of each split.", ""]
    for split in ("test", "test_compositional"):
        lines += [f"## {split}: VQA accuracy (%)", "",
                  "| model | overall | " + " | ".join(types) + " | params | train s | latency ms |",
                  "|---|---|" + "---|" * len(types) + "---|---|---|"]
        for r in rows:
            per = r[split]["perQuestionType"]
            lines.append(f"| {r['model']} | **{r[split]['overall']}** | " + " | ".join(str(per.get(t, "")) for t in types)
                         + f" | {r['parameters']:,} | {r['train_seconds']} | {r['latency_ms']} |")
        per = blind[split]["perQuestionType"]
        lines.append(f"| blind (question only) | {blind[split]['overall']} | "
                     + " | ".join(str(per.get(t, "")) for t in types) + " | 0 | | |")
        best = [max(rows, key=lambda r: r[split]["perQuestionType"].get(t, 0))["model"] for t in types]
        lines.append(f"| **best** | {max(rows, key=lambda r: r[split]['overall'])['model']} | " + " | ".join(best) + " | | | |")
        lines.append("")
    lines.append("![accuracy per question type](accuracy_per_question_type.png)")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], blind: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = sorted(rows[0]["test"]["perQuestionType"])
    fig, axes = plt.subplots(2, 1, figsize=(max(8, len(types) * 1.2), 8), sharex=True)
    width = 0.8 / len(rows)
    for ax, split in zip(axes, ("test", "test_compositional")):
        for k, r in enumerate(rows):
            values = [r[split]["perQuestionType"].get(t, 0) for t in types]
            ax.bar([i + k * width for i in range(len(types))], values, width, label=f"{r['model']} ({r[split]['overall']})")
        per = blind[split]["perQuestionType"]
        ax.scatter([i + 0.4 - width / 2 for i in range(len(types))], [per.get(t, 0) for t in types], marker="_", s=400,
                   color="black", zorder=3, label=f"blind ({blind[split]['overall']})")
        ax.set_ylim(0, 105)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{split}")
        ax.legend(fontsize=7, ncol=3)
    axes[-1].set_xticks([i + 0.4 - width / 2 for i in range(len(types))], types, rotation=45, ha="right")
    atomic_write_figure(path, fig)
