"""Data scarcity, measured: VQA accuracy against the number of training images.

One recipe (a VQA run config) is trained on a growing share of the training split's images,
each with all its questions (`data.train_fraction`: smaller shares are inside larger ones):

  from scratch        the recipe as it is;
  pretrained tower    the recipe with its encoder started from a dual encoder's vision tower
                      (task_options.vision_from), when one is given;
  LoRA VLM            a pretrained VLM fine-tuned with LoRA on the same questions (and only them),
                      when one is given.

Every run takes the same number of optimizer steps (the budget: small data repeats more) and
keeps its best checkpoint on the validation split, as training always does. Each is scored
with the official VQA accuracy, overall and per question type, on the test split; the blind
baseline (answers from the question alone, fitted on the same training questions) shows the
floor. results.json is written after every run, and a rerun skips the runs it records.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

from tqdm import tqdm

from .. import registry
from ..data.splits import DataConfig, SplitData, image_key, load_split
from ..io import atomic_write_figure, atomic_write_json, atomic_write_text
from ..loading import load
from ..models.lora import LoRAConfig
from ..shapes.baselines import blind_scores
from .questions import questions_only, scored_questions, vqa_scores
from ..training.config import RunConfig, dump_config, load_config, task_options
from ..training.loop import train
from ..training.vlm_task import VLMOptions

FRACTIONS = (0.01, 0.03, 0.1, 0.3, 1.0)
SCRATCH, TOWER, LORA = "from scratch", "pretrained tower", "LoRA VLM"
LORA_RANK = 8
# what a run's result depends on: a rerun reuses a recorded result whose values of these are the same
KEY_FIELDS = ("variant", "fraction", "from", "steps", "recipe", "test_split", "eval_samples")


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the experiment: a variant on a share of the training images."""

    variant: str
    fraction: float
    config: RunConfig
    key: dict  # its values of KEY_FIELDS

    @property
    def folder(self) -> Path:
        return Path(self.config.output)


def run_data_efficiency(config: RunConfig | str | Path, out: str | Path, *, fractions=FRACTIONS,
                        tower: str | None = None, vlm: str | None = None, steps: int | None = None,
                        test_split: str = "test", eval_samples: int = 300, progress: bool = True) -> dict:
    """Train and score every variant on every share; returns where the report is and the accuracies."""
    recipe = load_config(config) if isinstance(config, (str, Path)) else copy.deepcopy(config)
    out = Path(out)
    fractions = check_fractions(fractions)
    if steps is not None and steps < 1:
        raise ValueError(f"--steps: expected at least 1 optimizer step, got {steps}")
    budget = steps or recipe.train.steps
    test = load_test(recipe.data, test_split, eval_samples)
    runs = plan(recipe, out, fractions, tower=tower, vlm=vlm, steps=budget,
                extra_key={"test_split": test_split, "eval_samples": eval_samples})
    out.mkdir(parents=True, exist_ok=True)
    results = {"recipe": str(config) if isinstance(config, (str, Path)) else recipe.output, "test_split": test_split,
               "test_questions": len(test.vqa), "steps": budget, "tower": tower, "vlm": vlm,
               "data": [share_of(recipe.data, f, test) for f in fractions], "runs": []}
    recorded = previous_runs(out / "results.json")
    for run in tqdm(runs, desc="data-efficiency runs", disable=not progress, dynamic_ncols=True):
        row = recorded.get(_key_text(run.key))
        if row is None:
            row = train_and_score(run, test, progress=progress)
        results["runs"].append(row)
        write_outputs(results, out)  # after every run: an interruption loses at most the run under way
    return {"results": str(out / "results.json"), "report": str(out / "report.md"),
            "plot": str(out / "accuracy_vs_data.png"),
            "overall": {v: {_fraction_name(r["fraction"]): r["test"]["overall"] for r in results["runs"] if r["variant"] == v}
                        for v in variants(results)}}


def check_fractions(fractions) -> list[float]:
    values = sorted({float(f) for f in fractions})
    if not values or any(not 0 < f <= 1 for f in values):
        raise ValueError(f"--fractions: expected shares in (0, 1] such as 0.01,0.1,1, got {list(fractions)}")
    return values


