"""`multimodal evaluate`: run a model on a benchmark split, write metrics.json, a Markdown
report and plots (accuracy per question type, recall@K curves, a grid of predictions).

The data is a dataset folder's split, annotation files in any format the readers of
`multimodal_models.data.formats` read (a JSONL/CSV table, a VQA v2 pair, COCO captions, a
Karpathy split, LLaVA conversations, MMMU parquet), or both; the report has the same form
whichever way the data came.
"""

from __future__ import annotations

import random
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import MultimodalError
from ..io import atomic_write_figure, atomic_write_json, atomic_write_text
from ..data.images import load_image
from ..data.splits import DataConfig, ImageStore, SplitData, SplitFiles, image_key, load_split, split_files
from .corruptions import SEVERITIES, Corruption, CorruptingProcessor
from .groups import RESAMPLES, group_metrics, report_lines, require_fields
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

# What to evaluate: a dataset folder (its `split`), a DataConfig (its eval split), or a split's files.
EvaluationData = str | Path | DataConfig | SplitFiles
# The SplitFiles fields that hold records to evaluate; `images` and `scenes` only help read them.
RECORD_FIELDS = ("table", "vqa_questions", "vqa_annotations", "captions", "karpathy", "dialogues", "mmmu")
FOLDER_FIELDS = ("images",)  # the others are files, except mmmu, which may be either
NOT_PATHS = ("karpathy_split", "mmmu_split")


def evaluate_model(model, data: EvaluationData, out: str | Path, *, split: str | None = None, limit: int | None = None,
                   progress: bool = True, reranker=None, extras: tuple[EvaluationExtra, ...] = (),
                   corruptions: tuple[str, ...] = (), severities: tuple[int, ...] = SEVERITIES,
                   group_by: tuple[str, ...] = (), seed: int = 0, resamples: int = RESAMPLES) -> dict[str, Any]:
    """Run `model` on every task of the data that it can do, then the extras; write metrics.json,
    report.md and plots to `out`. data: a dataset folder with dataset.json (its `split`, default
    test), a DataConfig (its eval split; `split` overrides the name) or a SplitFiles of annotation
    files. reranker (index.rerank.Reranker): for a dual encoder, also text->image retrieval with a
    multimodal LM rescoring each caption's top images.

    corruptions (names of evaluate.corruptions.CORRUPTIONS): the tasks again under each corruption at
    each of `severities`, in results["robustness"]. group_by: fields whose groups every per-item
    metric is reported for (evaluate.groups), in results["groups"]. seed: the corruptions' noise and
    the bootstrap's resamples (`resamples` of them)."""
    out = Path(out)
    config = as_data_config(data, split)
    files = check_data(config)
    split_data = first_images(load_split(config, "eval"), limit)
    groups_of = require_fields(split_data, tuple(group_by), extras) if group_by else {}  # a wrong field fails now
    for name in corruptions:
        for severity in severities:
            Corruption(name, severity)  # an unknown name or severity fails now, before the model runs
    sources = [r.image for r in split_data.captions] + [r.image for r in split_data.vqa]
    sources += [s for r in split_data.conversations for s in r.images]
    store = ImageStore(sources, model.image_processor, progress=progress, desc="images")
    results: dict[str, Any] = {"model_type": model.model_type, "data": describe_data(config),
                               # the folder's split; files alone have none, unless a Karpathy file names one
                               "split": config.eval_split if config.root else files.karpathy_split,
                               "files": {k: v for k, v in asdict(files).items() if v is not None}}
    start = time.perf_counter()
    results.update(run_tasks(model, split_data, store, progress=progress, reranker=reranker, use_meteor=java_available()))
    for extra in extras:
        extra.run(model, split_data, store, results, progress=progress)
    if group_by:
        results["groups"] = group_metrics(results, split_data, groups_of, resamples=resamples, seed=seed)
    if corruptions:
        results["robustness"] = evaluate_corruptions(model, split_data, results, tuple(corruptions), tuple(severities),
                                                     seed=seed, progress=progress)
    results["seconds"] = round(time.perf_counter() - start, 1)
    write_report(results, split_data, store, out, extras)
    return results


