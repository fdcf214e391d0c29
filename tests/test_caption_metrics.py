"""Captioning metrics give coco-caption's numbers (pycocoevalcap 1.2 is the reference).

BLEU, ROUGE-L and CIDEr-D call pycocoevalcap's scorers; the parity tests below check our
wrapping (ids, order, types, input checks) against the scorers called directly, and one test
checks values worked out by hand from the definitions.

Tests marked `java` run the jars bundled in pycocoevalcap. Without java they are skipped,
except under CI=true, where a missing java is a failure (CI installs Java).
"""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from multimodal_models.errors import MissingDependencyError
from multimodal_models.evaluate.metrics import caption
from multimodal_models.evaluate.metrics.caption import (
    MeteorScorer,
    bleu,
    caption_metrics,
    cider_d,
    java_available,
    meteor,
    rouge_l,
    tokenize_captions,
)

from .conftest import require_program

FIXTURES = Path(__file__).parent / "fixtures" / "captions"
TOLERANCE = 1e-6


def require_java() -> None:
    """Skip the calling test when java is missing (a laptop), but fail it in CI."""
    require_program("java", "the PTB tokenizer and METEOR jars need a Java runtime")


def load_sample(name: str) -> tuple[dict, dict]:
    """(predictions {image_id: caption}, references {image_id: [captions]}) of a fixture file."""
    images = json.loads((FIXTURES / name).read_text(encoding="utf-8"))["images"]
    return {d["image_id"]: d["prediction"] for d in images}, {d["image_id"]: d["references"] for d in images}


@pytest.fixture(scope="module")
def raw_sample() -> tuple[dict, dict]:
    return load_sample("coco_style_sample.json")


@pytest.fixture(scope="module")
def tokenized_sample() -> tuple[dict, dict]:
    """The raw sample after pycocoevalcap's PTBTokenizer (stored, so no java is needed)."""
    return load_sample("coco_style_sample_ptb_tokens.json")


@pytest.fixture(scope="module")
def meteor_jars() -> Iterator[tuple[MeteorScorer, object]]:
    """Ours and pycocoevalcap's METEOR, started together once (each jar loads for seconds)."""
    require_java()
    from pycocoevalcap.meteor.meteor import Meteor

    ours, theirs = MeteorScorer(), Meteor()
    yield ours, theirs
    ours.close()
    theirs.meteor_p.kill()
    theirs.meteor_p.wait()


def coco_scorers_without_java(gts: dict, res: dict) -> dict:
    """pycocoevalcap's BLEU, ROUGE-L and CIDEr-D: {name: (corpus, per-image list)}."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu_corpus, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
    results = {f"BLEU-{k + 1}": (bleu_corpus[k], bleu_per_image[k]) for k in range(4)}
    results["ROUGE-L"] = Rouge().compute_score(gts, res)
    results["CIDEr"] = Cider().compute_score(gts, res)
    return results


def coco_format(predictions: dict, references: dict) -> tuple[dict, dict]:
    """Our dicts in pycocoevalcap's scorer format: (gts {id: [refs]}, res {id: [caption]})."""
    return {i: list(references[i]) for i in predictions}, {i: [p] for i, p in predictions.items()}


def our_scores(predictions: dict, references: dict) -> dict:
    """Our BLEU, ROUGE-L and CIDEr-D in the layout of coco_scorers_without_java."""
    ids = list(predictions)
    bleu_corpus, bleu_per_image = bleu(predictions, references)
    results = {f"BLEU-{k + 1}": (bleu_corpus[k], [bleu_per_image[i][k] for i in ids]) for k in range(4)}
    for name, metric in (("ROUGE-L", rouge_l), ("CIDEr", cider_d)):
        corpus, per_image = metric(predictions, references)
        results[name] = (corpus, [per_image[i] for i in ids])
    return results


def assert_same_scores(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name][0] == pytest.approx(float(theirs[name][0]), abs=TOLERANCE), name
        assert ours[name][1] == pytest.approx([float(s) for s in theirs[name][1]], abs=TOLERANCE), name


# --- metric math on pre-tokenized captions (no java) -----------------------------------


