"""VQA v2 accuracy, computed exactly as the official evaluation code computes it.

Reference: GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py (master,
commit a013f00) with PythonHelperTools/vqaTools/vqa.py. This is an independent
re-implementation; tests/test_vqa_metric.py checks it against numbers produced by running
that code (Python 2.7, unmodified) on tests/fixtures/vqa/.

The definition, step by step, for one question with human answers h_1..h_n (n = 10):

1. Tabs and newlines become spaces and surrounding whitespace is stripped, in the
   prediction and in every human answer. Always.
2. Only if the stripped human answers are NOT all identical, the prediction and every
   human answer are normalised by `normalize_answer` (punctuation, lower case, number
   words to digits, articles, contractions). When all humans agree, nothing more is done:
   the comparison is exact and case-sensitive ("Yes" scores 0 against ten "yes", "2"
   scores 0 against ten "two"). Upstream chose this so that answers which read text in the
   image (unanimous by nature) are not altered.
3. Leave-one-out: for each i, m_i = number of humans other than i whose answer equals the
   prediction; acc_i = min(1, m_i / 3). The question's accuracy is the mean of acc_i.
   With ten humans: 0 matching -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.

Reported numbers are on a 0..100 scale rounded to `precision` decimals (official n=2):
per question round(100 * acc), overall and per answer/question type
round(100 * sum(acc) / count). Rounding follows the official script's Python 2 `round`
(exact ties go away from zero; Python 3's `round` sends them to the even digit), and sums
run left to right in question order, as upstream does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from decimal import ROUND_HALF_UP, Decimal

from multimodal_models.data.records import VQARecord

# --------------------------------------------------------------------------------------
# Normalisation tables (data of the official script, laid out here as "from to" pairs).
# --------------------------------------------------------------------------------------

# Missing-apostrophe forms and what they become. Upstream's table also holds entries
# that can never fire (capitalised keys such as "Im": lookup happens after lower-casing;
# identity entries such as "let's"); they are left out, which changes nothing.
_CONTRACTION_PAIRS = """
aint ain't            arent aren't          cant can't            couldve could've
couldnt couldn't      couldn'tve couldn't've                      couldnt've couldn't've
didnt didn't          doesnt doesn't        dont don't            hadnt hadn't
hadnt've hadn't've    hadn'tve hadn't've    hasnt hasn't          havent haven't
hed he'd              hed've he'd've        he'dve he'd've        hes he's
howd how'd            howll how'll          hows how's            isnt isn't
itd it'd              itd've it'd've        it'dve it'd've        itll it'll
maam ma'am            mightnt mightn't      mightnt've mightn't've
mightn'tve mightn't've                      mightve might've      mustnt mustn't
mustve must've        neednt needn't        notve not've          oclock o'clock
oughtnt oughtn't      ow's'at 'ow's'at      'ows'at 'ow's'at      'ow'sat 'ow's'at
shant shan't          shed've she'd've      she'dve she'd've      shouldve should've
shouldnt shouldn't    shouldnt've shouldn't've                    shouldn'tve shouldn't've
somebody'd somebodyd  somebodyd've somebody'd've                  somebody'dve somebody'd've
somebodyll somebody'll                      somebodys somebody's  someoned someone'd
someoned've someone'd've                    someone'dve someone'd've
someonell someone'll  someones someone's    somethingd something'd
somethingd've something'd've                something'dve something'd've
somethingll something'll                    thats that's          thered there'd
thered've there'd've  there'dve there'd've  therere there're      theres there's
theyd they'd          theyd've they'd've    they'dve they'd've    theyll they'll
theyre they're        theyve they've        twas 'twas            wasnt wasn't
wed've we'd've        we'dve we'd've        weve we've            werent weren't
whatll what'll        whatre what're        whats what's          whatve what've
whens when's          whered where'd        wheres where's        whereve where've
whod who'd            whod've who'd've      who'dve who'd've      wholl who'll
whos who's            whove who've          whyll why'll          whyre why're
whys why's            wont won't            wouldve would've      wouldnt wouldn't
wouldnt've wouldn't've                      wouldn'tve wouldn't've
yall y'all            yall'll y'all'll      y'allll y'all'll      yall'd've y'all'd've
y'alld've y'all'd've  y'all'dve y'all'd've  youd you'd            youd've you'd've
you'dve you'd've      youll you'll          youre you're          youve you've
"""


def _parse_pairs(table: str) -> dict[str, str]:
    words = table.split()
    return dict(zip(words[0::2], words[1::2]))


CONTRACTIONS: dict[str, str] = _parse_pairs(_CONTRACTION_PAIRS)

# Whole words replaced by digits ("none" counts as zero; nothing above ten).
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# Punctuation handled one character at a time. Apostrophes and colons are kept on
# purpose (possessives, clock times). The period has its own rule (_PERIOD).
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
)

# Digits are ASCII only: the official script ran on Python 2, where `\d` without the
# UNICODE flag means [0-9] (a Python 3 port silently widens it to every Unicode digit).
_DIGIT_COMMA_DIGIT = re.compile(r"[0-9],[0-9]")
# A period not followed by a digit ("2.5" keeps its point, "yes." loses it). Upstream's
# pattern starts with "(?!<=\d)", a mistyped look-behind that is really a look-ahead which
# always succeeds here, so it adds nothing.
_PERIOD = re.compile(r"\.(?![0-9])")
# Upstream passes re.UNICODE (== 32) where `sub` expects its count, so at most the first
# 32 such periods of an answer are removed.
_MAX_PERIODS_REMOVED = 32


def _clean_whitespace(text: str) -> str:
    """Step 1 of the definition: tabs and newlines to spaces, then strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """Upstream's punctuation rule.

    For each punctuation character p: if the ORIGINAL text contains "p " or " p", or
    contains a digit-comma-digit anywhere, every p is deleted; otherwise every p becomes
    a space ("t-shirt" -> "t shirt", "10,000" -> "10000", "1,000-2,000" -> "10002000").
    Then periods not followed by a digit are deleted (at most 32 of them).
    """
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS_REMOVED)


