"""Metrics per group of a field the data carries (`multimodal evaluate --group-by FIELD`), with the
worst group, the largest gap, and whether a gap exceeds what sampling noise explains.

A field's values come from, in this order:

- the records themselves: a VQA record's `answer_type`, `question_type`, `image_id`; an MMMU-style
  item's `subject`, `subfield`, `question_type` or a key of its `extra`;
- the annotation files the split was read from: a key of a VQA v2 annotation or question entry, a
  key of a COCO captions `images` entry, a column of a JSONL/CSV table;
- the evaluation extras that know more (`group_values(split, field)`; e.g. the Shapes world's scene
  graphs give the colour, shape and size of the objects a question names).

An item may fall in several groups (a question naming a red and a blue object is in both colour
groups) or in none (it is counted as ungrouped).

Every metric is measured per item, so that a group's figure is the same metric on the group's items
and the items' mean gives the overall figure:

| task             | item            | metrics                                                       |
|------------------|-----------------|---------------------------------------------------------------|
| vqa              | a question      | VQA accuracy (official, per question)                         |
| captions         | an image        | CIDEr-D (idf over the whole split) and ROUGE-L per image      |
| retrieval        | a caption / an image | text→image R@1 / image→text R@1 (hit or miss, %)         |
| multiple_choice  | an item         | accuracy (official answer extraction)                         |

BLEU and METEOR are corpus statistics, not means over images, and are left out.

Sampling noise: a bootstrap over items (seeded; by default 1,000 resamples of all items with
replacement, percentile intervals at 95%). Each resample recomputes every group's mean from the
items it drew, so overlapping groups and a group's complement keep their correlation. Reported:
each group's interval; its difference from the other items ("vs rest") and that difference's
interval, flagged where it excludes 0; and the interval of the largest gap (best group − worst
group, the two groups named by the full data), which "exceeds noise" where it excludes 0. With k
groups about 5% of truly equal groups are flagged by chance at 95%; the gap's interval is taken
after choosing its two groups, so it is optimistic when groups are many and small.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..data import formats
from ..data.records import MultipleChoiceRecord, VQARecord
from ..data.splits import SplitData
from ..errors import MultimodalError
from .metrics.caption import cider_d, rouge_l, tokenize_captions

RESAMPLES = 1000
LEVEL = 0.95
SEED = 0
MIN_N = 10  # a group with fewer items is reported, but neither flagged nor the worst or best: its interval means little
# record fields that are not categories
_NOT_GROUPS = frozenset({"image", "images", "answers", "captions", "referents", "evidence", "question", "options",
                         "turns", "extra", "question_id", "id"})


class GroupSource(Protocol):
    """An evaluation extra that knows a field beyond the records and files: {task: {item id: values}},
    or None where it does not know the field (or the split lacks what it needs)."""

    def group_values(self, split: SplitData, field: str) -> dict[str, dict[Any, tuple[str, ...]]] | None: ...


# --- the values of a field ------------------------------------------------------------------------


def _as_values(value) -> tuple[str, ...]:
    """A field's value as the groups it puts an item in: a scalar is one group, a list several."""
    if value is None:
        return ()
    if isinstance(value, list | tuple):
        return tuple(dict.fromkeys(str(v) for v in value if v is not None and not isinstance(v, dict | list)))
    if isinstance(value, dict):
        return ()
    return (str(value),)


def _record_value(record, field: str):
    if field in _NOT_GROUPS:
        return None
    if field in {f.name for f in fields(record)}:
        return getattr(record, field)
    if isinstance(record, MultipleChoiceRecord):
        return record.extra.get(field)
    return None