# --- the runs -----------------------------------------------------------------------------


def plan(recipe: RunConfig, out: Path, fractions: list[float], *, tower: str | None, vlm: str | None, steps: int,
         extra_key: dict) -> list[Run]:
    """Every run, smallest share first: the first results come soonest."""
    arms = [(SCRATCH, recipe, None)]
    if tower:
        arms.append((TOWER, with_tower(recipe, tower), tower))
    if vlm:
        arms.append((LORA, lora_vlm(recipe, vlm), vlm))
    runs = []
    for fraction in fractions:
        for variant, base, source in arms:
            config = budgeted(base, steps)
            config.data.train_fraction = fraction
            config.output = str(out / "runs" / variant.replace(" ", "_") / _fraction_name(fraction))
            key = {"variant": variant, "fraction": fraction, "from": source, "steps": steps,
                   "recipe": _digest(base), **extra_key}
            runs.append(Run(variant, fraction, config, key))
    return runs


def with_tower(recipe: RunConfig, tower: str) -> RunConfig:
    """The recipe with its encoder started from a dual encoder's vision tower."""
    options_class = registry.task_class(recipe.task).Options
    if "vision_from" not in {f.name for f in dataclasses.fields(options_class)}:
        raise ValueError(f"--tower: the {recipe.task} task has no task_options.vision_from to start its encoder from")
    config = copy.deepcopy(recipe)
    config.task_options = dataclasses.replace(task_options(config, options_class), vision_from=tower)
    return config


def lora_vlm(recipe: RunConfig, vlm: str) -> RunConfig:
    """A pretrained VLM with LoRA on its decoder, trained on the recipe's questions (no captions or chats:
    the same supervision the classifier gets) with the recipe's optimizer."""
    config = copy.deepcopy(recipe)
    config.task, config.model, config.tokenizer = "vlm", {}, {}  # the VLM brings its own model and tokenizer
    config.task_options = VLMOptions(init_from=vlm, lora=LoRAConfig(rank=LORA_RANK))
    config.data = dataclasses.replace(config.data, root=None, train=questions_only(config.data, "train"),
                                      eval=questions_only(config.data, "eval"))
    return config