def process_digit_article(text: str) -> str:
    """Lower-case, split on whitespace, map number words to digits, drop articles,
    restore missing apostrophes ("dont" -> "don't"), and join with single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """The official answer normalisation: `process_punctuation` then `process_digit_article`.

    Examples: "A dog." -> "dog", "T-Shirt" -> "t shirt", "two" -> "2", "dont" -> "don't",
    "10,000" -> "10000", "2.5" -> "2.5". Newline/tab cleaning is not part of it (see
    `single_question_accuracy`), and the scorer applies it only when humans disagree.
    """
    return process_digit_article(process_punctuation(answer))


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------


def _naive_sum(values: Iterable[float]) -> float:
    """Left-to-right float sum, as Python 2's `sum` (Python 3.12+ `sum` compensates)."""
    total = 0.0
    for v in values:
        total += v
    return total


def round_half_away(value: float, precision: int) -> float:
    """Python 2's round(value, precision): correctly rounded, exact ties away from zero."""
    quantum = Decimal(1).scaleb(-precision)
    return float(Decimal(value).quantize(quantum, rounding=ROUND_HALF_UP))


def single_question_accuracy(prediction: str, human_answers: list[str] | tuple[str, ...]) -> float:
    """Accuracy (0..1, unrounded) of one predicted answer against the human answers.

    Implements steps 1-3 of the module docstring: whitespace cleaning always,
    normalisation only when the (cleaned) human answers are not all identical, then the
    mean over leave-one-out subsets of min(1, #matching other humans / 3). A record with a
    single reference answer (not VQA v2) scores normalised exact match instead.
    """
    if not human_answers:
        raise ValueError("single_question_accuracy needs at least one human answer")
    if len(human_answers) == 1:
        # Not VQA v2 (ten humans) but a single-reference dataset, e.g. a plain JSONL: the
        # leave-one-out formula would always give 0, so score exact match after normalising.
        return float(normalize_answer(_clean_whitespace(prediction)) == normalize_answer(_clean_whitespace(human_answers[0])))
    humans = [_clean_whitespace(h) for h in human_answers]
    pred = _clean_whitespace(prediction)
    if len(set(humans)) > 1:
        humans = [normalize_answer(h) for h in humans]
        pred = normalize_answer(pred)
    matches = sum(1 for h in humans if h == pred)
    # Leaving out human i leaves `matches - [h_i == pred]` matching answers.
    per_subset = [min(1, (matches - (h == pred)) / 3) for h in humans]
    return _naive_sum(per_subset) / len(per_subset)


def _index_records(records: list[VQARecord] | Mapping[object, VQARecord]) -> dict[object, VQARecord]:
    """Question id -> record, in the given order; duplicates and unanswered records are errors."""
    items = list(records.values()) if isinstance(records, Mapping) else list(records)
    index: dict[object, VQARecord] = {}
    for rec in items:
        if not isinstance(rec, VQARecord):
            raise TypeError(f"records must be VQARecord objects, got {type(rec).__name__}")
        if rec.question_id in index:
            raise ValueError(f"question_id {rec.question_id!r} appears twice in the records")
        if not rec.answers:
            raise ValueError(
                f"question_id {rec.question_id!r} has no human answers (a test split?): it cannot be scored"
            )
        index[rec.question_id] = rec
    return index


