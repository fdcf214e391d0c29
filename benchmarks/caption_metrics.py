"""Caption metrics: pycocoevalcap's scorers against our hand-written ones, time and numbers.

    .venv/bin/python benchmarks/caption_metrics.py [--images 5000] [--references 5]
        [--hand-written COMMIT] [--tokenizers] [--meteor]

Builds `--images` synthetic COCO-style captions (a random subject, verb, object and place
from a small grammar, so n-grams repeat across images as in COCO) with `--references`
references each, already tokenized, and scores them in the same process with:

- `pycocoevalcap`: Bleu(4), Rouge(), Cider() of the installed pycocoevalcap, called directly;
- `shipped`: `multimodal_models.evaluate.metrics.caption.bleu / rouge_l / cider_d`, what the
  package ships (since the pycocoevalcap switch, thin wrappers around the scorers above);
- `hand_written`: the same three functions from `caption.py` at commit `--hand-written`
  (default 4d99932, the last commit with our own BLEU / ROUGE-L / CIDEr-D), read with
  `git show` and imported as a module.

For each metric: seconds per implementation (best of `--repeats`), and the largest absolute
difference of the corpus and per-image scores from pycocoevalcap's.

`--tokenizers` also times tokenising every caption (references and predictions, raw text
with capitals and punctuation) with the PTB jar (our wrapper), pycocoevalcap's PTBTokenizer,
and our pure-Python imitation (the fallback without java); `--meteor` times METEOR through
our MeteorScorer and pycocoevalcap's Meteor (both run meteor-1.5.jar; start-up included).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from multimodal_models.evaluate.metrics import caption

REPOSITORY = Path(__file__).resolve().parent.parent

SUBJECTS = ["a man", "a woman", "two dogs", "a cat", "a young boy", "a group of people", "a red bus", "a horse",
            "an old woman", "a little girl", "a brown dog", "three children", "a train", "a bird", "a skier"]
VERBS = ["riding", "sitting on", "standing next to", "walking down", "looking at", "holding", "playing with",
         "running across", "parked near", "eating", "jumping over", "lying on"]
OBJECTS = ["a bike", "a bench", "the street", "a frisbee", "a large pizza", "a wooden fence", "the grass",
           "a kite", "an umbrella", "a surfboard", "a sandwich", "the snow", "a table", "a couch"]
PLACES = ["", "in the park", "on a sunny day", "near the water", "in a kitchen", "at night", "on the beach",
          "in front of a building", "with trees behind", "in the city", "next to a car"]


def sentence(rng: random.Random) -> str:
    words = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(PLACES)]
    return " ".join(w for w in words if w)


def raw_caption(rng: random.Random) -> str:
    """A sentence as people write it: capital first letter, sometimes a comma, a full stop."""
    text = sentence(rng)
    if rng.random() < 0.3:
        text = text.replace(" in ", ", in ", 1)
    return text[0].upper() + text[1:] + rng.choice([".", ".", "", " ."])


def load_hand_written(commit: str):
    """caption.py as it was at `commit`, imported under another name."""
    source = subprocess.run(
        ["git", "show", f"{commit}:multimodal_models/evaluate/metrics/caption.py"],
        cwd=REPOSITORY, capture_output=True, text=True, check=True,
    ).stdout
    folder = Path(tempfile.mkdtemp(prefix="caption-hand-written-"))
    path = folder / "caption_hand_written.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("caption_hand_written", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def best_time(function, repeats: int):
    """(best wall time in seconds, result of the last call)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def pycocoevalcap_scores(predictions: dict, references: dict) -> dict:
    """{metric: (corpus, [per image])} from pycocoevalcap's scorers."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: list(references[i]) for i in predictions}
    res = {i: [p] for i, p in predictions.items()}
    return {
        "BLEU": lambda: Bleu(4).compute_score(gts, res, verbose=0),
        "ROUGE-L": lambda: Rouge().compute_score(gts, res),
        "CIDEr-D": lambda: Cider().compute_score(gts, res),
    }


def module_scores(module, predictions: dict, references: dict) -> dict:
    return {
        "BLEU": lambda: module.bleu(predictions, references),
        "ROUGE-L": lambda: module.rouge_l(predictions, references),
        "CIDEr-D": lambda: module.cider_d(predictions, references),
    }


def as_lists(metric: str, result, ids: list) -> tuple[list[float], list[float]]:
    """(corpus scores, per-image scores) flattened, whatever the implementation returned."""
    corpus, per_image = result
    if isinstance(per_image, dict):  # ours: {image_id: score or [BLEU-1..4]}
        per_image = [per_image[i] for i in ids]
        if metric == "BLEU":
            per_image = [list(column) for column in zip(*per_image, strict=True)]
    corpus = [float(c) for c in corpus] if metric == "BLEU" else [float(corpus)]
    if metric == "BLEU":
        flat = [float(s) for column in per_image for s in column]
    else:
        flat = [float(s) for s in per_image]
    return corpus, flat


def largest_difference(a: tuple, b: tuple) -> float:
    return max(abs(x - y) for x, y in zip(a[0] + a[1], b[0] + b[1], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--references", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hand-written", default="4d99932", help="commit with our own BLEU / ROUGE-L / CIDEr-D")
    parser.add_argument("--tokenizers", action="store_true")
    parser.add_argument("--meteor", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    raw_references = {i: [raw_caption(rng) for _ in range(args.references)] for i in range(args.images)}
    raw_predictions = {i: raw_caption(rng) for i in range(args.images)}
    references = {i: [sentence(random.Random(f"{args.seed}-{i}-{k}")) for k in range(args.references)]
                  for i in range(args.images)}
    predictions = {i: sentence(random.Random(f"{args.seed}-{i}-p")) for i in range(args.images)}
    ids = list(predictions)

    implementations = {
        "pycocoevalcap": pycocoevalcap_scores(predictions, references),
        "shipped": module_scores(caption, predictions, references),
    }
    if args.hand_written:
        implementations["hand_written"] = module_scores(load_hand_written(args.hand_written), predictions, references)

    report: dict = {"images": args.images, "references_per_image": args.references, "metrics": {}}
    for metric in ("BLEU", "ROUGE-L", "CIDEr-D"):
        entry, results = {}, {}
        for name, functions in implementations.items():
            seconds, result = best_time(functions[metric], args.repeats)
            entry[f"{name}_s"] = round(seconds, 3)
            results[name] = as_lists(metric, result, ids)
        for name in results:
            if name != "pycocoevalcap":
                entry[f"{name}_max_abs_difference"] = largest_difference(results[name], results["pycocoevalcap"])
        report["metrics"][metric] = entry

    if args.tokenizers:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        captions = {i: [*raw_references[i], raw_predictions[i]] for i in ids}
        timings = {}
        timings["ours_ptb_jar_s"], (jar_tokens, _) = best_time(lambda: caption.tokenize_captions(captions, method="ptb"), 1)
        timings["ours_python_s"], (python_tokens, _) = best_time(
            lambda: caption.tokenize_captions(captions, method="python"), 1)
        coco_input = {i: [{"caption": c} for c in texts] for i, texts in captions.items()}
        timings["pycocoevalcap_ptb_s"], coco_tokens = best_time(lambda: PTBTokenizer().tokenize(coco_input), 1)
        timings["captions"] = sum(len(c) for c in captions.values())
        timings["python_equals_jar"] = python_tokens == jar_tokens
        timings["ours_jar_equals_pycocoevalcap"] = jar_tokens == coco_tokens
        report["tokenizers"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in timings.items()}

    if args.meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        gts = {i: list(references[i]) for i in ids}
        res = {i: [predictions[i]] for i in ids}

        def theirs():
            scorer = Meteor()
            try:
                return scorer.compute_score(gts, res)
            finally:
                scorer.meteor_p.kill()
                scorer.meteor_p.wait()

        ours_s, ours = best_time(lambda: caption.meteor(predictions, references), 1)
        theirs_s, their_result = best_time(theirs, 1)
        report["meteor"] = {
            "ours_s": round(ours_s, 3), "pycocoevalcap_s": round(theirs_s, 3),
            "corpus_difference": abs(ours[0] - their_result[0]),
            "per_image_max_abs_difference": max(abs(ours[1][i] - s) for i, s in zip(ids, their_result[1], strict=True)),
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