def _json(path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _vqa_file_values(path, entries_key: str, field: str) -> dict[Any, Any]:
    data = _json(path)
    return {entry["question_id"]: entry[field] for entry in data.get(entries_key, [])
            if isinstance(entry, dict) and field in entry and "question_id" in entry}


def _table_rows(path) -> list[dict]:
    file = Path(path)
    if file.suffix.lower() == ".csv":
        with open(file, newline="", encoding="utf-8-sig") as handle:
            return list(csv.DictReader(handle))
    return [json.loads(line) for line in file.read_text(encoding="utf-8-sig").splitlines() if line.strip()]


def _table_values(split: SplitData, field: str) -> dict[str, dict[Any, tuple[str, ...]]]:
    """A table column, by the ids the table reader gives its rows (VQA rows: question_id; caption rows:
    image_id, the values of all the image's rows)."""
    files = split.files
    rows = _table_rows(files.table)
    if not any(field in row for row in rows):
        return {}
    records = formats.read_table(files.table, files.images)
    if records and isinstance(records[0], VQARecord):  # one record per row, in order
        return {"vqa": {r.question_id: _as_values(row.get(field)) for r, row in zip(records, rows, strict=True)}}
    by_image: dict[Any, list] = defaultdict(list)
    images = {r.image_id: r for r in records}
    for row in rows:  # caption rows of one image share its image_id (the reader checks it)
        image_id = row.get("image_id", row.get("image"))
        match = images.get(image_id) or next((r for r in records if str(r.image_id) == str(image_id)), None)
        if match is not None:
            by_image[match.image_id].extend(_as_values(row.get(field)))
    return {"captions": {k: tuple(dict.fromkeys(v)) for k, v in by_image.items()}}


def field_values(split: SplitData, field: str, extras: tuple = ()) -> dict[str, dict[Any, tuple[str, ...]]]:
    """{task: {item id: the field's values}} for the tasks whose items carry the field: "vqa" by
    question_id, "captions" by image_id (retrieval uses the captions' values), "multiple_choice" by id."""
    found: dict[str, dict[Any, tuple[str, ...]]] = {}
    files = split.files
    if split.vqa:
        values = {r.question_id: _as_values(_record_value(r, field)) for r in split.vqa}
        if not any(values.values()) and files is not None:
            for path, key in ((files.vqa_annotations, "annotations"), (files.vqa_questions, "questions")):
                if path and Path(path).is_file():
                    raw = _vqa_file_values(path, key, field)
                    values = {r.question_id: _as_values(raw.get(r.question_id)) for r in split.vqa}
                    if any(values.values()):
                        break
        if any(values.values()):
            found["vqa"] = values
    if split.captions and files is not None and files.captions and Path(files.captions).is_file():
        images = {entry["id"]: entry.get(field) for entry in _json(files.captions).get("images", [])
                  if isinstance(entry, dict) and "id" in entry}
        values = {r.image_id: _as_values(images.get(r.image_id)) for r in split.captions}
        if any(values.values()):
            found["captions"] = values
    if split.multiple_choice:
        values = {r.id: _as_values(_record_value(r, field)) for r in split.multiple_choice}
        if any(values.values()):
            found["multiple_choice"] = values
    if files is not None and files.table and Path(files.table).is_file():
        for task, values in _table_values(split, field).items():
            if any(values.values()):
                found.setdefault(task, values)
    for extra in extras:
        give = getattr(extra, "group_values", None)
        known = give(split, field) if give is not None else None
        for task, values in (known or {}).items():
            if any(values.values()):
                found.setdefault(task, values)
    return found


def require_fields(split: SplitData, group_by: tuple[str, ...], extras: tuple = ()) -> dict[str, dict]:
    """field_values of each field, refusing a field that no item of the split carries (before the
    model runs, so that a typo fails at once)."""
    out = {}
    for field in group_by:
        out[field] = field_values(split, field, extras)
        if not out[field]:
            raise MultimodalError(f"--group-by {field}: no record, annotation file or table column of the split "
                                  f"carries {field!r} (VQA records carry answer_type and question_type; a table "
                                  "its columns; annotation files their entries' keys)")
    return out


# --- per-item scores ----------------------------------------------------------------------------------


def item_scores(results: dict, split: SplitData) -> dict[str, tuple[list, dict[str, np.ndarray], str]]:
    """{task: (item ids, {metric: per-item values}, the task whose field values the items take)} of what
    the evaluation measured; the mean of each metric's values is its overall figure."""
    out: dict[str, tuple[list, dict[str, np.ndarray], str]] = {}
    if "vqa" in results and "perQuestion" in results["vqa"]:
        ids = [r.question_id for r in split.vqa if r.question_id in results["vqa"]["perQuestion"]]
        out["vqa"] = (ids, {"accuracy": np.array([results["vqa"]["perQuestion"][i] for i in ids], dtype=float)}, "vqa")
    if "captions" in results and "predictions" in results["captions"]:
        predictions = results["captions"]["predictions"]
        ids = [r.image_id for r in split.captions if r.image_id in predictions]
        method = results["captions"].get("tokenizer", "python")
        references, _ = tokenize_captions({r.image_id: list(r.captions) for r in split.captions
                                           if r.image_id in predictions}, method=method)
        hypotheses, _ = tokenize_captions({i: [predictions[i]] for i in ids}, method=method)
        hypotheses = {i: c[0] for i, c in hypotheses.items()}
        _, cider = cider_d(hypotheses, references)
        _, rouge = rouge_l(hypotheses, references)
        out["captions"] = (ids, {"CIDEr": np.array([cider[i] for i in ids]), "ROUGE-L": np.array([rouge[i] for i in ids])},
                           "captions")
    if "retrieval" in results and "ranks" in results["retrieval"]:
        ranks = results["retrieval"]["ranks"]
        image_ids = [r.image_id for r in split.captions]
        text_ids = [r.image_id for r in split.captions for _ in r.captions]
        out["retrieval text→image"] = (text_ids, {"R@1": 100.0 * (np.asarray(ranks["text_to_image"]) <= 1)}, "captions")
        out["retrieval image→text"] = (image_ids, {"R@1": 100.0 * (np.asarray(ranks["image_to_text"]) <= 1)}, "captions")
    if "multiple_choice" in results and "correct" in results["multiple_choice"]:
        correct = results["multiple_choice"]["correct"]
        ids = [r.id for r in split.multiple_choice if r.id in correct]
        out["multiple_choice"] = (ids, {"accuracy": 100.0 * np.array([bool(correct[i]) for i in ids], dtype=float)},
                                  "multiple_choice")
    return out


# --- groups and the bootstrap ---------------------------------------------------------------------------


def _interval(samples: np.ndarray, level: float) -> list[float | None]:
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return [None, None]
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return [round(float(lo), 4), round(float(hi), 4)]


def group_table(scores: np.ndarray, memberships: list[tuple[str, ...]], *, resamples: int = RESAMPLES,
                level: float = LEVEL, seed: int = SEED, min_n: int = MIN_N) -> dict:
    """One metric per group: scores[i] of item i, which is in the groups memberships[i].

    Returns {"groups": {value: {"value", "n", "ci", "vs_rest", "vs_rest_ci", "flagged"}}, "worst",
    "best" ({"group", "value"}), "gap", "gap_ci", "gap_exceeds_noise", "ungrouped", "resamples",
    "level", "seed", "min_n"}. Groups of fewer than min_n items are listed but never flagged, worst or best
    (when no group has min_n items, all groups compete)."""
    scores = np.asarray(scores, dtype=float)
    n_items = len(scores)
    names = sorted({g for groups in memberships for g in groups})
    member = np.zeros((len(names), n_items), dtype=bool)
    index = {g: k for k, g in enumerate(names)}
    for i, groups in enumerate(memberships):
        for g in groups:
            member[index[g], i] = True
    rng = np.random.default_rng(seed)
    counts = np.zeros((resamples, n_items), dtype=np.float64)  # how often each resample drew each item
    if n_items:
        drawn = rng.integers(0, n_items, size=(resamples, n_items))
        counts = np.stack([np.bincount(row, minlength=n_items) for row in drawn]).astype(np.float64)
    weighted = counts * scores  # (R, N)
    with np.errstate(invalid="ignore", divide="ignore"):
        group_sums = weighted @ member.T.astype(float)  # (R, G)
        group_counts = counts @ member.T.astype(float)
        boot = group_sums / group_counts
        rest_sums = weighted.sum(1, keepdims=True) - group_sums
        rest_counts = counts.sum(1, keepdims=True) - group_counts
        rest = rest_sums / rest_counts
    table: dict[str, dict] = {}
    raw: dict[str, float] = {}
    for k, name in enumerate(names):
        inside = member[k]
        raw[name] = value = float(scores[inside].mean())
        entry = {"value": round(value, 4), "n": int(inside.sum()), "ci": _interval(boot[:, k], level)}
        if (~inside).any():
            entry["vs_rest"] = round(value - float(scores[~inside].mean()), 4)
            entry["vs_rest_ci"] = ci = _interval(boot[:, k] - rest[:, k], level)
            entry["flagged"] = entry["n"] >= min_n and ci[0] is not None and (ci[0] > 0 or ci[1] < 0)
        else:
            entry.update(vs_rest=None, vs_rest_ci=[None, None], flagged=False)
        table[name] = entry
    out: dict[str, Any] = {"groups": table, "ungrouped": int((~member.any(0)).sum()) if n_items else 0,
                           "resamples": resamples, "level": level, "seed": seed, "min_n": min_n}
    if table:
        large = [g for g in names if table[g]["n"] >= min_n] or names
        worst = min(large, key=lambda g: (raw[g], g))
        best = max(large, key=lambda g: (raw[g], g))
        out["worst"] = {"group": worst, "value": table[worst]["value"]}
        out["best"] = {"group": best, "value": table[best]["value"]}
        out["gap"] = round(raw[best] - raw[worst], 4)
        gap_ci = _interval(boot[:, index[best]] - boot[:, index[worst]], level) if best != worst else [0.0, 0.0]
        out["gap_ci"] = gap_ci
        out["gap_exceeds_noise"] = best != worst and gap_ci[0] is not None and gap_ci[0] > 0
    return out


def group_metrics(results: dict, split: SplitData, values: dict[str, dict[str, dict]], *,
                  resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED) -> dict:
    """{field: {task: {metric: group_table(...)}}} for every field of `values` (require_fields) and every
    task measured whose items carry the field."""
    scores = item_scores(results, split)
    out: dict[str, dict] = {}
    for field, by_task in values.items():
        out[field] = {}
        for task, (ids, metrics, source) in scores.items():
            if source not in by_task:
                continue
            memberships = [by_task[source].get(i, ()) for i in ids]
            out[field][task] = {name: group_table(v, memberships, resamples=resamples, level=level, seed=seed)
                                for name, v in metrics.items()}
    return out


def _fmt(x) -> str:
    return "–" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))