def run_tasks(model, split_data: SplitData, store: ImageStore, *, progress: bool = True, reranker=None,
              use_meteor: bool = False) -> dict[str, Any]:
    """Every task of the split that the model can do: {"vqa", "captions", "dialogue", "multiple_choice",
    "retrieval"}, as far as the split has their records and the model their methods."""
    results: dict[str, Any] = {}
    if hasattr(model, "answer_batch") and split_data.vqa:
        results["vqa"] = evaluate_vqa(model, split_data.vqa, store, progress=progress)
    if hasattr(model, "caption_batch") and split_data.captions:
        results["captions"] = evaluate_captions(model, split_data.captions, store, tokenizer="auto",
                                                use_meteor=use_meteor, progress=progress)
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
    return results


# --- robustness to image corruptions -------------------------------------------------------


def headline_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The one figure per task that the robustness tables follow (higher is better)."""
    out: dict[str, float] = {}
    if "vqa" in results:
        out["VQA accuracy"] = results["vqa"]["overall"]
    if "captions" in results:
        out["captions CIDEr"] = results["captions"]["CIDEr"]
    if "dialogue" in results and results["dialogue"]["turn_accuracy"] is not None:
        out["dialogue turn accuracy"] = results["dialogue"]["turn_accuracy"]
    if "multiple_choice" in results:
        out["multiple choice accuracy"] = round(100 * results["multiple_choice"]["overall"]["acc"], 2)
    if "retrieval" in results:
        out["retrieval text→image R@1"] = results["retrieval"]["text_to_image"]["R@1"]
        out["retrieval image→text R@1"] = results["retrieval"]["image_to_text"]["R@1"]
    return out


def corrupted_split(split_data: SplitData, corruption: Corruption) -> SplitData:
    """The split with the images that bypass the store (multiple-choice items, given to model.chat as
    sources) corrupted; the others are corrupted by the store's CorruptingProcessor."""
    if not split_data.multiple_choice:
        return split_data
    items = [replace(r, images=tuple(corruption.encoded(image, image_key(image)) for image in r.images))
             for r in split_data.multiple_choice]
    return replace(split_data, multiple_choice=items)


def evaluate_corruptions(model, split_data: SplitData, clean: dict[str, Any], corruptions: tuple[str, ...],
                         severities: tuple[int, ...] = SEVERITIES, *, seed: int = 0, progress: bool = True) -> dict:
    """Every task again with each image corrupted (before the model's preprocessing), for each corruption
    and severity; the headline figure of each task against its clean figure.

    Returns {"seed", "severities", "corruptions", "metrics": {metric: {"clean", "corrupted": {corruption:
    {severity: value}}, "mean": {corruption: mean over severities}, "relative": {corruption: mean over
    severities of value / clean}, "mean_corrupted", "mean_relative"}}}. mean_relative ("mean relative
    accuracy") is the mean over corruptions and severities of value / clean: 1 is no loss at all.
    METEOR is not computed under corruption (CIDEr is the captions' figure), nor reranked retrieval."""
    sources = [r.image for r in split_data.captions] + [r.image for r in split_data.vqa]
    sources += [s for r in split_data.conversations for s in r.images]
    runs: dict[str, dict[int, dict[str, float]]] = {}
    steps = [(name, severity) for name in corruptions for severity in severities]
    for name, severity in tqdm(steps, desc="corruptions", disable=not progress):
        corruption = Corruption(name, severity, seed)
        store = ImageStore(sources, CorruptingProcessor(model.image_processor, corruption), progress=False)
        results = run_tasks(model, corrupted_split(split_data, corruption), store, progress=False)
        runs.setdefault(name, {})[severity] = headline_metrics(results)
    metrics: dict[str, dict] = {}
    for metric, clean_value in headline_metrics(clean).items():
        corrupted = {name: {str(s): runs[name][s].get(metric) for s in severities} for name in corruptions}

        def ratio(value):
            return value / clean_value if clean_value else None

        relative = {name: _mean([ratio(v) for v in by_severity.values()]) for name, by_severity in corrupted.items()}
        metrics[metric] = {
            "clean": clean_value,
            "corrupted": corrupted,
            "mean": {name: _round(_mean(list(v.values()))) for name, v in corrupted.items()},
            "relative": {name: _round(r) for name, r in relative.items()},
            "mean_corrupted": _round(_mean([v for by in corrupted.values() for v in by.values()])),
            "mean_relative": _round(_mean([ratio(v) for by in corrupted.values() for v in by.values()])),
        }
    return {"seed": seed, "severities": list(severities), "corruptions": list(corruptions), "metrics": metrics}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def robustness_lines(robustness: dict) -> list[str]:
    lines = ["## Robustness to image corruptions", "",
             "Each image corrupted before the model's preprocessing (ImageNet-C's corruptions with the parameters of "
             f"its 64×64 version; seed {robustness['seed']}). **mean** is the figure's mean over the severities; "
             "**relative** the mean over severities of corrupted / clean; the **mean relative** figure (mean "
             "relative accuracy, 1 = no loss) averages corrupted / clean over every corruption and severity.", ""]
    severities = robustness["severities"]
    for metric, m in robustness["metrics"].items():
        lines += [f"### {metric}: clean {_cell(m['clean'])}, mean corrupted {_cell(m['mean_corrupted'])}, "
                  f"mean relative **{_cell(m['mean_relative'])}**", "",
                  "| corruption | " + " | ".join(f"severity {s}" for s in severities) + " | mean | relative |",
                  "|---|" + "---|" * (len(severities) + 2)]
        for name, by_severity in m["corrupted"].items():
            cells = [_cell(by_severity[str(s)]) for s in severities]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {_cell(m['mean'][name])} | {_cell(m['relative'][name])} |")
        lines.append("")
    return lines


