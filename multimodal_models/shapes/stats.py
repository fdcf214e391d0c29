"""Statistics of a generated Shapes benchmark, and the blind baselines that guard it.

A question-only ("blind") model sees the question text and never the image. Two such
baselines are fitted on the train split and scored on the evaluation splits:

- `type_prior`: the most frequent train answer of the question's type;
- `question_prior`: the most frequent train answer of the exact question string, backing
  off to the type prior for strings never seen in training.

The stats report, per question type, the better of the two (an upper bound of what these
blind models reach). A model whose accuracy is near these figures is not using the image.
Shapes answers are unanimous (all ten human answers agree), so exact match equals the
official VQA accuracy here.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import asdict

from .questions import QUESTION_TYPES


def majority(counter: Counter) -> str:
    # ties broken alphabetically so the baseline is deterministic
    return min(counter.items(), key=lambda kv: (-kv[1], kv[0]))[0]


def entropy_bits(counter: Counter) -> float:
    total = sum(counter.values())
    return -sum(c / total * math.log2(c / total) for c in counter.values() if c)


class BlindBaseline:
    """Question-only answerers fitted on (question, question_type, answer) triples."""

    def __init__(self, examples):
        by_type: dict[str, Counter] = defaultdict(Counter)
        by_text: dict[str, Counter] = defaultdict(Counter)
        for question, question_type, answer in examples:
            by_type[question_type][answer] += 1
            by_text[question][answer] += 1
        self.type_prior = {t: majority(c) for t, c in by_type.items()}
        self.question_prior = {q: majority(c) for q, c in by_text.items()}
        self.fallback = majority(sum(by_type.values(), Counter())) if by_type else "yes"

    def predict(self, question: str, question_type: str | None, method: str = "question_prior") -> str:
        by_type = self.type_prior.get(question_type, self.fallback)
        return self.question_prior.get(question, by_type) if method == "question_prior" else by_type

    def score(self, examples) -> dict:
        """Accuracy of both methods per question type, and of the better one overall."""
        hits: dict[str, dict[str, list[bool]]] = defaultdict(lambda: {"type_prior": [], "question_prior": []})
        for question, question_type, answer in examples:
            for method in ("type_prior", "question_prior"):
                hits[question_type][method].append(self.predict(question, question_type, method) == answer)
        per_type = {}
        best_hits = total = 0
        for qtype in sorted(hits):
            accs = {m: 100 * sum(h) / len(h) for m, h in hits[qtype].items()}
            best = max(accs, key=accs.get)
            best_hits += sum(hits[qtype][best])
            total += len(hits[qtype][best])
            per_type[qtype] = {"best": round(accs[best], 2), "best_method": best, **{m: round(a, 2) for m, a in accs.items()}}
        return {"overall_best": round(100 * best_hits / total, 2) if total else None, "perQuestionType": per_type}


def _triples(items: list[dict]):
    return [(q["question"], q["question_type"], q["answer"]) for item in items for q in item["questions"]]


def compute_stats(config, per_split: dict[str, list[dict]]) -> dict:
    stats: dict = {"config": asdict(config), "splits": {}}
    for split, items in per_split.items():
        questions = [q for item in items for q in item["questions"]]
        stats["splits"][split] = {
            "images": len(items),
            "captions": sum(len(item["captions"]) for item in items),
            "questions": len(questions),
            "dialogues": len(items),
            "dialogue_turns": sum(len(item["dialogue"]) for item in items),
            "multiple_choice": sum(len(item["multiple_choice"]) for item in items),
            "objects_per_image": {str(k): v for k, v in sorted(Counter(len(i["objects"]) for i in items).items())},
            "questions_per_type": {t: sum(q["question_type"] == t for q in questions) for t in QUESTION_TYPES},
        }
    train_questions = [q for item in per_split.get("train", []) for q in item["questions"]]
    balance = {}
    for qtype in QUESTION_TYPES:
        answers = Counter(q["answer"] for q in train_questions if q["question_type"] == qtype)
        if not answers:
            continue
        top = majority(answers)
        balance[qtype] = {
            "answers": dict(sorted(answers.items())),
            "majority_answer": top,
            "majority_share": round(answers[top] / sum(answers.values()), 4),
            "entropy_bits": round(entropy_bits(answers), 3),
        }
    yes_no = Counter(q["answer"] for q in train_questions if q["answer_type"] == "yes/no")
    stats["train_answer_balance"] = balance
    stats["train_yes_share"] = round(yes_no["yes"] / sum(yes_no.values()), 4) if yes_no else None
    if train_questions:
        baseline = BlindBaseline(_triples(per_split["train"]))
        stats["blind_baseline"] = {
            "fitted_on": "train",
            "methods": {
                "type_prior": "most frequent train answer of the question type",
                "question_prior": "most frequent train answer of the exact question text (backs off to type_prior)",
            },
            **{split: baseline.score(_triples(items)) for split, items in per_split.items() if split != "train" and items},
        }
    return stats
