"""The `multimodal` command.

    multimodal shapes generate OUT      write the Shapes benchmark
    multimodal shapes preview DIR       draw a grid of samples with captions and Q/A
    multimodal score caption|vqa|mmmu|grounding
                                        score a predictions file with the official metrics
    multimodal baseline blind|caption   write the predictions of a model-free baseline
    multimodal index DIR                index a folder of images (incremental, resumable)
    multimodal search INDEX "query"     search it by text and/or --image
    multimodal transcribe AUDIO...      speech to text with a Whisper checkpoint
    multimodal serve                    HTTP API (OpenAI-compatible) and web page on 127.0.0.1:8000
    multimodal demo                     the main job on the shipped defaults

Every subcommand has --help. Errors in the user's input are printed as one line naming
the file, record and field, without a traceback (set MULTIMODAL_DEBUG=1 to see one).

Each command imports its modules inside its function (each such import is marked `# heavy`
with what it loads), so numpy, PIL and torch load only when a command that needs them runs:
`multimodal --help` answers in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .devices import add_device_arguments, add_runtime_arguments
from .errors import MultimodalError
from .index.defaults import DEFAULT_SIMILARITY_WEIGHT, DEFAULT_TOP
from .serve.runner import add_arguments as serve_arguments
from .serve.runner import run_from_args
from .version import __version__


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


# --- shapes ---------------------------------------------------------------------------


def cmd_shapes_generate(args) -> None:
    from .shapes.generate import ShapesConfig, generate  # heavy: numpy, PIL

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
    from .shapes.preview import draw_preview  # heavy: numpy, PIL

    path = draw_preview(args.data, args.out, split=args.split, count=args.count, seed=args.seed)
    print(path)


# --- score ----------------------------------------------------------------------------


def _split_file(data: str | None, split: str, key: str, explicit: str | None, flag: str) -> str:
    if explicit:
        return explicit
    if not data:
        raise MultimodalError(f"give {flag} FILE, or --data DIR (a dataset with a dataset.json) and --split")
    from .shapes.generate import load_manifest  # heavy: numpy, PIL

    manifest = load_manifest(data)
    try:
        return str(Path(data) / manifest["splits"][split][key])
    except KeyError:
        raise MultimodalError(f"{data}/dataset.json has no '{key}' file for split '{split}'") from None


def cmd_score_caption(args) -> None:
    from .evaluate.scoring import score_caption_files  # heavy: numpy, PIL

    annotations = _split_file(args.data, args.split, "captions", args.annotations, "--annotations")
    _print_json(score_caption_files(args.predictions, annotations, tokenizer=args.tokenizer))


def cmd_score_vqa(args) -> None:
    from .evaluate.scoring import score_vqa_files  # heavy: numpy, PIL

    questions = _split_file(args.data, args.split, "vqa_questions", args.questions, "--questions")
    annotations = _split_file(args.data, args.split, "vqa_annotations", args.annotations, "--annotations")
    _print_json(score_vqa_files(args.predictions, questions, annotations))


def cmd_score_mmmu(args) -> None:
    from .evaluate.scoring import score_mmmu_files  # heavy: numpy, PIL

    _print_json(score_mmmu_files(args.predictions, args.data, split=args.split, seed=args.seed,
                                 allow_missing=args.allow_missing))


def cmd_score_grounding(args) -> None:
    from .shapes.evaluation import score_grounding_files  # heavy: torch

    scenes = _split_file(args.data, args.split, "scenes", args.scenes, "--scenes")
    _print_json(score_grounding_files(args.predictions, scenes))


# --- baselines ------------------------------------------------------------------------


def cmd_baseline_blind(args) -> None:
    from .shapes.baselines import blind_vqa_predictions  # heavy: numpy, PIL

    out = blind_vqa_predictions(args.data, args.split, args.out)
    print(out)


def cmd_baseline_caption(args) -> None:
    from .shapes.baselines import frequent_caption_predictions  # heavy: numpy, PIL

    out = frequent_caption_predictions(args.data, args.split, args.out)
    print(out)


def cmd_demo(args) -> None:
    from .demo import run_demo  # heavy: torch

    run_demo(Path(args.out), images=args.images, host=args.host, port=args.port, quiet=args.quiet)


# --- models ---------------------------------------------------------------------------


def _load(name: str, args, expected: str | None = None, adapter: str | None = None, runtime: str | None = None):
    """The model a command's --model (or another flag's value) names, on its --device in its --dtype,
    with a LoRA adapter folder applied (--adapter), quantized (--quantize) and run by --runtime."""
    from .loading import load  # heavy: torch

    return load(name, adapter=adapter, device=args.device, dtype=args.dtype, quantize=args.quantize,
                runtime=runtime or args.runtime, expect=expected, needed_by="this command")


ADAPTER_HELP = ("LoRA adapter folder in peft's layout (adapter_config.json + adapter_model.safetensors; e.g. a "
                "LoRA run's adapter/) to apply to --model, folded into its weights")


def _generation_options(args) -> dict:
    options = {"max_new_tokens": args.max_tokens}
    if args.beams is not None:  # otherwise the model's default (captions: its config's caption_beams; else greedy)
        options["num_beams"] = args.beams
    if args.temperature is not None:
        options.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    return options


def cmd_train(args) -> None:
    from .training.config import load_config  # heavy: torch
    from .training.loop import train  # heavy: torch

    overrides = list(args.overrides) + ([f"train.device={args.device}"] if args.device else [])
    config = load_config(args.config, overrides)
    summary = train(config, resume=args.resume, progress=not args.quiet)
    _print_json(summary)


def cmd_evaluate(args) -> None:
    from dataclasses import fields

    from .data.splits import SplitFiles  # heavy: torch
    from .evaluate.harness import headline  # heavy: torch
    from .evaluate.report import evaluate_model, evaluation_data  # heavy: torch
    from .shapes.evaluation import EXTRAS as SHAPES_EXTRAS  # heavy: torch
    from .shapes.evaluation import ParaphraseRobustness, SceneGroups  # heavy: torch

    def flag(field: str) -> str:  # errors name the flag a SplitFiles field came from
        return {"root": "--data", "eval_split": "--split"}.get(field, "--" + field.replace("_", "-"))

    if args.karpathy and not args.karpathy_split:
        args.karpathy_split = "test"  # a Karpathy file holds every split: evaluate the one papers report
    files = SplitFiles(**{f.name: getattr(args, f.name, None) for f in fields(SplitFiles)})
    data = evaluation_data(args.data, args.split, files, name=flag)  # before the model loads: a typo fails at once
    reranker = None
    if args.rerank_with:
        from .index.rerank import Reranker  # heavy: torch

        reranker = Reranker(_load(args.rerank_with, args, "vlm", runtime="torch"), top=args.rerank_top,
                            similarity_weight=args.rerank_similarity_weight)
    from .evaluate.corruptions import parse_corruptions  # heavy: numpy, PIL

    try:  # before the model loads: a typo fails at once
        corruptions = parse_corruptions(args.corruptions) if args.corruptions is not None else ()
        severities = tuple(int(s) for s in args.severities.split(",") if s.strip())
        if not severities or any(s not in range(1, 6) for s in severities):
            raise ValueError(f"--severities {args.severities}: give severities 1 to 5, comma-separated")
    except ValueError as error:
        raise MultimodalError(str(error) if "--severities" in str(error) else f"--corruptions: {error}") from None
    group_by = tuple(f.strip() for value in args.group_by or () for f in value.split(",") if f.strip())
    results = evaluate_model(_load(args.model, args, adapter=args.adapter), data, args.out, limit=args.limit,
                             progress=not args.quiet, reranker=reranker,
                             # each does nothing where the data has no scene graphs (or Shapes questions)
                             extras=SHAPES_EXTRAS + (SceneGroups(),)
                             + ((ParaphraseRobustness(seed=args.seed),) if args.paraphrases else ()),
                             corruptions=corruptions, severities=severities, group_by=group_by, seed=args.seed,
                             resamples=args.bootstrap)
    _print_json({"report": str(Path(args.out) / "report.md"), **headline(results)})


def cmd_caption(args) -> None:
    model = _load(args.model, args, "vlm", adapter=args.adapter)
    for image in args.images:
        print(f"{image}\t{model.caption(str(image), **_generation_options(args))}")


def _speech_model(args):
    """The speech-to-text model of --speech-model, on --device in --dtype (not quantized)."""
    from .loading import load  # heavy: torch

    return load(args.speech_model, device=args.device, dtype=args.dtype, expect="speech_to_text",
                needed_by="--speech-model")


def _heard(speech, audio: Path, language: str | None) -> str:
    """The transcript of a spoken question or turn; nothing heard is an error naming the file."""
    text = speech.transcribe(str(audio), language=language).strip()
    if not text:
        raise MultimodalError(f"{audio}: the speech model heard no words in it")
    return text


def cmd_ask(args) -> None:
    if (args.question is None) == (args.audio is None):
        raise MultimodalError("give the question as text or as --audio FILE (one of the two)")
    question = args.question
    if args.audio is not None:  # transcribed first: a bad audio file fails before the VLM loads
        question = _heard(_speech_model(args), args.audio, args.language)
        print(f"question: {question}", flush=True)
    model = _load(args.model, args, adapter=args.adapter)
    if model.model_type == "fusion_classifier":
        answer, confidence = model.answer(str(args.image), question)
        print(f"{answer}\t(confidence {confidence:.3f})")
        return
    from .models.vlm import VisionLanguageModel  # heavy: torch

    if not isinstance(model, VisionLanguageModel):
        raise MultimodalError(f"{args.model} is a {model.model_type} model; 'ask' needs a vlm or fusion_classifier")
    print(model.ask(str(args.image), question, **_generation_options(args)))


def cmd_chat(args) -> None:
    model = _load(args.model, args, "vlm", adapter=args.adapter)
    images = [str(p) for p in args.images]
    messages: list[dict] = []
    speech = None  # loaded at the first voice turn
    print(f"Chatting about {len(images)} image(s). An empty line or Ctrl-D ends; @FILE.wav speaks a turn "
          "(@@ types a leading @).", file=sys.stderr)
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        if text.startswith("@@"):
            text = text[1:]
        elif text.startswith("@"):  # a voice turn: the audio file's transcript is sent
            audio = Path(text[1:].strip()).expanduser()
            try:
                speech = speech or _speech_model(args)
                text = _heard(speech, audio, args.language)
            except MultimodalError as exc:  # a bad file ends the turn, not the chat (a bad model ends both)
                if speech is None:
                    raise
                print(f"multimodal: error: {exc}", file=sys.stderr)
                continue
            print(f"you (voice)> {text}", flush=True)
        content = [{"type": "image"} for _ in images] if not messages else []  # the images open the chat
        messages.append({"role": "user", "content": content + [{"type": "text", "text": text}]})
        print("model> ", end="", flush=True)
        reply = ""
        for piece in model.chat(messages, images=images, stream=True, **_generation_options(args)):
            print(piece, end="", flush=True)
            reply += piece
        print()
        messages.append({"role": "assistant", "content": reply})


DEFAULT_SPEECH_MODEL = "openai/whisper-tiny"


def cmd_transcribe(args) -> None:
    model = _load(args.model, args, "speech_to_text")
    for audio in args.audio:  # one at a time: a broken file stops the run naming it, after those before it
        [(text, language)] = model.transcribe_with_language([str(audio)], language=args.language, task=args.task,
                                                            max_new_tokens=args.max_tokens)
        if args.json:
            print(json.dumps({"audio": str(audio), "text": text.strip(), "language": language}, ensure_ascii=False),
                  flush=True)
        else:
            print(f"{audio}\t{text.strip()}", flush=True)


def cmd_classify(args) -> None:
    model = _load(args.model, args, "dual_encoder")
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if len(labels) < 2:
        raise MultimodalError("--labels needs at least two comma-separated labels")
    for label, probability in model.classify(str(args.image), labels):
        print(f"{probability:.4f}\t{label}")


def cmd_embed(args) -> None:
    import numpy as np

    model = _load(args.model, args, "dual_encoder")
    if bool(args.images) == bool(args.texts):
        raise MultimodalError("give --images FILE... or --texts TEXT... (one of the two)")
    vectors = model.embed_images([str(p) for p in args.images]) if args.images else model.embed_texts(args.texts)
    array = vectors.float().cpu().numpy()
    if args.out:
        np.save(args.out, array)
        print(f"{args.out}: {array.shape[0]} vectors of dimension {array.shape[1]}")
    else:
        for item, row in zip(args.images or args.texts, array):
            print(json.dumps({"input": str(item), "embedding": [round(float(x), 6) for x in row]}))


def cmd_index(args) -> None:
    from .index.commands import run_index  # heavy: torch

    run_index(args)


def cmd_search(args) -> None:
    from .index.commands import run_search  # heavy: torch

    run_search(args)


def cmd_export(args) -> None:
    from .export import export  # heavy: torch
    from .loading import load  # heavy: torch

    model = load(args.model, adapter=args.adapter, needed_by="multimodal export")  # float32 on the CPU
    start = time.perf_counter()
    out = export(model, args.out, format=args.format, quantize=args.quantize)
    files = sorted(str(p.relative_to(out)) for p in Path(out).rglob("*") if p.is_file())
    _print_json({"out": str(out), "format": args.format, "quantize": args.quantize, "files": files,
                 "seconds": round(time.perf_counter() - start, 1)})


def cmd_serve(args) -> None:
    run_from_args(args)


def cmd_experiment_fusion(args) -> None:
    from .experiments.fusion import run_fusion_experiment  # heavy: torch

    _print_json(run_fusion_experiment(args.data, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                      eval_samples=args.eval_samples, models=args.models, progress=not args.quiet))


def cmd_experiment_data_efficiency(args) -> None:
    from .experiments.data_efficiency import run_data_efficiency  # heavy: torch

    _print_json(run_data_efficiency(args.config, args.out, fractions=_fractions(args.fractions), tower=args.tower,
                                    vlm=args.vlm, steps=args.steps, test_split=args.test_split,
                                    eval_samples=args.eval_samples, progress=not args.quiet))


def _fractions(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--fractions: expected shares separated by commas, such as 0.01,0.1,1, got {text!r}") from None


# --- parser ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multimodal", description="Image+text AI: search, caption, answer, chat; train, evaluate, serve."
    )
    parser.add_argument("--version", action="version", version=f"multimodal-models {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def device_options(p):  # the same on every command that loads a model
        add_device_arguments(p)  # --device, --dtype
        add_runtime_arguments(p)  # --quantize, --runtime

    def rerank_options(p, what):
        p.add_argument("--rerank-with", default=None, metavar="VLM",
                       help=f"a multimodal LM (e.g. shapes-vlm) that rescores the dual encoder's top images of a text by "
                            f"how likely it finds the text as their caption; {what} with it")
        p.add_argument("--rerank-top", type=int, default=DEFAULT_TOP,
                       help=f"images rescored per text (default {DEFAULT_TOP})")
        p.add_argument("--rerank-similarity-weight", type=float, default=DEFAULT_SIMILARITY_WEIGHT,
                       help="weight of the dual encoder's cosine similarity added to the LM's log-likelihood "
                            f"(default {DEFAULT_SIMILARITY_WEIGHT})")

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
    mmmu.add_argument("--data", required=True,
                      help="MMMU parquet file, or a folder as MMMU is published: one subject (MMMU/Art) or all of "
                           "them (MMMU), each with dev-, validation- and test-*.parquet")
    mmmu.add_argument("--split", default="validation",
                      help="which files of a --data folder to score against: dev, validation or test (default "
                           "validation; test answers are hidden)")
    mmmu.add_argument("--allow-missing", action="store_true",
                      help="score the records that have a response and count the others as \"missing\" "
                           "(default: a record without a response is an error)")
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

    tr = commands.add_parser("train", help="train a model from a YAML config (one loop for every task)")
    tr.add_argument("config", type=Path, help="YAML config, e.g. configs/shapes-vlm.yaml")
    tr.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=200")
    tr.add_argument("--resume", action="store_true", help="continue the run in the config's output folder")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.add_argument("--device", default=None, metavar="DEVICE",
                    help="where to train: cpu, cuda, cuda:N, mps or auto (default: the config's train.device, auto); "
                         "under torchrun each process takes the GPU of its LOCAL_RANK")
    tr.set_defaults(func=cmd_train)

    ev = commands.add_parser("evaluate", help="run a model on a benchmark split or annotation files; write metrics, "
                                              "a report and plots")
    ev.add_argument("--model", default="shapes-vlm", help="shipped model name or saved model folder (default shapes-vlm)")
    ev.add_argument("--adapter", default=None, metavar="FOLDER", help=ADAPTER_HELP)
    ev.add_argument("--data", default=None, metavar="DIR",
                    help="dataset folder with dataset.json (e.g. from 'multimodal shapes generate')")
    ev.add_argument("--split", default=None, help="split of --data to evaluate (default test)")
    ev.add_argument("--out", required=True, type=Path, help="report folder to write")
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    given = ev.add_argument_group(
        "annotation files", "evaluate these instead of a --data split, or with it (each replaces the split's file of "
                            "its kind); any combination")
    given.add_argument("--images", metavar="DIR", help="image folder the files refer into (default: each file's folder)")
    given.add_argument("--table", metavar="FILE",
                       help="JSONL or CSV rows of image, question, answer[s] (VQA) or of image, caption")
    given.add_argument("--vqa-questions", metavar="FILE", help="VQA v2 questions JSON (with --vqa-annotations)")
    given.add_argument("--vqa-annotations", metavar="FILE", help="VQA v2 annotations JSON")
    given.add_argument("--captions", metavar="FILE", help="COCO captions JSON (captions_val2014.json layout)")
    given.add_argument("--karpathy", metavar="FILE", help="Karpathy split JSON (COCO, Flickr30k), instead of --captions")
    given.add_argument("--karpathy-split", metavar="NAME",
                       help="the split of --karpathy to evaluate: train, val, test or restval (default test)")
    given.add_argument("--dialogues", metavar="FILE",
                       help="LLaVA conversations JSON/JSONL; image paths in it are relative to the folder above "
                            "--images (default: the file's folder)")
    given.add_argument("--mmmu", metavar="PATH",
                       help="MMMU parquet file, or a folder as MMMU is published (one subject, or all; multiple "
                            "choice)")
    given.add_argument("--mmmu-split", metavar="NAME",
                       help="the split of an --mmmu folder to evaluate: dev, validation or test (default validation; "
                            "test answers are hidden)")
    given.add_argument("--scenes", metavar="FILE", help="Shapes scene graphs of the images (grounded caption scores)")
    trust = ev.add_argument_group("robustness and fairness")
    trust.add_argument("--corruptions", nargs="?", const="all", default=None, metavar="NAMES",
                       help="also evaluate every task with the images corrupted (ImageNet-C style, before the model's "
                            "preprocessing): all of gaussian_noise, gaussian_blur, jpeg, brightness, contrast, "
                            "pixelate, or those named (comma-separated)")
    trust.add_argument("--severities", default="1,2,3,4,5", metavar="LIST",
                       help="corruption severities to run, comma-separated (default 1,2,3,4,5)")
    trust.add_argument("--paraphrases", action="store_true",
                       help="Shapes questions: ask each again in other words and report accuracy on the paraphrases "
                            "and the share of answers that change")
    trust.add_argument("--group-by", action="append", metavar="FIELD",
                       help="report every per-item metric per group of FIELD (a table column, a VQA annotation field "
                            "such as answer_type or question_type; on Shapes also color, shape, size of the objects a "
                            "question names), with bootstrap intervals; repeat or comma-separate for several")
    trust.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                       help="bootstrap resamples for --group-by's intervals (default 1000)")
    trust.add_argument("--seed", type=int, default=0, help="seed of the corruptions' noise and of the bootstrap (default 0)")
    rerank_options(ev, "a dual encoder's text→image retrieval is also scored")
    device_options(ev)
    ev.set_defaults(func=cmd_evaluate)

    def generation_options(p):
        device_options(p)
        p.add_argument("--max-tokens", type=int, default=48, help="most tokens to generate (default 48)")
        p.add_argument("--beams", type=int, default=None,
                       help="beam search width (default: greedy, or for captions the model's caption_beams)")
        p.add_argument("--temperature", type=float, default=None, help="sample with this temperature (default greedy)")
        p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature)")
        p.add_argument("--seed", type=int, default=None, help="seed for sampling")

    def speech_options(p):  # ask --audio, voice turns in chat
        p.add_argument("--speech-model", default=DEFAULT_SPEECH_MODEL, metavar="NAME",
                       help=f"the Whisper checkpoint that transcribes spoken questions: hub id or folder (default "
                            f"{DEFAULT_SPEECH_MODEL})")
        p.add_argument("--language", default=None, help="the spoken language's code, e.g. en (default: detected)")

    cp = commands.add_parser("caption", help="caption images with a native multimodal LM")
    cp.add_argument("images", nargs="+", type=Path, help="image files")
    cp.add_argument("--model", default="shapes-vlm", help="model name or folder (default shapes-vlm)")
    cp.add_argument("--adapter", default=None, metavar="FOLDER", help=ADAPTER_HELP)
    generation_options(cp)
    cp.set_defaults(func=cmd_caption)

    ask = commands.add_parser("ask", help="answer a question about an image")
    ask.add_argument("image", type=Path, help="image file")
    ask.add_argument("question", nargs="?", default=None, help="the question (or --audio)")
    ask.add_argument("--audio", type=Path, default=None, metavar="FILE",
                     help="the question spoken in an audio file (WAV, FLAC, MP3, OGG; up to 30 s), transcribed by "
                          "--speech-model; the transcript is printed first ('question: ...')")
    speech_options(ask)
    ask.add_argument("--model", default="shapes-vlm", help="model name or folder (default shapes-vlm)")
    ask.add_argument("--adapter", default=None, metavar="FOLDER", help=ADAPTER_HELP)
    generation_options(ask)
    ask.set_defaults(func=cmd_ask)

    ch = commands.add_parser("chat", help="chat about images, several turns, answers streamed")
    ch.add_argument("images", nargs="+", type=Path, help="image files the chat is about")
    ch.add_argument("--model", default="shapes-vlm", help="model name or folder (default shapes-vlm)")
    ch.add_argument("--adapter", default=None, metavar="FOLDER", help=ADAPTER_HELP)
    speech_options(ch)
    generation_options(ch)
    ch.set_defaults(func=cmd_chat)

    tc = commands.add_parser("transcribe", help="speech to text with a Whisper checkpoint (WAV, FLAC, MP3, OGG)")
    tc.add_argument("audio", nargs="+", type=Path, help="audio files (any rate and channels; up to 30 s each)")
    tc.add_argument("--model", default=DEFAULT_SPEECH_MODEL,
                    help=f"a Whisper checkpoint: hub id or folder (default {DEFAULT_SPEECH_MODEL}, downloaded once; "
                         "offline, download it first: hf download openai/whisper-tiny --local-dir DIR, then --model DIR)")
    tc.add_argument("--language", default=None, help="the spoken language's code, e.g. en (default: detected)")
    tc.add_argument("--task", choices=("transcribe", "translate"), default=None,
                    help="transcribe (default), or translate into English")
    tc.add_argument("--max-tokens", type=int, default=None, help="most tokens per file (default: the model's max_length)")
    tc.add_argument("--json", action="store_true", help="one JSON object per file: audio, text, language")
    device_options(tc)
    tc.set_defaults(func=cmd_transcribe)

    cl = commands.add_parser("classify", help="zero-shot classification with a dual encoder")
    cl.add_argument("image", type=Path, help="image file")
    cl.add_argument("--labels", required=True, help="comma-separated labels, e.g. 'a red circle,a blue star'")
    cl.add_argument("--model", default="shapes-clip", help="model name or folder (default shapes-clip)")
    device_options(cl)
    cl.set_defaults(func=cmd_classify)

    em = commands.add_parser("embed", help="embed images or texts with a dual encoder")
    em.add_argument("--images", nargs="*", type=Path, default=[], help="image files")
    em.add_argument("--texts", nargs="*", default=[], help="texts")
    em.add_argument("--model", default="shapes-clip", help="model name or folder (default shapes-clip)")
    em.add_argument("--out", type=Path, default=None, help=".npy file for the vectors (default: JSON lines on stdout)")
    device_options(em)
    em.set_defaults(func=cmd_embed)

    ix = commands.add_parser("index", help="index a folder of images for search (incremental, resumable)")
    ix.add_argument("folder", type=Path, help="folder of images, searched recursively (hidden entries skipped)")
    ix.add_argument("--model", default=None,
                    help="dual encoder: name or folder (default: the model that built the index, else shapes-clip)")
    ix.add_argument("--out", type=Path, default=None, help="index folder (default FOLDER/.multimodal-index)")
    ix.add_argument("--caption", action="store_true", help="also store a caption of each image, written by a VLM")
    ix.add_argument("--caption-model", default="shapes-vlm", help="the VLM for --caption (default shapes-vlm)")
    ix.add_argument("--batch-size", type=int, default=32,
                    help="images embedded and committed together; a killed run resumes after the last batch (default 32)")
    ix.add_argument("--approx-threshold", type=int, default=None,
                    help="from this many images up search is approximate (IVF), below it exact; kept by the index "
                         "(default 100000)")
    ix.add_argument("--index-type", choices=("auto", "flat", "ivf", "ivfpq", "hnsw"), default=None,
                    help="FAISS index type: auto (by size: flat, ivf from --approx-threshold, ivfpq, compressed to "
                         "~80 bytes per 512-d vector, from --compressed-threshold), or one of them whatever the size; "
                         "kept by the index (default auto)")
    ix.add_argument("--compressed-threshold", type=int, default=None,
                    help="with --index-type auto: from this many images up the index is IVF-PQ; kept by the index "
                         "(default 1000000)")
    ix.add_argument("--quiet", action="store_true", help="no progress bar")
    device_options(ix)
    ix.set_defaults(func=cmd_index)

    se = commands.add_parser("search", help="search an image index by text and/or by image")
    se.add_argument("index", type=Path, help="index folder, or the image folder holding .multimodal-index")
    se.add_argument("query", nargs="?", default=None, help="text query")
    se.add_argument("--image", type=Path, default=None, help="image query (with a text query too: both embeddings added)")
    se.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    se.add_argument("--model", default=None, help="dual encoder (default: the model that built the index)")
    se.add_argument("--nprobe", type=int, default=None,
                    help="approximate indexes: lists scanned per query; more is slower and finds more (default 32)")
    se.add_argument("--refine", type=int, default=None,
                    help="IVF-PQ indexes: the best k x REFINE candidates of the compressed codes are re-ranked with "
                         "the exact vectors (default 40)")
    se.add_argument("--shard", type=Path, action="append", default=[], metavar="INDEX",
                    help="another index (a shard of the collection, built with the same model) searched together "
                         "with INDEX; the results are merged (repeatable)")
    se.add_argument("--json", action="store_true", help='JSON lines {"rank", "path", "score", "file", "caption"}')
    rerank_options(se, "text queries are ranked")
    device_options(se)
    se.set_defaults(func=cmd_search)

    xp = commands.add_parser("export", help="write a model as ONNX graphs (ONNX Runtime) or in the Hugging Face layout")
    xp.add_argument("model", help="model name, folder or hub id")
    xp.add_argument("out", type=Path, help="output folder")
    xp.add_argument("--format", choices=("onnx", "hf"), required=True,
                    help="onnx: a dual encoder's image and text towers as ONNX graphs beside the model (load it with "
                         "--runtime onnx); hf: the layout transformers loads (CLIP, SigLIP, LLaVA, Idefics3)")
    xp.add_argument("--quantize", choices=("int8",), default=None,
                    help="with --format onnx: int8 graphs (ONNX Runtime's dynamic quantization)")
    xp.add_argument("--adapter", default=None, metavar="FOLDER", help=ADAPTER_HELP)
    xp.set_defaults(func=cmd_export)

    sv = commands.add_parser("serve", help="serve the models over HTTP: OpenAI-compatible API, search, web page")
    serve_arguments(sv)
    sv.set_defaults(func=cmd_serve)

    ex = commands.add_parser("experiment", help="experiments that compare architectures")
    ex_commands = ex.add_subparsers(dest="experiment_command", required=True, metavar="NAME")
    fu = ex_commands.add_parser("fusion", help="early / middle / late / FiLM / relation fusion vs native LM, "
                                               "same data and budget")
    fu.add_argument("--data", required=True, help="dataset folder with dataset.json")
    fu.add_argument("--out", required=True, type=Path, help="report folder (a rerun keeps the models already scored)")
    fu.add_argument("--steps", type=int, default=300,
                    help="optimizer steps per model (default 300: each training image about once; ~25 min on 2 cores)")
    fu.add_argument("--batch-size", type=int, default=32, help="images per step, all their questions included (default 32)")
    fu.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 0.002)")
    fu.add_argument("--models", nargs="+", default=None, metavar="NAME",
                    help="only these models, e.g. 'FiLM' 'middle fusion' (default: all)")
    fu.add_argument("--eval-samples", type=int, default=300, help="test images per split to evaluate (default 300)")
    fu.add_argument("--quiet", action="store_true", help="no progress bars")
    fu.set_defaults(func=cmd_experiment_fusion)
    de = ex_commands.add_parser("data-efficiency",
                                help="VQA accuracy against training data: 1%% to 100%% of the images, from scratch, "
                                     "from a pretrained tower, LoRA on a VLM")
    de.add_argument("--config", required=True, help="the recipe: a run config of the vqa task (e.g. configs/shapes-vqa.yaml)")
    de.add_argument("--out", required=True, type=Path, help="report folder (rerun: finished runs are skipped)")
    de.add_argument("--fractions", default="0.01,0.03,0.1,0.3,1",
                    help="shares of the training images, comma-separated (default 0.01,0.03,0.1,0.3,1)")
    de.add_argument("--tower", default=None,
                    help="also train from this dual encoder's vision tower (shapes-clip, a saved folder or a HF id)")
    de.add_argument("--vlm", default=None, help="also fine-tune this VLM with LoRA (rank 8) on the same questions")
    de.add_argument("--steps", type=int, default=None, help="optimizer steps of every run (default: the config's)")
    de.add_argument("--test-split", default="test", help="split of the data set's dataset.json to score on (default test)")
    de.add_argument("--eval-samples", type=int, default=300, help="test images to score, all their questions (default 300; 0: all)")
    de.add_argument("--quiet", action="store_true", help="no progress bars")
    de.set_defaults(func=cmd_experiment_data_efficiency)

    demo = commands.add_parser("demo", help="the main job: a Shapes collection, indexed and served with the web page")
    demo.add_argument("--out", default="demo_output", help="folder for everything the demo writes (default demo_output)")
    demo.add_argument("--images", type=int, default=300, help="images in the generated collection (default 300)")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    demo.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "command", None) == "train":  # overrides may come after the flags too
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if not ("=" in e and not e.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
