"""`make demo`: the main job on the shipped defaults.

For now: generate a small Shapes benchmark, score the model-free baselines on it with the
official metrics, and draw a preview picture. (The served web UI replaces this once the
models and the server exist.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .data.shapes.generate import ShapesConfig, generate
from .data.shapes.preview import draw_preview
from .evaluate.baselines import blind_vqa_predictions, frequent_caption_predictions
from .evaluate.scoring import score_caption_files, score_grounding_files, score_vqa_files


def run_demo(out: Path, *, seed: int = 0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    data = out / "shapes"
    print(f"1/4 generating a small Shapes benchmark in {data} ...")
    start = time.perf_counter()
    stats = generate(ShapesConfig(seed=seed, train=2000, val=200, test=200, test_compositional=200), data)
    print(f"    done in {time.perf_counter() - start:.1f} s")

    print("2/4 question-only (blind) VQA baseline on the test split, scored like the official VQA script ...")
    vqa_predictions = blind_vqa_predictions(data, "test", out / "blind_vqa_test.json")
    vqa = score_vqa_files(vqa_predictions, data / "vqa/shapes_test_questions.json", data / "vqa/shapes_test_annotations.json")

    print("3/4 image-blind captioning baseline (the most frequent train caption), coco-caption metrics + grounding ...")
    caption_predictions = frequent_caption_predictions(data, "test", out / "frequent_caption_test.json")
    captions = score_caption_files(caption_predictions, data / "annotations/captions_test.json")
    grounding = score_grounding_files(caption_predictions, data / "scenes/test_scenes.json")

    print("4/4 drawing a preview of the validation split ...")
    preview = draw_preview(data, out / "preview.png", split="val")

    report = {
        "blind_vqa_accuracy": vqa["overall"],
        "blind_vqa_per_answer_type": vqa["perAnswerType"],
        "frequent_caption": {k: v for k, v in captions.items() if k in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")},
        "frequent_caption_grounding": {k: grounding[k] for k in ("claim_precision", "hallucination_rate")},
        "blind_baseline_from_stats": stats["blind_baseline"]["test"]["overall_best"],
        "preview": str(preview),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"\nPreview picture: {preview}\nEverything is in {out}/")
    return report