def test_bleu_rouge_cider_equal_pycocoevalcap_on_pretokenized_sample(tokenized_sample):
    predictions, references = tokenized_sample
    assert len(predictions) >= 20 and all(len(refs) == 5 for refs in references.values())
    expected = coco_scorers_without_java(*coco_format(predictions, references))
    assert_same_scores(our_scores(predictions, references), expected)


def test_edge_cases_equal_pycocoevalcap_on_pretokenized_captions():
    predictions = {
        1: "",  # empty prediction
        2: "a dog",
        3: "dog dog dog dog dog",  # repeated word, clipped counts
        4: "a cat sitting on a red sofa next to a window",  # identical to a reference
        "img-5": "zürich café naïve 東京",  # unicode words, a string id
    }
    references = {
        1: ["a man riding a horse", "a person on a horse"],
        2: ["a dog runs", "the dog is running on the grass"],
        3: ["a dog", "two dogs playing"],
        4: ["a cat sitting on a red sofa next to a window", "a cat on a couch"],
        "img-5": ["a café in zürich", "people at a naïve café", "東京 street"],
        "unused": ["references of images without a prediction are ignored"],
    }
    expected = coco_scorers_without_java(*coco_format(predictions, references))
    assert_same_scores(our_scores(predictions, references), expected)
    assert bleu(predictions, references)[1][1] == [0.0] * 4
    assert rouge_l(predictions, references)[1][4] == pytest.approx(1.0)


def test_single_image_gives_pycocoevalcap_numbers_and_cider_zero():
    predictions = {7: "a red bus on a street"}
    references = {7: ["a red bus driving down a street", "a bus on the road"]}
    ours = our_scores(predictions, references)
    assert_same_scores(ours, coco_scorers_without_java(*coco_format(predictions, references)))
    assert ours["CIDEr"][0] == 0.0  # idf = log(1) - log(1): every n-gram weight is 0
    assert ours["BLEU-1"][0] > 0.5


def test_extra_references_are_ignored_including_for_cider_document_frequency(tokenized_sample):
    predictions, references = tokenized_sample
    subset = dict(list(predictions.items())[:10])
    with_extras = our_scores(subset, references)  # references hold 24 images
    exact = our_scores(subset, {i: references[i] for i in subset})
    assert with_extras == exact


def test_bleu_rouge_cider_equal_values_worked_out_by_hand():
    """The definitions in caption.py's docstrings, applied by hand to two images: checks that
    pycocoevalcap's scores come back on the right image ids, as plain floats."""
    predictions = {"x": "a b c d", 2: "c e"}
    references = {"x": ["a c e d f"], 2: ["c d"]}

    # BLEU, image x: 3 of 4 words match (a c d), no bigram does; c = 4 < r = 5.
    brevity_penalty = math.exp(1 - 5 / 4)
    corpus, per_image = bleu(predictions, references)
    assert per_image["x"][0] == pytest.approx(3 / 4 * brevity_penalty, abs=1e-9)
    assert per_image["x"][1] == pytest.approx(0.0, abs=1e-6)  # (1e-15 / 3) ** (1/2) · BP
    assert per_image[2][0] == pytest.approx(1 / 2, abs=1e-9)  # c of c e; c = r = 2
    # corpus: 4 of 6 words match, c = 6, r = 7
    assert corpus[0] == pytest.approx(4 / 6 * math.exp(1 - 7 / 6), abs=1e-9)

    # ROUGE-L: F = (1 + b²) P R / (R + b² P), b = 1.2. x: LCS a c d = 3, P = 3/4, R = 3/5.
    def f_measure(precision, recall):
        return (1 + 1.44) * precision * recall / (recall + 1.44 * precision)

    corpus, per_image = rouge_l(predictions, references)
    assert per_image == {"x": pytest.approx(f_measure(3 / 4, 3 / 5), abs=1e-12), 2: pytest.approx(0.5, abs=1e-12)}
    assert corpus == pytest.approx((f_measure(3 / 4, 3 / 5) + 0.5) / 2, abs=1e-12)
    assert all(type(score) is float for score in [corpus, *per_image.values()])

    # CIDEr-D: N = 2 images; c and d occur in both images' references, so idf(c) = idf(d) = 0,
    # every other n-gram has idf log 2. x: unigram cosine = a's weight² / (|{a,b}| · |{a,e,f}|)
    # = 1 / sqrt(2 · 3); no bigram in common; bigram lengths 3 and 4 give exp(-1 / 72).
    # Image 2: c and d weigh 0, "c e" shares no bigram with "c d": 0.
    corpus, per_image = cider_d(predictions, references)
    expected_x = 10 * (1 / math.sqrt(6)) * math.exp(-1 / 72) / 4
    assert per_image == {"x": pytest.approx(expected_x, abs=1e-12), 2: pytest.approx(0.0, abs=1e-12)}
    assert corpus == pytest.approx(expected_x / 2, abs=1e-12)
    # identical two-word captions: unigram and bigram cosines 1, no 3- or 4-grams: 10 · 2/4
    assert cider_d({1: "a b", 2: "c d"}, {1: ["a b"], 2: ["c d"]})[1] == {1: 5.0, 2: 5.0}