def _describe(ids: list[object], limit: int = 10) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return f"{shown}{more}"


def _check_coverage(predictions: Mapping[object, str], index: dict[object, VQARecord], require_all: bool) -> None:
    """Raise ValueError naming the offending ids, as upstream's loadRes assertion would fail."""
    unknown = [qid for qid in predictions if qid not in index]
    if unknown:
        hint = ""
        as_text = {str(q) for q in index}
        if any(str(q) in as_text for q in unknown):
            hint = " (ids are compared with their type: the string '1' is not the number 1)"
        raise ValueError(
            f"{len(unknown)} prediction(s) for question ids that are not in the annotations: "
            f"{_describe(unknown)}{hint}"
        )
    if require_all:
        missing = [qid for qid in index if qid not in predictions]
        if missing:
            raise ValueError(
                f"no prediction for {len(missing)} annotated question(s): {_describe(missing)}. "
                "The official evaluation requires an answer for every question; pass "
                "require_all=False to score only the predicted ones."
            )
    for qid, answer in predictions.items():
        if not isinstance(answer, str):
            raise ValueError(f"prediction for question_id {qid!r} is {type(answer).__name__}, expected a string")


def _grouped_mean(groups: dict[str, list[float]], precision: int) -> dict[str, float]:
    return {key: round_half_away(100 * _naive_sum(accs) / len(accs), precision) for key, accs in groups.items()}


def vqa_accuracy(
    predictions: Mapping[object, str],
    records: list[VQARecord] | Mapping[object, VQARecord],
    *,
    precision: int = 2,
    require_all: bool = True,
) -> dict:
    """VQA v2 accuracy of `predictions` ({question_id: answer}) against annotated records.

    Returns the official script's numbers under its key names (0..100, rounded to
    `precision` decimals):
      "overall"          mean accuracy over the scored questions,
      "perAnswerType"    {answer_type: mean} (records without an answer_type are left out
                         of this breakdown only),
      "perQuestionType"  {question_type: mean} (likewise),
      "perQuestion"      {question_id: accuracy} (upstream's evalQA),
      "num_questions"    how many questions were scored.

    Coverage, mirroring upstream's loadRes assertion: a prediction for a question id that
    is not in `records` is always an error naming the ids. With require_all=True (the
    official behaviour) every annotated question must have a prediction, else the error
    names the missing ids; require_all=False scores only the predicted questions (what
    upstream's evaluate(quesIds=...) does). Questions are scored in `records` order, which
    fixes the order of the float sums (use the annotation file's order for bit parity).
    """
    index = _index_records(records)
    _check_coverage(predictions, index, require_all)
    scored = [rec for qid, rec in index.items() if qid in predictions]
    if not scored:
        raise ValueError("no question to score: the predictions are empty")

    per_question: dict[object, float] = {}
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    for rec in scored:
        acc = single_question_accuracy(predictions[rec.question_id], rec.answers)
        per_question[rec.question_id] = acc
        if rec.answer_type is not None:
            by_answer_type.setdefault(rec.answer_type, []).append(acc)
        if rec.question_type is not None:
            by_question_type.setdefault(rec.question_type, []).append(acc)

    return {
        "overall": round_half_away(100 * _naive_sum(per_question.values()) / len(per_question), precision),
        "perAnswerType": _grouped_mean(by_answer_type, precision),
        "perQuestionType": _grouped_mean(by_question_type, precision),
        "perQuestion": {qid: round_half_away(100 * acc, precision) for qid, acc in per_question.items()},
        "num_questions": len(per_question),
    }


def results_to_predictions(results: list[dict]) -> dict[object, str]:
    """Turn the official results list [{"question_id": .., "answer": ..}] into {question_id: answer}.

    Unlike upstream (where a repeated question id silently keeps the last answer), a
    repeated id is an error, as is an entry without those two keys.
    """
    if not isinstance(results, list):
        raise ValueError(f"VQA results must be a list of objects, got {type(results).__name__}")
    predictions: dict[object, str] = {}
    for i, item in enumerate(results):
        if not isinstance(item, dict) or "question_id" not in item or "answer" not in item:
            raise ValueError(f"results entry {i} must be an object with 'question_id' and 'answer', got {item!r}")
        qid = item["question_id"]
        if qid in predictions:
            raise ValueError(f"results entry {i}: question_id {qid!r} already has an answer")
        predictions[qid] = item["answer"]
    return predictions
