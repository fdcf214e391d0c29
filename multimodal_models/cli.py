"""The `multimodal` command.

    multimodal shapes generate OUT      write the Shapes benchmark
    multimodal shapes preview DIR       draw a grid of samples with captions and Q/A
    multimodal score caption|vqa|mmmu|grounding
                                        score a predictions file with the official metrics
    multimodal baseline blind|caption   write the predictions of a model-free baseline
    multimodal demo                     the main job on the shipped defaults

Every subcommand has --help. Errors in the user's input are printed as one line naming
the file, record and field, without a traceback (set MULTIMODAL_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import MultimodalError


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


# --- shapes ---------------------------------------------------------------------------


def cmd_shapes_generate(args) -> None:
    from .data.shapes.generate import ShapesConfig, generate

    config = ShapesConfig(
        seed=args.seed,
        train=args.train,
        val=args.val,
        test=args.test,
        test_compositional=args.compositional,
        image_size=args.image_size,
        hard=args.hard,
    )
    start = time.perf_counter()
    stats = generate(config, args.out, workers=args.workers, progress=not args.quiet)
    seconds = time.perf_counter() - start
    summary = {
        "out": str(args.out),
        "seconds": round(seconds, 2),
        "images": {split: s["images"] for split, s in stats["splits"].items()},
        "questions": {split: s["questions"] for split, s in stats["splits"].items()},
        "blind_baseline_test": (stats.get("blind_baseline", {}).get("test") or {}).get("overall_best"),
    }
    _print_json(summary)


def cmd_shapes_preview(args) -> None:
    from .data.shapes.preview import draw_preview

    path = draw_preview(args.data, args.out, split=args.split, count=args.count, seed=args.seed)
    print(path)


# --- score ----------------------------------------------------------------------------


def _split_file(data: str | None, split: str, key: str, explicit: str | None, flag: str) -> str:
    if explicit:
        return explicit
    if not data:
        raise MultimodalError(f"give {flag} FILE, or --data DIR (a dataset with a dataset.json) and --split")
    from .data.shapes.generate import load_manifest

    manifest = load_manifest(data)
    try:
        return str(Path(data) / manifest["splits"][split][key])
    except KeyError:
        raise MultimodalError(f"{data}/dataset.json has no '{key}' file for split '{split}'") from None


def cmd_score_caption(args) -> None:
    from .evaluate.scoring import score_caption_files

    annotations = _split_file(args.data, args.split, "captions", args.annotations, "--annotations")
    _print_json(score_caption_files(args.predictions, annotations, tokenizer=args.tokenizer))


def cmd_score_vqa(args) -> None:
    from .evaluate.scoring import score_vqa_files

    questions = _split_file(args.data, args.split, "vqa_questions", args.questions, "--questions")
    annotations = _split_file(args.data, args.split, "vqa_annotations", args.annotations, "--annotations")
    _print_json(score_vqa_files(args.predictions, questions, annotations))


def cmd_score_mmmu(args) -> None:
    from .evaluate.scoring import score_mmmu_files

    _print_json(score_mmmu_files(args.predictions, args.data, seed=args.seed))


def cmd_score_grounding(args) -> None:
    from .evaluate.scoring import score_grounding_files

    scenes = _split_file(args.data, args.split, "scenes", args.scenes, "--scenes")
    _print_json(score_grounding_files(args.predictions, scenes))


# --- baselines ------------------------------------------------------------------------


def cmd_baseline_blind(args) -> None:
    from .evaluate.baselines import blind_vqa_predictions

    out = blind_vqa_predictions(args.data, args.split, args.out)
    print(out)


def cmd_baseline_caption(args) -> None:
    from .evaluate.baselines import frequent_caption_predictions

    out = frequent_caption_predictions(args.data, args.split, args.out)
    print(out)


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), seed=args.seed)


# --- parser ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multimodal", description="Image+text AI: search, caption, answer, chat; train, evaluate, serve."
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"multimodal-models {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    shapes = commands.add_parser("shapes", help="the Shapes benchmark: generate it, preview it")
    shapes_commands = shapes.add_subparsers(dest="shapes_command", required=True, metavar="SUBCOMMAND")
    gen = shapes_commands.add_parser("generate", help="write the benchmark (images, captions, VQA, dialogues, MMMU)")
    gen.add_argument("out", type=Path, help="output folder")
    gen.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes identical files (default 0)")
    gen.add_argument("--train", type=int, default=10_000, help="training images (default 10000)")
    gen.add_argument("--val", type=int, default=1_000, help="validation images (default 1000)")
    gen.add_argument("--test", type=int, default=1_000, help="test images (default 1000)")
    gen.add_argument("--compositional", type=int, default=1_000,
                     help="images of the compositional test split, built on held-out colour-shape pairs (default 1000)")
    gen.add_argument("--image-size", type=int, default=64, help="image side in pixels, 16..224 (default 64)")
    gen.add_argument("--hard", action="store_true", help="harder images: colour jitter, rotation, textured background")
    gen.add_argument("--workers", type=int, default=None, help="processes to use (default: up to 4, one per core)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_shapes_generate)

    prev = shapes_commands.add_parser("preview", help="draw a grid of samples with their captions and a few Q/A")
    prev.add_argument("data", type=Path, help="a folder written by 'multimodal shapes generate'")
    prev.add_argument("--out", type=Path, required=True, help="PNG file to write")
    prev.add_argument("--split", default="val", help="split to draw from (default val)")
    prev.add_argument("--count", type=int, default=12, help="number of samples (default 12)")
    prev.add_argument("--seed", type=int, default=0, help="which samples to pick (default 0)")
    prev.set_defaults(func=cmd_shapes_preview)

    score = commands.add_parser("score", help="score a predictions file with the official metrics (prints JSON)")
    score_commands = score.add_subparsers(dest="score_command", required=True, metavar="TASK")

    def data_options(p, *, needs_split: bool = True):
        p.add_argument("--data", help="a dataset folder with dataset.json (instead of naming the annotation files)")
        if needs_split:
            p.add_argument("--split", default="test", help="split of --data to score against (default test)")

    cap = score_commands.add_parser("caption", help="BLEU-1..4, METEOR, ROUGE-L, CIDEr-D as the coco-caption toolkit")
    cap.add_argument("--predictions", required=True, help='COCO results JSON: [{"image_id": ..., "caption": ...}]')
    cap.add_argument("--annotations", help="COCO captions JSON (captions_val2014.json layout)")
    cap.add_argument("--tokenizer", choices=["auto", "ptb", "python"], default="auto",
                     help="PTB tokenizer via Java (official), a Python re-implementation, or auto (PTB when Java exists)")
    data_options(cap)
    cap.set_defaults(func=cmd_score_caption)

    vqa = score_commands.add_parser("vqa", help="VQA accuracy exactly as the official VQA v2 evaluation script")
    vqa.add_argument("--predictions", required=True, help='VQA results JSON: [{"question_id": ..., "answer": ...}]')
    vqa.add_argument("--questions", help="VQA v2 questions JSON")
    vqa.add_argument("--annotations", help="VQA v2 annotations JSON")
    data_options(vqa)
    vqa.set_defaults(func=cmd_score_vqa)

    mmmu = score_commands.add_parser("mmmu", help="MMMU accuracy with the official answer extraction")
    mmmu.add_argument("--predictions", required=True, help='JSON {id: response} or JSONL {"id", "response"} lines')
    mmmu.add_argument("--data", required=True, help="MMMU parquet file, or a folder of them")
    mmmu.add_argument("--seed", type=int, default=42, help="seed of the random fallback (official: 42)")
    mmmu.set_defaults(func=cmd_score_mmmu)

    gr = score_commands.add_parser("grounding", help="Shapes: claim precision and hallucination rate of captions")
    gr.add_argument("--predictions", required=True, help='COCO results JSON: [{"image_id": ..., "caption": ...}]')
    gr.add_argument("--scenes", help="scenes JSON written by 'multimodal shapes generate'")
    data_options(gr)
    gr.set_defaults(func=cmd_score_grounding)

    base = commands.add_parser("baseline", help="write predictions of model-free baselines (for comparison)")
    base_commands = base.add_subparsers(dest="baseline_command", required=True, metavar="KIND")
    blind = base_commands.add_parser("blind", help="question-only VQA baseline fitted on the train split")
    blind.add_argument("--data", required=True, help="a dataset folder with dataset.json")
    blind.add_argument("--split", default="test", help="split to predict (default test)")
    blind.add_argument("--out", type=Path, required=True, help="VQA results JSON to write")
    blind.set_defaults(func=cmd_baseline_blind)
    freq = base_commands.add_parser("caption", help="image-blind captioning baseline: the most frequent train caption")
    freq.add_argument("--data", required=True, help="a dataset folder with dataset.json")
    freq.add_argument("--split", default="test", help="split to predict (default test)")
    freq.add_argument("--out", type=Path, required=True, help="COCO results JSON to write")
    freq.set_defaults(func=cmd_baseline_caption)

    demo = commands.add_parser("demo", help="the main job: generate data, score baselines, draw a preview")
    demo.add_argument("--out", default="demo_output", help="folder for everything the demo writes (default demo_output)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (MultimodalError, FileNotFoundError, ValueError) as exc:
        if os.environ.get("MULTIMODAL_DEBUG"):
            raise
        print(f"multimodal: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("multimodal: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
