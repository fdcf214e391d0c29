"""MMMU scoring: the official answer extraction and accuracy.

Reference: MMMU-Benchmark/MMMU, mmmu/utils/eval_utils.py (earlier eval/eval_utils.py:
parse_multi_choice_response, parse_open_response, eval_multi_choice, eval_open), the
aggregation of mmmu/main_eval_only.py / print_results.py, and the inference loop of
mmmu/run_llava.py (which seeds Python's `random` with 42 and parses multiple-choice
answers subject by subject). This is an independent re-implementation;
tests/test_mmmu_metric.py checks it against numbers produced by running that code on
tests/fixtures/mmmu/ and on records written in the tests.

Gold answers (`gold_answers`): a few open questions store a list of accepted answers as a
Python list literal in the parquet "answer" string ("['24/7', '3.429']"; in the validation
set validation_Math_15, validation_Geography_4, validation_Chemistry_30). The official
evaluation (main_eval_only.py with mmmu/answer_dict_val.json, where these three are JSON
lists) passes the list to eval_open / eval_multi_choice, and a response is right when it
matches any of the answers; so does this module. (main_parse_and_eval.py, which takes the
parquet string as it is, would score every response to them wrong.) An answer "?" is a
hidden one (MMMU's test split): scoring it is refused.

Multiple choice (`extract_choice`): strip each of , . ! ? ; : ' in turn from both ends of
the response (one character class after the other, so ".,A,." keeps its commas) and pad
it with a space on each side, then take the first rule that finds candidates:
  1. "(A)"-style bracketed letters;
  2. a letter standing alone between spaces (" A "), case-sensitive;
  3. only if the response has more than 5 whitespace-separated tokens: the text of an
     option occurring in the response (case-insensitive substring);
  4. none found: a letter drawn at random (`rng.choice`).
With several candidates, the one whose last occurrence starts latest wins (ties: the
earlier letter). "A." or "A)" at the start of an answer is therefore NOT recognised (it is
neither "(A)" nor " A "): unless the response is long enough for rule 3, it falls to the
random draw.

Open questions (`extract_open_answers`): the response is stripped, trailing periods are
removed and it is lower-cased; it is cut into lines; in each line the shortest text
following one of "could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ",
"result " (and "=" in the last line) is a key phrase. Key phrases (or the whole response
when there are none), plus every number found in them, are normalised: numbers (commas
removed) become floats rounded to 2 decimals, other text is lower-cased (a single
character c becomes " c" and "c "). The gold answer, normalised the same way, is correct
when it equals one of the numbers, or when a textual gold answer is a substring of a
textual prediction.

Accuracy is the share of correct questions (0..1, official scale) rounded to 3 decimals,
per subject, per MMMU domain, per subfield, and overall (instance-weighted: the mean of
subject accuracies weighted by their sizes, as upstream computes it).
"""

from __future__ import annotations

import ast
import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from multimodal_models.data.records import MultipleChoiceRecord
from multimodal_models.errors import DataFormatError

MULTIPLE_CHOICE = "multiple-choice"  # any other question_type is scored as an open question
DEFAULT_SEED = 42  # the seed of the official inference/evaluation scripts
HIDDEN_ANSWER = "?"  # the answer of every question of MMMU's test split, whose answers are not published

# MMMU's six disciplines and their subjects, in the order upstream reports them.
DOMAIN_SUBJECTS: dict[str, tuple[str, ...]] = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": (
        "Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
        "Pharmacy", "Public_Health",
    ),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": (
        "Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
        "Energy_and_Power", "Materials", "Mechanical_Engineering",
    ),
}

# ----------------------------------------------------------------------------------------
# Multiple choice
# ----------------------------------------------------------------------------------------

_EDGE_PUNCTUATION = (",", ".", "!", "?", ";", ":", "'")  # stripped one after the other
_MIN_TOKENS_FOR_OPTION_TEXT = 5  # option texts are searched only in responses longer than this


def choice_letters(n_options: int) -> list[str]:
    """The option letters MMMU uses: "A", "B", ... one per option."""
    return [chr(ord("A") + i) for i in range(n_options)]


def _latest(candidates: list[str], position) -> str:
    """The candidate whose last occurrence starts latest; the earlier letter on ties."""
    return max(candidates, key=position)