def _cell(value) -> str:
    return "–" if value is None else f"{value:.4g}"


def _robustness_plot(path: Path, robustness: dict) -> Path:
    plt = _pyplot()
    metrics = robustness["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, (metric, m) in zip(axes[0], metrics.items()):
        xs = [0] + robustness["severities"]
        for name, by_severity in m["corrupted"].items():
            ax.plot(xs, [m["clean"]] + [by_severity[str(s)] for s in robustness["severities"]], marker="o", label=name)
        ax.set_xlabel("severity (0 = clean)")
        ax.set_xticks(xs)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("robustness to image corruptions")
    return _save(fig, path)


# --- what to evaluate ------------------------------------------------------------------


def _python_name(field: str) -> str:
    """How a Python caller names a field in error messages: as the dataclasses do."""
    return {"root": "DataConfig.root", "eval_split": "split"}.get(field, f"SplitFiles.{field}")


def evaluation_data(folder: str | Path | None = None, split: str | None = None, files: SplitFiles | None = None, *,
                    name: Callable[[str], str] = _python_name) -> DataConfig:
    """The DataConfig to evaluate: a dataset folder's split (default test), annotation files, or both
    (a file given here replaces the folder's file of the same kind). Checked at once, so that a wrong
    path fails before a model is loaded; `name` maps "root", "eval_split" and the SplitFiles fields
    to what the caller calls them in errors (the command line: its flags)."""
    if split is not None and folder is None:
        raise MultimodalError(f"{name('eval_split')} picks a split of {name('root')}; give {name('root')} DIR too, "
                              "or leave it out with annotation files")
    files = files or SplitFiles()
    if folder is not None:  # the folder's manifest paths are joined to it, so given paths must not be
        files = SplitFiles(**{k: (v if v is None or k in NOT_PATHS else str(Path(v).absolute()))
                              for k, v in asdict(files).items()})
    if folder is not None:  # a folder named here is there for its splits
        _require_manifest(folder, name)
    config = DataConfig(root=str(folder) if folder is not None else None, eval_split=split or "test", eval=files)
    check_data(config, name=name)
    return config


def as_data_config(data: EvaluationData, split: str | None = None) -> DataConfig:
    """`evaluate_model`'s data as a DataConfig."""
    if isinstance(data, DataConfig):
        return replace(data, eval_split=split) if split is not None else data
    if isinstance(data, SplitFiles):
        return evaluation_data(None, split, data)
    return evaluation_data(data, split)


def check_data(config: DataConfig, *, name: Callable[[str], str] = _python_name) -> SplitFiles:
    """The files of the config's eval split, after checking that there is something to evaluate,
    that every path exists and that the files pair up; errors name the field (`name`) and path."""
    explicit = config.eval or SplitFiles()
    if config.root is None and not any(getattr(explicit, f) for f in RECORD_FIELDS):
        flags = ", ".join(name(f) for f in RECORD_FIELDS)
        raise MultimodalError(f"nothing to evaluate: give {name('root')} DIR (a dataset folder with dataset.json) "
                              f"or annotation files ({flags})")
    if config.root is not None and not any(getattr(explicit, f) for f in RECORD_FIELDS):
        _require_manifest(config.root, name)  # else a root may be just the folder the given paths are relative to
    files = split_files(config, "eval")

    def origin(field: str) -> str:  # an explicit file by its flag; otherwise dataset.json named it
        if getattr(explicit, field) is not None:
            return name(field)
        return f"{config.root}/dataset.json (split {config.eval_split!r}, {field!r})"

    for field in (f.name for f in fields(SplitFiles)):
        path = getattr(files, field)
        if path is None or field in NOT_PATHS:
            continue
        if field in FOLDER_FIELDS:
            _check_folder(path, origin(field))
        elif not Path(path).exists():
            raise MultimodalError(f"{origin(field)} {path}: no such file")
    _check_pairs(files, origin, name)
    return files


def _require_manifest(folder: str | Path, name: Callable[[str], str]) -> None:
    _check_folder(folder, name("root"))
    if not (Path(folder) / "dataset.json").is_file():
        raise MultimodalError(f"{name('root')} {folder}: no dataset.json in it; give the annotation files themselves "
                              f"with {name('images')} DIR instead")


def _check_folder(path: str | Path, what: str) -> None:
    if not Path(path).is_dir():
        raise MultimodalError(f"{what} {path}: no such folder")


def _check_pairs(files: SplitFiles, origin: Callable[[str], str], name: Callable[[str], str]) -> None:
    """Files that only mean something together: a VQA pair, a Karpathy file and its split name."""
    if files.vqa_annotations and not files.vqa_questions:
        raise MultimodalError(f"{origin('vqa_annotations')} needs {name('vqa_questions')} FILE: "
                              "the questions its annotations answer")
    if files.vqa_questions and not files.vqa_annotations:
        raise MultimodalError(f"{origin('vqa_questions')} needs {name('vqa_annotations')} FILE: "
                              "the answers to score against")
    if files.karpathy_split and not files.karpathy:
        raise MultimodalError(f"{origin('karpathy_split')} names a split of {name('karpathy')} FILE; give it too")
    if files.mmmu_split and not files.mmmu:
        raise MultimodalError(f"{origin('mmmu_split')} names a split of {name('mmmu')} FOLDER; give it too")
    if files.karpathy and files.captions:  # the reader would take the captions and drop the Karpathy file
        raise MultimodalError(f"{origin('captions')} and {origin('karpathy')} both give the captions; keep one")


def describe_data(config: DataConfig) -> str:
    """The data as the report's title names it: the folder, and the files given beside it."""
    given = [v for k, v in asdict(config.eval or SplitFiles()).items()
             if v is not None and k not in FOLDER_FIELDS + NOT_PATHS]
    return " + ".join(([config.root] if config.root else []) + given)


def _without_predictions(value):
    if isinstance(value, dict):
        return {k: _without_predictions(v) for k, v in value.items()
                if k not in ("predictions", "perQuestion", "correct", "ranks")}
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
    if results.get("robustness", {}).get("metrics"):
        plots.append(_robustness_plot(out / "robustness.png", results["robustness"]))
    atomic_write_text(out / "report.md", markdown_report(metrics, [p.name for p in plots if p], extras))


def markdown_report(metrics: dict, plots: list[str], extras: tuple[EvaluationExtra, ...] = ()) -> str:
    split = f" ({metrics['split']})" if metrics.get("split") else ""  # annotation files alone have no split name
    lines = [f"# Evaluation: {metrics['model_type']} on {metrics['data']}{split}", ""]
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
    if "robustness" in metrics:
        lines += robustness_lines(metrics["robustness"])
    if "groups" in metrics:
        lines += report_lines(metrics["groups"])
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> Path:
    atomic_write_figure(path, fig)
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