def report_lines(groups: dict) -> list[str]:
    """The report.md section: per field, per task and metric, a table of the groups."""
    if not groups:
        return []
    lines = ["## Metrics per group", ""]
    first = next((t for tasks in groups.values() for m in tasks.values() for t in m.values()), None)
    if first is not None:
        lines += [f"Each group's figure is the metric on the items of the group; an item may be in several groups. "
                  f"Intervals: bootstrap over items, {first['resamples']} resamples, {int(100 * first['level'])}%, "
                  f"seed {first['seed']}. **vs rest** is the group minus the other items; ⚠ marks a difference whose "
                  "interval excludes 0 (more than sampling noise explains). The largest gap is best − worst group, "
                  f"among the groups of at least {first['min_n']} items (smaller ones are listed, never flagged).", ""]
    for field, tasks in groups.items():
        for task, metrics in tasks.items():
            for metric, t in metrics.items():
                if not t["groups"]:
                    continue
                exceeds = "exceeds sampling noise" if t["gap_exceeds_noise"] else "within sampling noise"
                lines += [f"### {task} {metric} by {field}", "",
                          f"Worst group **{t['worst']['group']}** ({_fmt(t['worst']['value'])}); largest gap "
                          f"**{_fmt(t['gap'])}** ({t['best']['group']} − {t['worst']['group']}, interval "
                          f"{_fmt(t['gap_ci'][0])} to {_fmt(t['gap_ci'][1])}: {exceeds})"
                          + (f"; {t['ungrouped']} items in no group" if t["ungrouped"] else "") + ".", "",
                          f"| {field} | {metric} | n | interval | vs rest | interval |", "|---|---|---|---|---|---|"]
                for name, g in sorted(t["groups"].items(), key=lambda kv: kv[1]["value"]):
                    flag = " ⚠" if g["flagged"] else ""
                    lines.append(f"| {name} | {_fmt(g['value'])} | {g['n']} | {_fmt(g['ci'][0])} – {_fmt(g['ci'][1])} | "
                                 f"{_fmt(g['vs_rest'])}{flag} | {_fmt(g['vs_rest_ci'][0])} – {_fmt(g['vs_rest_ci'][1])} |")
                lines.append("")
    return lines