def extract_choice(response: str, options: list[str] | tuple[str, ...], rng: random.Random) -> str:
    """The option letter the official parser reads in `response` (see the module docstring).

    `rng` is used only when no candidate is found; to reproduce the official numbers pass
    one `random.Random(42)` and call this for every multiple-choice question in the
    official order (subjects alphabetically, questions in dataset order), as
    `mmmu_scores` does.
    """
    letters = choice_letters(len(options))
    if not letters:
        raise ValueError("extract_choice needs at least one option")
    text = response
    for char in _EDGE_PUNCTUATION:
        text = text.strip(char)
    padded = f" {text} "

    bracketed = [c for c in letters if f"({c})" in padded]
    if bracketed:
        return _latest(bracketed, lambda c: padded.rfind(f"({c})"))
    standalone = [c for c in letters if f" {c} " in padded]
    if standalone:
        return _latest(standalone, lambda c: padded.rfind(f" {c} "))
    if len(padded.split()) > _MIN_TOKENS_FOR_OPTION_TEXT:
        lowered = padded.lower()
        option_of = dict(zip(letters, (str(o).lower() for o in options)))
        by_text = [c for c in letters if option_of[c] in lowered]
        if by_text:
            return _latest(by_text, lambda c: lowered.rfind(option_of[c]))
    return rng.choice(letters)


# ----------------------------------------------------------------------------------------
# Open questions
# ----------------------------------------------------------------------------------------

_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_LAST_LINE_EXTRA_INDICATOR = "="  # "x = 12" counts only in the last line
_TRIVIAL_PHRASES = frozenset({":", ",", ".", "!", "?", ";", "'"})

# What counts as a number in a response.
_NUMBER_WITH_THOUSANDS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")  # 1,200 / -12,345,678
_NUMBER_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")  # 1.5e-3
_NUMBER_PLAIN = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")  # 3 / 3.14 / .5


def _key_phrases(response: str) -> list[str]:
    """The tails of the response that probably hold the answer (lower-cased)."""
    text = response.strip().strip(".").lower()
    # Upstream splits on r"\.\s(?=[A-Z])|\n" AFTER lower-casing, so only newlines split.
    lines = text.split("\n")
    phrases = []
    for i, line in enumerate(lines):
        indicators = _KEY_INDICATORS + ((_LAST_LINE_EXTRA_INDICATOR,) if i == len(lines) - 1 else ())
        shortest: str | None = None
        for indicator in indicators:
            if indicator in line:
                tail = line.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL_PHRASES:
            phrases.append(shortest)
    return phrases or [text]


def extract_numbers(text: str) -> list[str]:
    """Numbers written in `text`: with thousands separators, scientific, then plain ones."""
    return _NUMBER_WITH_THOUSANDS.findall(text) + _NUMBER_SCIENTIFIC.findall(text) + _NUMBER_PLAIN.findall(text)


def normalize_open_answer(text: str) -> list[str | float]:
    """One answer in comparable form: a float rounded to 2 decimals when `float()` accepts
    it (commas removed), else lower-cased text; a single character c gives [" c", "c "]."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        pass
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def extract_open_answers(response: str) -> list[str | float]:
    """The candidate answers the official parser reads in an open-question response.

    Key phrases and the numbers in them, normalised, without duplicates (first occurrence
    order; upstream returns them in set order, which does not affect scoring).
    """
    phrases = _key_phrases(response)
    raw = list(phrases)
    for phrase in phrases:
        raw.extend(extract_numbers(phrase))
    normalised = [value for item in raw for value in normalize_open_answer(item)]
    return list(dict.fromkeys(normalised))


def gold_answers(answer: str) -> list[str]:
    """The accepted answers of a record: the strings of a list literal ("['24/7', '3.429']",
    as MMMU stores the few questions with several right answers), else the answer itself."""
    text = answer.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            parsed = None
        if isinstance(parsed, list) and parsed and all(isinstance(item, str) for item in parsed):
            return parsed
    return [answer]


def open_answer_correct(gold: str | Sequence[str], predictions: Iterable[str | float]) -> bool:
    """Official rule (eval_open): a numeric gold must equal a predicted number; a textual gold
    must be a substring of a predicted text. `gold` may be a list of accepted answers: then
    any one of them matching is enough."""
    golds = [value for answer in ([gold] if isinstance(gold, str) else gold) for value in normalize_open_answer(answer)]
    for pred in predictions:
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in golds):
                return True
        elif pred in golds:
            return True
    return False


# ----------------------------------------------------------------------------------------
# Scoring a benchmark run
# ----------------------------------------------------------------------------------------


def subject_of(record: MultipleChoiceRecord) -> str:
    """The record's subject, or the middle of an MMMU id ("validation_Art_Theory_3" -> "Art_Theory")."""
    return record.subject or "_".join(str(record.id).split("_")[1:-1])