def test_references_without_words_give_zero_cider_and_pycocoevalcap_bleu_rouge():
    # e.g. references of punctuation only, emptied by tokenisation; pycocoevalcap's Cider
    # cannot score these (max() of no document frequencies), CIDEr-D is 0: nothing to match.
    predictions, references = {1: "a dog", 2: ""}, {1: [""], 2: ["", ""]}
    assert cider_d(predictions, references) == (0.0, {1: 0.0, 2: 0.0})
    assert rouge_l(predictions, references) == (0.5, {1: 0.0, 2: 1.0})  # "" against "": one equal empty word


def test_bleu_n_other_than_4():
    corpus, per_image = bleu({1: "a b c"}, {1: ["a b c d"]}, n=2)
    assert len(corpus) == 2 and len(per_image[1]) == 2
    with pytest.raises(ValueError, match="n must be"):
        bleu({1: "a"}, {1: ["a"]}, n=0)


# --- input validation -------------------------------------------------------------------


@pytest.mark.parametrize("metric", [bleu, rouge_l, cider_d, caption_metrics])
def test_prediction_without_references_names_the_ids(metric):
    with pytest.raises(ValueError, match=r"references are missing for 2 predicted image\(s\): \[3, 'x'\]"):
        metric({1: "a dog", 3: "a cat", "x": "a bird"}, {1: ["a dog"]})