def budgeted(recipe: RunConfig, steps: int) -> RunConfig:
    """The recipe run to the end of `steps` steps (the budget every run gets)."""
    config = copy.deepcopy(recipe)
    settings = config.train
    if steps != settings.steps and settings.warmup >= steps:  # a shortened budget: keep some steps after warm-up
        settings.warmup = max(1, steps // 10)
    settings.steps, settings.stop_after = steps, None  # stop_after would leave the run without a model
    # the budget is given: a task that chooses a schedule from the data must keep it
    config.given_train = getattr(recipe, "given_train", frozenset(vars(settings))) | {"steps"}
    return config


def train_and_score(run: Run, test: SplitData, *, progress: bool) -> dict:
    if run.folder.exists():  # an interrupted run (its result is not recorded): start it again
        shutil.rmtree(run.folder)
    start = time.perf_counter()
    summary = train(run.config, progress=progress)
    seconds = time.perf_counter() - start
    model = load(Path(summary["model"]))
    return {**run.key, "train_seconds": round(seconds, 1), "best_validation": summary.get("best"),
            "model": summary["model"], "test": vqa_scores(model, test)}


def previous_runs(path: Path) -> dict[str, dict]:
    """The runs a previous call recorded, by key (none when there is no readable results.json)."""
    try:
        rows = json.loads(path.read_text())["runs"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return {}
    return {_key_text({k: row.get(k) for k in KEY_FIELDS}): row for row in rows if isinstance(row, dict)}


def _key_text(key: dict) -> str:
    return json.dumps({k: key.get(k) for k in KEY_FIELDS}, sort_keys=True)


def _digest(config: RunConfig) -> str:
    """What identifies a recipe: its config without where it writes and how much data it reads."""
    plain = copy.deepcopy(config)
    plain.output, plain.data.train_fraction, plain.train.steps = "", 1.0, 0
    return hashlib.sha1(dump_config(plain).encode("utf-8")).hexdigest()[:16]


def _fraction_name(fraction: float) -> str:
    return f"{fraction:g}"


def _percent(fraction: float) -> str:
    return f"{100 * fraction:g}%"


# --- the data -----------------------------------------------------------------------------


def load_test(data: DataConfig, split: str, limit: int) -> SplitData:
    """The questions about the first `limit` images of the test split (`split` in the recipe's dataset.json)."""
    if not data.root:
        raise ValueError("the recipe's data.root must be a data set folder whose dataset.json names the test split")
    return scored_questions(data.root, split, limit)


def share_of(data: DataConfig, fraction: float, test: SplitData) -> dict:
    """How much training data a share is, and what the blind baseline scores with it."""
    # the same images as the runs: each image's own name decides whether a share has it
    questions = load_split(DataConfig(train=questions_only(data, "train"), train_fraction=fraction), "train").vqa
    if not questions:
        raise ValueError("the recipe's training split has no questions: the experiment needs a VQA recipe")
    images = {image_key(r.image) for r in questions}
    return {"fraction": fraction, "images": len(images), "questions": len(questions), "blind": blind(questions, test)}


def blind(questions: list, test: SplitData) -> float:
    """VQA accuracy of answering from the question alone, with priors from these training questions."""
    return blind_scores(questions, test.vqa)["overall"]


# --- the report ---------------------------------------------------------------------------


def variants(results: dict) -> list[str]:
    return list(dict.fromkeys(r["variant"] for r in results["runs"]))


def write_outputs(results: dict, out: Path) -> None:
    atomic_write_json(out / "results.json", results, indent=2)
    atomic_write_text(out / "report.md", report(results))
    plot(results, out / "accuracy_vs_data.png")


def report(results: dict) -> str:
    names = variants(results)
    by = {(r["variant"], r["fraction"]): r for r in results["runs"]}
    lines = ["# Data efficiency", "", __doc__.strip(), "",
             f"{results['steps']} optimizer steps per run; test: {results['test_questions']} questions of the "
             f"{results['test_split']} split." + (f" Tower: {results['tower']}." if results["tower"] else "")
             + (f" VLM: {results['vlm']}." if results["vlm"] else ""), "",
             "## VQA accuracy (%)", "",
             "| share | train images | train questions | " + " | ".join(names) + " | blind |",
             "|---|---|---|" + "---|" * len(names) + "---|"]
    for share in results["data"]:
        cells = [str(by[(n, share["fraction"])]["test"]["overall"]) if (n, share["fraction"]) in by else "" for n in names]
        lines.append(f"| {_percent(share['fraction'])} | {share['images']:,} | {share['questions']:,} | "
                     + " | ".join(cells) + f" | {share['blind']} |")
    for name in names:
        rows = [r for r in results["runs"] if r["variant"] == name]
        types = sorted({t for r in rows for t in r["test"]["perQuestionType"]})
        lines += ["", f"## {name}: accuracy per question type (%)", "",
                  "| share | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
        for r in rows:
            per = r["test"]["perQuestionType"]
            lines.append(f"| {_percent(r['fraction'])} | " + " | ".join(str(per.get(t, "")) for t in types) + " |")
    lines += ["", "![accuracy against training images](accuracy_vs_data.png)"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = {s["fraction"]: s["images"] for s in results["data"]}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in variants(results):
        rows = [r for r in results["runs"] if r["variant"] == name]
        ax.plot([images[r["fraction"]] for r in rows], [r["test"]["overall"] for r in rows], marker="o", label=name)
    ax.plot([s["images"] for s in results["data"]], [s["blind"] for s in results["data"]], "k--", label="blind baseline")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))  # 100, not 10^2
    ax.set_xlabel("training images (log scale)")
    ax.set_ylabel(f"VQA accuracy on {results['test_split']} (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"accuracy against data, {results['steps']} steps per run")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    atomic_write_figure(path, fig)
