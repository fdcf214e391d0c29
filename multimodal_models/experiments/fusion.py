"""The fusion experiment: early vs middle (cross-attention) vs late fusion vs a native LM.

All four models answer the same VQA questions, trained with the same loop, the same data
(the training split's questions only: no captions or dialogues for the native LM either),
the same number of optimizer steps and the same number of questions per step, on similar
parameter budgets. Each is scored with the official VQA accuracy per question type on the
normal test split and on the compositional split (colour-shape pairs never seen in
training), with its parameter count, training time and per-question inference latency.
"""

from __future__ import annotations

import copy
import io
import json
import statistics
import time
from pathlib import Path

import torch

from ..evaluate.harness import evaluate_vqa, first_images
from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..loading import load
from ..models.layers import count_parameters
from ..training.config import DataConfig, OptimConfig, RunConfig, SplitFiles
from ..data.splits import ImageStore, load_split
from ..training.loop import train

VISION = {"image_size": 64, "patch_size": 8, "width": 128, "depth": 3, "heads": 4, "stem": "conv", "pool": "mean",
          "class_token": False}
TEXT = {"max_length": 32, "width": 128, "depth": 2, "heads": 4, "causal": False, "pool": "mean"}
MODELS = {
    "early fusion": ("vqa", {"vision": VISION, "text": TEXT, "fusion": {"kind": "early", "width": 128, "depth": 3, "heads": 4}}),
    "middle fusion": ("vqa", {"vision": VISION, "text": TEXT, "fusion": {"kind": "middle", "width": 128, "depth": 3, "heads": 4}}),
    "late fusion": ("vqa", {"vision": VISION, "text": TEXT, "fusion": {"kind": "late", "width": 256, "late_mode": "gated"}}),
    "native LM": ("vlm", {"vision": VISION, "decoder": {"width": 128, "depth": 5, "heads": 4, "max_length": 96},
                          "pixel_shuffle": 2}),
}
QUESTIONS_PER_IMAGE = 12  # Shapes writes 12 questions per image


def vqa_only(root: str, split: str) -> SplitFiles:
    manifest = json.loads((Path(root) / "dataset.json").read_text())["splits"][split]
    return SplitFiles(images=manifest["images"], vqa_questions=manifest["vqa_questions"],
                      vqa_annotations=manifest["vqa_annotations"])


def run_fusion_experiment(data: str | Path, out: str | Path, *, steps: int = 600, batch_size: int = 16,
                          eval_samples: int = 300, progress: bool = True) -> dict:
    data, out = str(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (task, model) in MODELS.items():
        # the same questions per step: the LM packs all questions of an image into one sequence
        images_per_step = batch_size if task == "vlm" else batch_size * QUESTIONS_PER_IMAGE
        run_dir = out / "runs" / name.replace(" ", "_")
        config = RunConfig(
            task=task,
            data=DataConfig(root=data, train=vqa_only(data, "train"), eval=vqa_only(data, "val"), train_split="train",
                            eval_split="val"),
            model=copy.deepcopy(model),
            train=OptimConfig(steps=steps, batch_size=images_per_step, lr=1e-3, warmup=max(1, steps // 10),
                              eval_every=steps, eval_samples=100, save_every=steps, log_every=max(1, steps // 20)),
            output=str(run_dir),
        )
        if (run_dir / "checkpoints" / "last").exists():
            import shutil

            shutil.rmtree(run_dir)
        start = time.perf_counter()
        train(config, progress=progress)
        seconds = time.perf_counter() - start
        trained = load(run_dir / "model")
        row = {"model": name, "task": task, "parameters": count_parameters(trained), "train_seconds": round(seconds, 1),
               "steps": steps, "questions_per_step": batch_size * QUESTIONS_PER_IMAGE}
        for split in ("test", "test_compositional"):
            row[split] = _score(trained, data, split, eval_samples)
        row["latency_ms"] = _latency(trained, data)
        rows.append(row)
        atomic_write_json(out / "results.json", rows, indent=2)
    atomic_write_text(out / "report.md", _table(rows))
    _plot(rows, out / "accuracy_per_question_type.png")
    return {"report": str(out / "report.md"), "overall": {r["model"]: {s: r[s]["overall"] for s in ("test", "test_compositional")}
                                                          for r in rows}}


def _score(model, data: str, split: str, limit: int) -> dict:
    split_data = first_images(load_split(DataConfig(root=data, eval=vqa_only(data, split), eval_split=split), "eval"), limit)
    store = ImageStore([r.image for r in split_data.vqa], model.image_processor, progress=False)
    scores = evaluate_vqa(model, split_data.vqa, store)
    return {"overall": scores["overall"], "perQuestionType": scores["perQuestionType"]}


@torch.no_grad()
def _latency(model, data: str, repeats: int = 30) -> float:
    """Median milliseconds to answer one question about one image (batch of one, one thread)."""
    split_data = load_split(DataConfig(root=data, eval=vqa_only(data, "test"), eval_split="test"), "eval")
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


def _table(rows: list[dict]) -> str:
    types = sorted(rows[0]["test"]["perQuestionType"])
    lines = ["# Fusion experiment", "", __doc__.strip(), ""]
    for split in ("test", "test_compositional"):
        lines += [f"## {split}: VQA accuracy (%)", "",
                  "| model | overall | " + " | ".join(types) + " | params | train s | latency ms |",
                  "|---|---|" + "---|" * len(types) + "---|---|---|"]
        for r in rows:
            per = r[split]["perQuestionType"]
            lines.append(f"| {r['model']} | **{r[split]['overall']}** | " + " | ".join(str(per.get(t, "")) for t in types)
                         + f" | {r['parameters']:,} | {r['train_seconds']} | {r['latency_ms']} |")
        lines.append("")
    lines.append("![accuracy per question type](accuracy_per_question_type.png)")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = sorted(rows[0]["test"]["perQuestionType"])
    fig, axes = plt.subplots(2, 1, figsize=(max(8, len(types) * 1.1), 8), sharex=True)
    width = 0.8 / len(rows)
    for ax, split in zip(axes, ("test", "test_compositional")):
        for k, r in enumerate(rows):
            values = [r[split]["perQuestionType"].get(t, 0) for t in types]
            ax.bar([i + k * width for i in range(len(types))], values, width, label=f"{r['model']} ({r[split]['overall']})")
        ax.set_ylim(0, 105)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{split}")
        ax.legend(fontsize=7, ncol=2)
    axes[-1].set_xticks([i + 0.4 - width / 2 for i in range(len(types))], types, rotation=45, ha="right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