def test_empty_reference_list_is_rejected():
    with pytest.raises(ValueError, match=r"empty reference list: \[2\]"):
        rouge_l({1: "a", 2: "b"}, {1: ["a"], 2: []})


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        ({1: ["a dog"]}, {1: ["a dog"]}, "expected one caption string, got list"),
        ({1: "a dog"}, {1: "a dog"}, "expected a list of caption strings, got str"),
        ({1: "a dog"}, {1: ["a dog", None]}, "caption 1: expected a string, got NoneType"),
        ({}, {1: ["a dog"]}, "predictions is empty"),
    ],
)
def test_malformed_inputs_get_clear_errors(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        cider_d(predictions, references)


def test_unknown_tokenizer_method_is_rejected():
    with pytest.raises(ValueError, match="method must be"):
        tokenize_captions({1: ["a"]}, method="spacy")


# --- tokenisation -----------------------------------------------------------------------


def test_python_tokenizer_equals_stored_ptb_tokens_of_the_sample(raw_sample, tokenized_sample):
    predictions, references = raw_sample
    expected_predictions, expected_references = tokenized_sample
    tokenized_references, method = tokenize_captions(references, method="python")
    tokenized_predictions, _ = tokenize_captions({i: [p] for i, p in predictions.items()}, method="python")
    assert method == "python"
    assert tokenized_references == expected_references
    assert {i: caps[0] for i, caps in tokenized_predictions.items()} == expected_predictions


# Sentences that exercise the PTB lexer's rules: clitics, abbreviations, numbers, quotes,
# brackets, dashes, ellipses, symbols, emoticons, URLs, unicode.
PTB_PROBES = [
    "He can't, won't, don't; they're we've I'm you'd she'll.",
    "Cannot gonna gotta wanna lemme gimme 'tis 'twas",
    "James' dog and the dogs' bones and John's cat; it’s don’t “smart” ‘single’",
    "Mr. Smith went to the U.S. yesterday at 3:30 p.m. It was etc. and so on. A. The end",
    "It costs $5.50 or 50% of 1,000 items & more... really?! 5 1/2 inches, ½ a pie",
    "black-and-white photo -- a man - woman and/or child w/ a 2-year-old x-ray e-mail",
    "A man (wearing a hat) sits on a [bench] {outside} <b>bold</b> a < b > c",
    "café naïve résumé — “quotes” … ellipsis ♥ ★ © ° € £ ¢ ¥ 😀 emoji 東京",
    "e-mail me at foo@bar.com or visit http://www.example.com/page now #fun @home",
    ":) ;-) :( :D =) :o x_x ^_^ <3 !!! ?!? *** ___ ==",
    "rock'n'roll o'clock O'Neil y'all ma'am '90s 1990's 80's 'em 'cause",
    "A DOG IS RUNNING!!! in the PARK...the end. . . Fin",
]


@pytest.mark.java
def test_python_tokenizer_equals_ptb_jar_on_probe_sentences():
    require_java()
    probes = {i: [text] for i, text in enumerate(PTB_PROBES)}
    from_jar, method = tokenize_captions(probes, method="ptb")
    assert method == "ptb"
    assert tokenize_captions(probes, method="python")[0] == from_jar


@pytest.mark.java
def test_ptb_tokenizer_equals_pycocoevalcap_and_stored_tokens(raw_sample, tokenized_sample):
    require_java()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    _, references = raw_sample
    ours, method = tokenize_captions(references, method="auto")
    theirs = PTBTokenizer().tokenize({i: [{"caption": r} for r in refs] for i, refs in references.items()})
    assert method == "ptb"
    assert ours == theirs == tokenized_sample[1]


@pytest.mark.java
def test_ptb_tokenizer_keeps_empty_and_multiline_captions_on_their_image():
    require_java()
    captions = {1: ["", "A dog.\nA cat."], 2: ["Line one\rline two\u2028three"], 3: [""]}
    tokenized, _ = tokenize_captions(captions, method="ptb")
    assert tokenized == {1: ["", "a dog a cat"], 2: ["line one line two three"], 3: [""]}
    assert tokenize_captions(captions, method="python")[0] == tokenized


# --- full pipeline and METEOR (java) ---------------------------------------------------


@pytest.mark.java
def test_meteor_equals_pycocoevalcap_on_pretokenized_sample_with_edge_cases(tokenized_sample, meteor_jars):
    ours, theirs = meteor_jars
    predictions, references = dict(tokenized_sample[0]), dict(tokenized_sample[1])
    predictions["empty"], references["empty"] = "", ["a dog on a bed", "a sleeping dog"]
    predictions["unicode"], references["unicode"] = "café naïve 東京", ["a café in 東京", "naïve art"]
    corpus, per_image = meteor(predictions, references, scorer=ours)
    their_corpus, their_per_image = theirs.compute_score(*coco_format(predictions, references))
    assert corpus == pytest.approx(their_corpus, abs=TOLERANCE)
    assert [per_image[i] for i in predictions] == pytest.approx(their_per_image, abs=TOLERANCE)
    assert per_image["empty"] == 0.0


@pytest.mark.java
def test_caption_metrics_equal_the_pycocoevalcap_pipeline(raw_sample, meteor_jars):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ours_meteor, theirs_meteor = meteor_jars
    predictions, references = raw_sample
    result = caption_metrics(predictions, references, meteor_scorer=ours_meteor)

    tokenizer = PTBTokenizer()  # coco-caption tokenizes references and results separately
    gts = tokenizer.tokenize({i: [{"caption": r} for r in references[i]] for i in predictions})
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in predictions.items()})
    expected = {name: float(corpus) for name, (corpus, _) in coco_scorers_without_java(gts, res).items()}
    expected["METEOR"] = theirs_meteor.compute_score(gts, res)[0]

    assert list(result) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr",
                            "num_images", "tokenizer", "notes"]
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=TOLERANCE), name
    assert result["num_images"] == 24 and result["tokenizer"] == "ptb" and result["notes"] == []
    assert json.loads(json.dumps(result)) == result