def _describe(ids: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def refuse_hidden_answers(records: Iterable[MultipleChoiceRecord]) -> None:
    """ValueError naming the records whose answer is hidden ("?", MMMU's test split): they cannot be scored."""
    hidden = [rec.id for rec in records if rec.answer.strip() == HIDDEN_ANSWER]
    if hidden:
        raise ValueError(
            f"{len(hidden)} record(s) have no published answer ({HIDDEN_ANSWER!r}): {_describe(hidden)}; MMMU's "
            "test answers are hidden (the organisers score the test split): score the validation or dev split"
        )


def _scored_records(
    responses: Mapping[str, str], records: list[MultipleChoiceRecord], require_all: bool
) -> list[MultipleChoiceRecord]:
    """Validate coverage and return the records to score, in the official order."""
    by_id: dict[str, MultipleChoiceRecord] = {}
    for rec in records:
        if rec.id in by_id:
            raise ValueError(f"record id {rec.id!r} appears twice")
        by_id[rec.id] = rec
    unknown = [i for i in responses if i not in by_id]
    if unknown:
        raise ValueError(f"{len(unknown)} response(s) for ids that are not in the records: {_describe(unknown)}")
    if require_all:
        missing = [i for i in by_id if i not in responses]
        if missing:
            raise ValueError(
                f"no response for {len(missing)} record(s): {_describe(missing)}; "
                "pass require_all=False to score only the answered ones"
            )
    for rid, text in responses.items():
        if not isinstance(text, str):
            raise ValueError(f"response for {rid!r} is {type(text).__name__}, expected a string")
    scored = [rec for rec in records if rec.id in responses]
    if not scored:
        raise ValueError("no record to score: the responses are empty")
    refuse_hidden_answers(scored)
    # Upstream runs subjects in alphabetical order (its table order), questions in dataset
    # order; the random fallback draws depend on this order.
    return sorted(scored, key=subject_of)


def _parse(record: MultipleChoiceRecord, response: str, rng: random.Random) -> str | list:
    if record.question_type == MULTIPLE_CHOICE:
        if not record.options:
            raise ValueError(f"multiple-choice record {record.id!r} has no options")
        return extract_choice(response, record.options, rng)
    return extract_open_answers(response)


def _is_correct(record: MultipleChoiceRecord, parsed: str | list) -> bool:
    golds = gold_answers(record.answer)
    if record.question_type == MULTIPLE_CHOICE:
        return parsed in golds  # eval_multi_choice: the letter equals one of the answers
    return open_answer_correct(golds, parsed)


def _weighted_accuracy(groups: list[tuple[float, int]]) -> float:
    """Upstream's instance-level accuracy: sum(acc * num) / sum(num), summed in order."""
    total, count = 0.0, 0
    for acc, num in groups:
        total += acc * num
        count += num
    return total / count if count else 0.0


def mmmu_scores(
    responses: Mapping[str, str],
    records: list[MultipleChoiceRecord],
    *,
    seed: int = DEFAULT_SEED,
    require_all: bool = True,
) -> dict:
    """Score raw model responses ({record id: text}) on MMMU-style records.

    Returns:
      "overall":     {"acc": 0..1 rounded to 3 decimals, "num": questions scored}
      "perSubject":  {subject: {"acc", "num"}}  (subject from the record, else from the id)
      "perDomain":   {MMMU discipline: {"acc", "num"}}, only disciplines with questions
      "perSubfield": {subfield: {"acc", "num"}}, records with a subfield only
      "predictions": {id: parsed answer} (a letter, or the list of open-answer candidates)
      "correct":     {id: bool}
      "missing":     records without a response (0 unless require_all=False)

    Multiple-choice fallbacks draw from one `random.Random(seed)` in the official order,
    so seed=42 reproduces the official numbers. A response for an unknown id is an error;
    with require_all=True so is a record without a response (upstream silently scores only
    the ids present in the output file: require_all=False does that, and counts the others
    as "missing"). A gold answer stored as a list literal is a list of accepted answers
    (`gold_answers`); a hidden answer ("?", MMMU's test split) is an error. Unlike upstream,
    subjects outside MMMU's 30 are scored, not skipped.
    """
    rng = random.Random(seed)
    predictions: dict[str, str | list] = {}
    correct: dict[str, bool] = {}
    subjects: dict[str, list[bool]] = {}
    subfields: dict[str, list[bool]] = {}
    for rec in _scored_records(responses, records, require_all):
        parsed = _parse(rec, responses[rec.id], rng)
        predictions[rec.id] = parsed
        correct[rec.id] = ok = _is_correct(rec, parsed)
        subjects.setdefault(subject_of(rec), []).append(ok)
        if rec.subfield:
            subfields.setdefault(rec.subfield, []).append(ok)

    def summary(flags: list[bool]) -> tuple[float, int]:
        return sum(flags) / len(flags), len(flags)

    per_subject = {s: summary(flags) for s, flags in subjects.items()}
    per_domain = {}
    for domain, members in DOMAIN_SUBJECTS.items():
        present = [per_subject[s] for s in members if s in per_subject]
        if present:
            per_domain[domain] = (_weighted_accuracy(present), sum(n for _, n in present))

    def rounded(acc_num: tuple[float, int]) -> dict:
        return {"acc": round(acc_num[0], 3), "num": acc_num[1]}

    overall = (_weighted_accuracy(list(per_subject.values())), len(correct))
    return {
        "overall": rounded(overall),
        "perSubject": {s: rounded(v) for s, v in per_subject.items()},
        "perDomain": {d: rounded(v) for d, v in per_domain.items()},
        "perSubfield": {s: rounded(summary(flags)) for s, flags in subfields.items()},
        "predictions": predictions,
        "correct": correct,
        "missing": sum(1 for rec in records if rec.id not in responses),
    }


# ----------------------------------------------------------------------------------------
# Predictions files
# ----------------------------------------------------------------------------------------


def read_mmmu_predictions(path: str | Path) -> dict[str, str]:
    """Read model responses: the official JSON object {id: response}, a JSON list of
    {"id", "response"} objects, or JSONL with one {"id": ..., "response": ...} per line
    (files ending in .jsonl are always read as JSONL). Errors name the file, the line or
    entry, and the field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFormatError(path, f"cannot read predictions: {exc}") from exc
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several JSON documents: JSONL without the suffix
            return _read_jsonl(path, text)
        raise DataFormatError(path, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    if isinstance(data, dict) and set(data) == {"id", "response"}:
        data = [data]  # a one-line JSONL file
    if isinstance(data, dict):
        for key, value in data.items():
            if not isinstance(value, str):
                raise DataFormatError(path, f"expected a string response, got {type(value).__name__}", record=repr(key))
        return dict(data)
    if isinstance(data, list):
        return _collect(path, ((f"entry {i}", item) for i, item in enumerate(data)))
    raise DataFormatError(path, f"expected a JSON object {{id: response}} or a list, got {type(data).__name__}")


def _read_jsonl(path: Path, text: str) -> dict[str, str]:
    def entries():
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(path, f"not valid JSON: {exc.msg} (column {exc.colno})", record=f"line {lineno}") from exc

    return _collect(path, entries())


def _collect(path: Path, entries: Iterable[tuple[str, object]]) -> dict[str, str]:
    out: dict[str, str] = {}
    where_seen: dict[str, str] = {}
    for where, item in entries:
        if not isinstance(item, dict):
            raise DataFormatError(path, f"expected an object, got {type(item).__name__}", record=where)
        for field in ("id", "response"):
            if field not in item:
                raise DataFormatError(path, "missing", record=where, field=field)
        rid, response = item["id"], item["response"]
        if not isinstance(rid, str):
            raise DataFormatError(path, f"expected a string id, got {type(rid).__name__}", record=where, field="id")
        if not isinstance(response, str):
            raise DataFormatError(
                path, f"expected a string, got {type(response).__name__}", record=where, field="response"
            )
        if rid in out:
            raise DataFormatError(path, f"id {rid!r} already given at {where_seen[rid]}", record=where, field="id")
        out[rid] = response
        where_seen[rid] = where
    return out