@pytest.mark.java
def test_caption_metrics_edge_cases_single_image_unicode_and_empty_prediction(meteor_jars):
    ours_meteor, _ = meteor_jars
    result = caption_metrics({"a": "Un café à Zürich 😀!"}, {"a": ["A café in Zürich.", "People at a café."]},
                             meteor_scorer=ours_meteor)
    assert result["num_images"] == 1 and result["CIDEr"] == 0.0
    assert any("single image" in note for note in result["notes"])
    assert 0 < result["METEOR"] <= 1 and 0 < result["BLEU-1"] <= 1

    empty = caption_metrics({1: "", 2: "A dog."}, {1: ["A cat."], 2: ["A dog."]}, meteor_scorer=ours_meteor)
    assert empty["num_images"] == 2 and 0 < empty["BLEU-1"] < 1 and empty["notes"] == []


# --- without java -----------------------------------------------------------------------


@pytest.fixture
def no_java_on_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert not java_available()


def test_without_java_the_python_tokenizer_is_used_meteor_is_absent_and_notes_say_why(no_java_on_path, raw_sample,
                                                                                      tokenized_sample):
    predictions, references = raw_sample
    result = caption_metrics(predictions, references)
    assert "METEOR" not in result
    assert result["tokenizer"] == "python"
    assert any(note.startswith("PTB tokenizer not used: java was not found on PATH") for note in result["notes"])
    assert "METEOR not computed: java was not found on PATH; install a Java runtime (e.g. Debian package " \
           "default-jre-headless)" in result["notes"]
    ours = our_scores(*tokenized_sample)  # the fallback gives the jar's tokens on this sample
    assert result["CIDEr"] == pytest.approx(ours["CIDEr"][0], abs=TOLERANCE)
    assert json.loads(json.dumps(result)) == result


def test_without_java_auto_tokenization_reports_the_python_fallback(no_java_on_path):
    tokenized, method = tokenize_captions({1: ["A man's (red) hat!"]})
    assert (tokenized, method) == ({1: ["a man 's -lrb- red -rrb- hat"]}, "python")


def test_without_java_explicit_requests_raise_missing_dependency(no_java_on_path):
    with pytest.raises(MissingDependencyError, match="METEOR needs java"):
        meteor({1: "a dog"}, {1: ["a dog"]})
    with pytest.raises(MissingDependencyError, match="needs java"):
        tokenize_captions({1: ["a dog"]}, method="ptb")
    with pytest.raises(MissingDependencyError, match="METEOR needs java"):
        caption_metrics({1: "a dog"}, {1: ["a dog"]}, use_meteor=True)


def test_use_meteor_false_is_noted():
    result = caption_metrics({1: "a dog"}, {1: ["a dog"], 2: ["x"]}, tokenizer="python", use_meteor=False)
    assert "METEOR" not in result and "METEOR not computed: disabled by use_meteor=False" in result["notes"]


# --- robustness -------------------------------------------------------------------------


@pytest.mark.java
def test_meteor_jar_that_cannot_start_gives_a_clear_error(monkeypatch, tmp_path):
    require_java()
    monkeypatch.setattr(caption, "_bundled_file", lambda relative: tmp_path / "missing-meteor.jar")
    scorer = MeteorScorer(timeout_s=60)
    with pytest.raises(RuntimeError, match=r"meteor-1\.5\.jar .*exit code 1.*missing-meteor\.jar"):
        scorer.score({1: "a dog"}, {1: ["a dog"]})
    scorer.close()
    with pytest.raises(RuntimeError, match="closed"):
        scorer.score({1: "a dog"}, {1: ["a dog"]})


@pytest.mark.java
def test_meteor_scorer_kills_its_jar_when_closed_or_garbage_collected():
    require_java()
    with MeteorScorer() as scorer:
        closed_process = scorer._process
    collected_process = MeteorScorer()._process  # the scorer itself is dropped at once
    gc.collect()
    assert closed_process.wait(timeout=10) is not None
    assert collected_process.wait(timeout=10) is not None


def test_module_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import multimodal_models.evaluate.metrics.caption"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               cwd=Path(__file__).parent.parent)
    assert completed.returncode == 0, completed.stderr
