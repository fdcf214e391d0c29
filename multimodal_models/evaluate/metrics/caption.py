"""Image-captioning metrics with the numbers of the coco-caption toolkit (pycocoevalcap 1.2).

    predictions = {image_id: "a dog runs on the grass"}
    references  = {image_id: ["A dog running on grass.", "The dog is running."]}
    caption_metrics(predictions, references)
    # {"BLEU-1": ..., "BLEU-4": ..., "METEOR": ..., "ROUGE-L": ..., "CIDEr": ..., "num_images": 1,
    #  "tokenizer": "ptb", "notes": []}

Reading order: input checks → locating java and the jars bundled in pycocoevalcap →
tokenisation (Stanford PTB jar, or a pure-Python imitation of it) → BLEU → ROUGE-L →
CIDEr-D → METEOR (meteor-1.5.jar over its "-stdio" protocol) → ``caption_metrics``.

BLEU, ROUGE-L and CIDEr-D are re-implemented here in plain Python (no numpy, no torch) and
give pycocoevalcap's numbers to floating-point precision, quirks included (each quirk is
named in the docstring of the function that keeps it). Tokenisation and METEOR run the
Java programs that ship inside the installed pycocoevalcap package, so they need ``java``.

Inputs are plain dicts: predictions ``{image_id: caption}``, references
``{image_id: [caption, ...]}``. As in coco-caption, exactly the predicted images are
scored: each needs at least one reference, extra references are ignored, and the CIDEr-D
document frequencies come from the references of the scored images only.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import unicodedata
import weakref
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from multimodal_models.errors import MissingDependencyError

ImageId = Hashable
Predictions = Mapping[ImageId, str]  # one caption per image
References = Mapping[ImageId, Sequence[str]]  # one or more captions per image

# Tokens that coco-caption deletes after PTB tokenisation (pycocoevalcap's PUNCTUATIONS).
# Note what is *not* here: "-lrb-"/"-rrb-" (brackets, lowercased by -lowerCase so they no
# longer match "-LRB-"), "-lsb-"/"-rsb-", runs like "!!" or "?!", "$", "%", "&".
PTB_PUNCTUATION: frozenset[str] = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

JAVA_INSTALL_HINT = "install a Java runtime (e.g. Debian package default-jre-headless)"

# BLEU smoothing constants of coco-caption's bleu_scorer.py.
BLEU_TINY = 1e-15  # added to match counts, so that zero matches give a tiny, not zero, precision
BLEU_SMALL = 1e-9  # added to denominators (n-gram counts, reference length) to avoid division by zero

ROUGE_BETA = 1.2  # recall weight of ROUGE-L's F-measure (coco-caption's value)

CIDER_MAX_N = 4  # CIDEr-D averages the 1..4-gram similarities
CIDER_SIGMA = 6.0  # width of CIDEr-D's Gaussian length penalty
CIDER_SCALE = 10.0  # coco-caption multiplies CIDEr-D by 10

METEOR_TIMEOUT_S = 300.0  # longest wait for one answer of the METEOR jar (it loads a 60 MB paraphrase table)

_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\u2028\u2029]")  # characters the PTB lexer treats as a line end


# ----------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------


def _describe_ids(ids: Sequence[ImageId], limit: int = 10) -> str:
    """The first `limit` ids as text, with a count of the rest."""
    shown = ", ".join(repr(i) for i in ids[:limit])
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return f"[{shown}{more}]"


def _check_caption_list(where: str, captions: object) -> None:
    """Raise ValueError unless `captions` is a list/tuple of strings."""
    if isinstance(captions, str) or not isinstance(captions, Sequence):
        raise ValueError(f"{where}: expected a list of caption strings, got {type(captions).__name__}")
    for index, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise ValueError(f"{where}, caption {index}: expected a string, got {type(caption).__name__}")


def _check_inputs(predictions: Predictions, references: References) -> list[ImageId]:
    """Validate predictions against references; return the ids to score, in prediction order.

    Every predicted image needs at least one reference caption (coco-caption scores exactly
    the images of the results file); references of other images are ignored.
    """
    if not isinstance(predictions, Mapping) or not isinstance(references, Mapping):
        raise ValueError("predictions and references must be dicts: {image_id: caption} and {image_id: [captions]}")
    if not predictions:
        raise ValueError("predictions is empty: there is nothing to score")
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise ValueError(
                f"prediction for image {image_id!r}: expected one caption string, got {type(caption).__name__} "
                "(coco-caption scores exactly one caption per image)"
            )
    image_ids = list(predictions)
    missing = [i for i in image_ids if i not in references]
    if missing:
        raise ValueError(
            f"references are missing for {len(missing)} predicted image(s): {_describe_ids(missing)}; "
            "every predicted image needs reference captions"
        )
    empty = [i for i in image_ids if isinstance(references[i], Sequence) and len(references[i]) == 0]
    if empty:
        raise ValueError(
            f"{len(empty)} predicted image(s) have an empty reference list: {_describe_ids(empty)}; "
            "every predicted image needs at least one reference caption"
        )
    for image_id in image_ids:
        _check_caption_list(f"references for image {image_id!r}", references[image_id])
    return image_ids


# ----------------------------------------------------------------------------------------
# Java and the jars bundled with pycocoevalcap
# ----------------------------------------------------------------------------------------


def java_available() -> bool:
    """True when a ``java`` executable is on PATH (needed by the PTB tokenizer and METEOR)."""
    return shutil.which("java") is not None


def _java_executable(feature: str) -> str:
    """Path of ``java``, or MissingDependencyError saying which feature needs it."""
    java = shutil.which("java")
    if java is None:
        raise MissingDependencyError(f"{feature} needs java, which was not found on PATH; {JAVA_INSTALL_HINT}")
    return java


def _bundled_file(relative_path: str) -> Path:
    """A file shipped inside the installed pycocoevalcap package (found without importing it)."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "the pycocoevalcap package (which ships the PTB tokenizer and METEOR jars) is not installed; "
            "run: pip install 'pycocoevalcap>=1.2,<2'"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / relative_path
        if path.is_file():
            return path
    raise MissingDependencyError(f"pycocoevalcap is installed but {relative_path} is missing from it; reinstall it")


def _ptb_unavailable_reason() -> str | None:
    """Why the PTB jar cannot run here, or None when it can."""
    if not java_available():
        return f"java was not found on PATH; {JAVA_INSTALL_HINT}"
    try:
        _bundled_file("tokenizer/stanford-corenlp-3.4.1.jar")
    except MissingDependencyError as error:
        return str(error)
    return None


# ----------------------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------------------


def tokenize_captions(captions: Mapping[ImageId, Sequence[str]], *, method: str = "auto") -> tuple[dict, str]:
    """Tokenise captions the way coco-caption does before scoring.

    Each caption is split into Penn-Treebank tokens, lowercased, and the tokens listed in
    PTB_PUNCTUATION are dropped; the rest are joined by single spaces.

    captions: {key: [caption, ...]}. method: "ptb" runs the Stanford CoreNLP 3.4.1
    PTBTokenizer bundled with pycocoevalcap (needs java); "python" runs this module's
    imitation of it (see ``_python_ptb_tokens``); "auto" takes "ptb" when java is available
    and "python" otherwise. Returns ({key: [tokenized caption, ...]}, method actually used).

    Unlike pycocoevalcap, every line-break character inside a caption (\\r, \\v, \\f,
    U+2028, U+2029, not only \\n) is turned into a space first: pycocoevalcap lets the
    others through, the jar then sees extra lines, and captions get shifted onto the wrong
    images silently.
    """
    if method not in ("auto", "ptb", "python"):
        raise ValueError(f"method must be 'auto', 'ptb' or 'python', got {method!r}")
    if not isinstance(captions, Mapping):
        raise ValueError(f"captions must be a dict {{key: [caption, ...]}}, got {type(captions).__name__}")
    for key, texts in captions.items():
        _check_caption_list(f"captions for key {key!r}", texts)
    if method == "auto":
        method = "ptb" if _ptb_unavailable_reason() is None else "python"

    keys = [key for key, texts in captions.items() for _ in texts]
    lines = [_LINE_BREAKS.sub(" ", text) for texts in captions.values() for text in texts]
    token_lists = _ptb_jar_tokens(lines) if method == "ptb" else _python_ptb_tokens(lines)

    tokenized: dict = {key: [] for key in captions}
    for key, tokens in zip(keys, token_lists, strict=True):
        tokenized[key].append(" ".join(token for token in tokens if token not in PTB_PUNCTUATION))
    return tokenized, method


def _ptb_jar_tokens(lines: list[str]) -> list[list[str]]:
    """Tokens of each line from the Stanford PTBTokenizer jar (pycocoevalcap's command line).

    The lines are written to a UTF-8 temporary file (one caption per line) and tokenised
    with ``-preserveLines -lowerCase``, so output line i holds the tokens of caption i.
    """
    java = _java_executable("the PTB tokenizer")
    jar = _bundled_file("tokenizer/stanford-corenlp-3.4.1.jar")
    if not lines:
        return []
    with tempfile.TemporaryDirectory(prefix="ptb-tokenize-") as folder:
        text_file = Path(folder) / "captions.txt"
        text_file.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        main_class = "edu.stanford.nlp.process.PTBTokenizer"
        command = [java, "-cp", str(jar), main_class, "-preserveLines", "-lowerCase", str(text_file)]
        try:
            result = subprocess.run(command, capture_output=True, timeout=600)
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(f"the PTB tokenizer ({jar.name}) did not finish within 600 s") from error
    if result.returncode != 0:
        raise RuntimeError(
            f"the PTB tokenizer ({jar.name}) failed with exit code {result.returncode}: "
            f"{result.stderr.decode('utf-8', 'replace')[-2000:]}"
        )
    output_lines = result.stdout.decode("utf-8").split("\n")
    if output_lines and output_lines[-1] == "":
        output_lines.pop()  # the newline that ends the last line
    if len(output_lines) != len(lines):
        raise RuntimeError(f"the PTB tokenizer returned {len(output_lines)} lines for {len(lines)} captions")
    return [line.split(" ") if line else [] for line in output_lines]


# --- pure-Python imitation of the PTB tokenizer -----------------------------------------
#
# CoreNLP's PTBTokenizer is a JFlex lexer: at each position every rule is tried, the
# longest match wins (ties go to the earlier rule), and a rule may require "trailing
# context" that counts towards the match length but is not consumed. _LexRule mirrors that:
# `regex` matches token plus context, and the named group "tok" (when present) is the
# part consumed. The rules below were written from CoreNLP's documented token classes and
# checked against the 3.4.1 jar: on 34,000 generated lines (24,000 caption-like ones mixing
# clitics, quotes, brackets, abbreviations, numbers, URLs, symbols and emoji; 10,000 of
# random characters from many scripts) both gave the same tokens on every line once
# punctuation was dropped (before that, the jar also emits an extra "." after an
# abbreviation that ends a sentence and a "-" for a lone soft hyphen; both are dropped). The rules are an imitation, not
# a translation of the jar, so constructs that were not probed may still differ: phone
# numbers in other formats, abbreviations missing from the lists below, SGML tags with odd
# attributes, characters that Java's and Python's Unicode tables classify differently.


def _bmp_letter_class() -> str:
    """A regex character class of the letters (categories Lu Ll Lt Lm Lo, Java's
    Character.isLetter) of the Basic Multilingual Plane: the jar reads UTF-16 units, so
    characters beyond U+FFFF are never letters for it."""
    ranges, start = [], None
    for code in range(0x10000 + 1):
        is_letter = code < 0x10000 and chr(code).isalpha()
        if is_letter and start is None:
            start = code
        elif not is_letter and start is not None:
            ranges.append(f"\\u{start:04x}-\\u{code - 1:04x}")
            start = None
    return "[" + "".join(ranges) + "]"


_LETTER = _bmp_letter_class()
_L = rf"(?:{_LETTER}|[\u0300-\u036f\u00ad])"  # a letter, combining accent or soft hyphen
_D = r"\d"  # a decimal digit (category Nd, as Java's Character.isDigit)
_AN = rf"(?:{_LETTER}|\d)"  # a letter or digit
_APOS = r"['\u0092\u2019]"  # apostrophe: straight, CP1252 right quote, right single quote
_APOS_ANY = r"['\u0092\u2019`\u0091\u2018\u201b]"  # anything used as an apostrophe inside words
_SPACE_NL = r"[ \t\u00a0\u2000-\u200a\u3000\n]"
_WORD = rf"{_L}(?:{_L}|{_D})*(?:[.!?]{_L}(?:{_L}|{_D})*)*"  # 3.4.1 keeps "a.b" "a!b" "a?b" whole
_REDUCED_AUX = rf"{_APOS}(?:[msd]|re|ve|ll)"  # 's 'm 'd 're 've 'll
_ACRONYM = r"[a-z](?:\.[a-z])*"  # a, u.s, p.m
_SENTENCE_STARTS = (  # capitalised words after which an acronym's period also ends the sentence
    "About|According|Additionally|After|An|A|As|At|But|Earlier|He|Her|Here|However|If|In|It|Last|Many|More|"
    r"Mr\.|Ms\.|Now|Once|One|Other|Our|She|Since|So|Some|Such|That|The|Then|There|These|They|This|We|When|"
    "While|What|Yet|You"
)
# Abbreviations that keep their period. Those of the first list win over any longer word
# ("etc.s" -> "etc." "s"); those of the second only where no longer word matches.
_ABBREV_STRONG = (  # months, weekdays, US states, company words, suffixes
    "jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec|mon|tue|tues|wed|thu|thurs|fri|"
    "ala|ariz|(?-i:A)rk|calif|colo|conn|dak|(?-i:D)el|fla|ga|(?-i:I)ll|ind|kans?|ky|la|(?-i:M)ass|md|mich|minn|"
    "(?-i:M)iss|mo|mont|neb|nev|okla|(?-i:O)re|pa|penn|tenn|tex|va|vt|(?-i:W)ash|wisc?|wyo|"
    "inc|cos?|corp|pp?tys?|ltd|plc|bancorp|dept|bhd|assn|univ|intl|sys|tel|est|ext|sq|"
    r"jr|sr|bros|(?:ed|ph)\.d|blvd|rd|esq|etc|al|seq"
)
_ABBREV_WEAK = (  # titles, initials and acronyms (u.s.), a few others
    "mr|mrs|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|mt|ft|capt|ste?|"
    "ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|vs|alex|wm|jos|cie|cf|treas|invt|elec|natl|m[ft]g|"
    rf"a\.k\.a|{_ACRONYM}"
)
_ABBREV_BEFORE_NUMBER = r"ca|figs?|prop|nos?|sect?s?|arts?|paras?|bldg|pp|op|(?-i:P)t|rs"
_HYPHENATED = r"[a-z0-9][a-z0-9.,\u00ad]*(?:-(?:[a-z](?:\.[a-z])+\.|[a-z0-9\u00ad]+))+"
_EMAIL = (  # lenient: anything before "@", dot-separated parts after it
    r"(?:&lt;|<)?[a-z0-9][^ \t\n\f\r\"<>|(){}\u00a0]*@"
    r"(?:[^ \t\n\f\r\"<>|(){}.\u00a0]+\.)*[^ \t\n\f\r\"<>|(){}.\u00a0]+(?:&gt;|>)?"
)
_SGML_NAME = r"[a-z][a-z0-9_:.\-]*"
_SGML_TAG = (  # <b>  </b>  <img src="x" />  <!-- ... >
    rf"<(?:[!?][a-z\-][^>\n]*|{_SGML_NAME}(?: +{_SGML_NAME}(?: *= *(?:'[^'\n]*'|\"[^\"\n]*\"|{_SGML_NAME}))?)* */?"
    rf"|/{_SGML_NAME}) *>"
)
_QUOTE_CHARS = "`\u2018\u2019\u201a\u201b\u201c\u201d\u201e\u201f\u0091\u0092\u0093\u0094\u2039\u203a\u00ab\u00bb"
_QUOTES = rf"(?:''|[{_QUOTE_CHARS}]{{1,2}}|{_APOS})"  # longest alternative first
_SMILEY = r"[<>]?[:;=](?-i:[\-o*'])?(?-i:[()DPdpO\\{@|\[\]])"  # :)  ;-)  :D (not :o)
_NOT_SPACE_NL = r"[^ \t\u00a0\u2000-\u200a\u3000\n]"


def _latex_quotes(token: str, probably_left: bool) -> str:
    """PTB's quote normalisation: ` `` for opening quotes, ' '' for closing ones."""
    token = token.replace('"', "``" if probably_left else "''").replace("'", "`" if probably_left else "'")
    for chars, replacement in (("\u0091\u2018\u201b\u2039", "`"), ("\u0092\u2019\u203a", "'"),
                               ("\u0093\u201c\u00ab", "``"), ("\u0094\u201d\u00bb", "''")):
        token = re.sub(f"[{chars}]", replacement, token)
    return token


def _closing_quotes(token: str) -> str:
    return _latex_quotes(token, probably_left=False)


def _opening_quotes(token: str) -> str:
    return _latex_quotes(token, probably_left=True)


def _keep(token: str) -> str:
    return token


def _drop_soft_hyphens(token: str) -> str:
    return token.replace("\u00ad", "")


_CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u00a4": "$", "\u20a0": "$", "\u20ac": "$"}
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}


def _escape_parentheses(token: str) -> str:
    return token.replace("(", "-LRB-").replace(")", "-RRB-")


@dataclass(frozen=True)
class _LexRule:
    regex: str  # token plus trailing context; group "tok", when present, is the token
    normalize: Callable[[str], str | None]  # token text -> output token, None to drop it


def _rule(regex: str, normalize: Callable[[str], str | None] = _keep) -> _LexRule:
    return _LexRule(regex, normalize)


# In priority order: on equal match lengths the earlier rule wins.
_LEX_RULES: tuple[_LexRule, ...] = (
    _rule(r"(?P<tok>can)not"),  # cannot -> can not
    _rule(rf"(?P<tok>{_APOS}t)was"),  # 'twas -> 't was
    _rule(r"(?P<tok>gon|wan)na"),  # gonna -> gon na
    _rule(r"(?P<tok>got)ta"),
    _rule(r"(?P<tok>lem|gim)me"),
    _rule(rf"(?P<tok>{_APOS}t)is"),  # 'tis -> 't is
    _rule(r"c\+\+|[cf]#"),  # programming languages
    _rule(_SGML_TAG, lambda t: t.replace(" ", "\u00a0")),
    _rule(r"[\u0096\u0097\u2013\u2014\u2015]|&(?:md|mdash|ndash);", lambda t: "--"),
    _rule(r"&amp;", lambda t: "&"),
    _rule(rf"(?P<tok>{_WORD}){_REDUCED_AUX}", _drop_soft_hyphens),  # it|'s
    _rule(rf"(?P<tok>[a-z\u00ad]*[a-mo-z]\u00ad*)n{_APOS_ANY}t", _drop_soft_hyphens),  # do|n't  ca|n't
    _rule(_WORD, _drop_soft_hyphens),
    _rule(rf"{_APOS}n{_APOS}?"),  # 'n' as in rock 'n' roll
    _rule(rf"[ldj]{_APOS}|(?:dunkin|somethin|ol){_APOS}|{_APOS}(?:em|till?|cause|[2-9]0s)"),
    _rule(rf"(?-i:[A-HJ-XZn]){_APOS_ANY}{_LETTER}{{2,}}"),  # O'Neil-like names
    _rule(rf"{_LETTER}+(?-i:[aeiouyAEIOUY]){_APOS_ANY}(?-i:[aeiouA-Z]){_LETTER}*"),  # ma'am
    _rule(r"cont'd\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l"),
    _rule(rf"(?P<tok>y{_APOS}){_LETTER}"),  # y'|all
    _rule(r"https?://[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-]"),  # URL
    _rule(r"www\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-z]{2,4}(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?"),
    _rule(r"(?:[a-z0-9\-]+\.)+(?:com|net|org|edu)(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?"),
    _rule(_EMAIL),
    _rule(r"@[a-z_][a-z_0-9]*"),  # @name
    _rule(rf"#{_L}+"),  # #hashtag (letters only)
    _rule(rf"(?P<tok>{_REDUCED_AUX})[^a-z]", _closing_quotes),
    _rule(rf"(?P<tok>n{_APOS_ANY}t)[^a-z]", _closing_quotes),
    _rule(rf"{_D}{{1,2}}[-/]{_D}{{1,2}}[-/]{_D}{{2,4}}"),  # date
    _rule(rf"[-+]?{_D}*(?:[.:,\u00ad]{_D}+)+", _drop_soft_hyphens),  # 3.5  1,000  10:30
    _rule(rf"[-+]?{_D}+"),
    _rule(rf"{_D}{{1,4}}[- \u00a0]{_D}{{1,4}}/{_D}{{1,4}}", lambda t: t.replace(" ", "\u00a0")),  # 5 1/2
    _rule(rf"{_D}{{1,4}}/{_D}{{1,4}}"),
    _rule(r"[\u00bc\u00bd\u00be\u2153-\u215e]", lambda t: _FRACTIONS.get(t, t)),
    _rule(r"-(?:rrb|lrb|rcb|lcb|rsb|lsb)-|(?:pro|anti)-"),
    _rule(r"[a-z0-9]+(?:-[a-z]+){0,2}(?:\\?/[a-z0-9]+(?:-[a-z]+){0,2}){1,2}"),  # and/or  w/o (ASCII only)
    _rule(r"(?-i:[A-Z]*)\$|#"),  # $  US$  #
    _rule(r"[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]",
          lambda t: _CURRENCY.get(t, t)),  # currency signs
    # A one-letter "acronym" before a sentence start is a letter followed by a full stop.
    _rule(rf"(?P<tok>[a-z])\.{_SPACE_NL}+(?-i:{_SENTENCE_STARTS})(?:{_SPACE_NL}|[?!])"),
    _rule(rf"(?P<tok>(?:{_ABBREV_BEFORE_NUMBER})\.){_SPACE_NL}?{_D}"),  # no. 5
    _rule(rf"(?P<tok>(?:{_ABBREV_STRONG})\.)(?s:.{{0,2}})"),  # etc.  jan.  (the context makes it win)
    _rule(rf"(?:{_ABBREV_WEAK})\."),  # mr.  u.s.
    _rule(rf"(?P<tok>{_APOS}{_D}{_D}){_SPACE_NL}"),  # '90
    _rule(rf"(?P<tok>{_WORD}\.)[,;:]", _drop_soft_hyphens),
    _rule(r"(?:\(\d{3}\)[ \u00a0]?|\d{3}[- \u00a0.])\d{3}[- \u00a0.]\d{4}",
          lambda t: _escape_parentheses(t.replace(" ", "\u00a0"))),  # phone number
    _rule(r'(?P<tok>"|&quot;)[a-z0-9$]', _opening_quotes),
    _rule(r'"|&quot;', _closing_quotes),
    _rule(r"[+%&~^|\\\u2030\u2031]"),
    _rule(rf"(?P<tok>{_SMILEY})(?:[^a-z0-9]|$)", _escape_parentheses),
    _rule(r"[\^x=~<>\-']_[\^x=~<>\-']"),  # x_x ^_^
    _rule(r"<<|>>|<|>"),
    _rule(r"[()\[\]{}]", lambda t: _BRACKETS[t]),
    _rule(r"-+", lambda t: "--" if 3 <= len(t) <= 4 else t),
    _rule(r"\.{3,}|[\u0085\u2026]|\.(?:[ \u00a0]\.){2,}", lambda t: "..."),  # ellipsis
    _rule(r"@+|#+|_+|\*+|(?:\\\*){1,3}|="),
    _rule(r"[,;:]|[?!]+|[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa]|/"),
    _rule(_HYPHENATED, _drop_soft_hyphens),  # 2-year-old (ASCII only)
    _rule(rf"(?P<tok>{_HYPHENATED}\.)[,;:]", _drop_soft_hyphens),
    _rule(rf"(?:[dol]{_APOS_ANY}{_AN})?{_AN}+(?:[-_\u058a\u2010\u2011](?:[dol]{_APOS_ANY}{_AN})?{_AN}+)*"),  # o'clock
    _rule(rf"(?P<tok>(?:[dol]{_APOS_ANY}{_AN})?{_AN}+(?:[-_\u058a\u2010\u2011](?:[dol]{_APOS_ANY}{_AN})?{_AN}+)*\.)[,;:]"),
    _rule(r"(?-i:[A-Z]+(?:[+&][A-Z]+)+)"),  # AT&T
    _rule(rf"(?P<tok>')[a-z]{_NOT_SPACE_NL}", _opening_quotes),  # 'quoted -> ` quoted
    _rule(_REDUCED_AUX, _closing_quotes),
    _rule(rf"n{_APOS_ANY}t", _closing_quotes),
    _rule(_QUOTES, _closing_quotes),
)

_SKIPPED = re.compile(r"[ \t\n\u00a0\u2000-\u200b\u200e\u200f\u3000\ufeff\x00]+")  # spaces, invisible marks


def _lone_character_token(char: str) -> str | None:
    """What PTB makes of a character no rule matched: symbols and punctuation of the Basic
    Multilingual Plane stand alone; controls, unassigned code points, marks and anything
    beyond U+FFFF (emoji) are deleted (the jar logs them as "Untokenizable")."""
    if ord(char) > 0xFFFF:
        return None
    category = unicodedata.category(char)
    return char if category[0] in "SPLN" else None


@functools.cache
def _compiled_lex_rules() -> tuple[tuple[re.Pattern[str], Callable[[str], str | None]], ...]:
    """The rules compiled (case-insensitive, like the jar's lexer); done on first use, as it
    takes a noticeable fraction of a second."""
    return tuple((re.compile(rule.regex, re.IGNORECASE), rule.normalize) for rule in _LEX_RULES)


def _longest_match(text: str, position: int) -> tuple[int, str | None] | None:
    """(characters consumed, output token or None) of the winning rule at `position`."""
    best_length, best = 0, None
    for pattern, normalize in _compiled_lex_rules():
        match = pattern.match(text, position)
        if match is not None and match.end() - position > best_length:
            best_length, best = match.end() - position, (match, normalize)
    if best is None:
        return None
    match, normalize = best
    token = match.groupdict().get("tok") or match.group(0)
    return len(token), normalize(token)


def _python_ptb_tokens(lines: list[str]) -> list[list[str]]:
    """Tokens of each line from the pure-Python imitation of PTBTokenizer -lowerCase.

    Like the jar, the lines are lexed as one text, so a token's trailing context may reach
    into the next line (which changes nothing once punctuation is dropped).
    """
    text = "".join(line + "\n" for line in lines)
    tokens_per_line: list[list[str]] = [[] for _ in lines]
    line_index, position = 0, 0
    while position < len(text):
        skipped = _SKIPPED.match(text, position)
        if skipped:
            line_index += skipped.group(0).count("\n")
            position = skipped.end()
            continue
        winner = _longest_match(text, position)
        if winner is None:
            consumed, token = 1, _lone_character_token(text[position])
        else:
            consumed, token = winner
        if token:
            tokens_per_line[line_index].append(token.lower())
        position += consumed
    return tokens_per_line


# ----------------------------------------------------------------------------------------
# n-gram helpers
# ----------------------------------------------------------------------------------------


def _ngram_counts(words: Sequence[str], max_n: int) -> Counter[tuple[str, ...]]:
    """Counts of every 1..max_n-gram of `words` (tuples of words as keys)."""
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, max_n + 1):
        for start in range(len(words) - n + 1):
            counts[tuple(words[start:start + n])] += 1
    return counts


# ----------------------------------------------------------------------------------------
# BLEU
# ----------------------------------------------------------------------------------------


@dataclass
class _BleuStatistics:
    """What BLEU needs from one image (or, summed, from the corpus)."""

    hypothesis_length: int
    reference_length: int  # length of the reference closest in length to the hypothesis
    matches: list[int]  # matches[k]: clipped (k+1)-gram matches
    totals: list[int]  # totals[k]: (k+1)-grams in the hypothesis


def _closest_reference_length(hypothesis_length: int, reference_lengths: Sequence[int]) -> int:
    """The reference length nearest the hypothesis length; on a tie, the shorter one."""
    return min(reference_lengths, key=lambda length: (abs(length - hypothesis_length), length))


def _bleu_statistics(hypothesis: str, references: Sequence[str], max_n: int) -> _BleuStatistics:
    """Clipped n-gram matches: each hypothesis n-gram counts at most as often as it occurs
    in the single reference where it occurs most."""
    words = hypothesis.split()
    reference_words = [reference.split() for reference in references]
    max_reference_counts: Counter[tuple[str, ...]] = Counter()
    for ref in reference_words:
        max_reference_counts |= _ngram_counts(ref, max_n)  # |= keeps the maximum count
    matches = [0] * max_n
    for ngram, count in _ngram_counts(words, max_n).items():
        matches[len(ngram) - 1] += min(count, max_reference_counts[ngram])
    return _BleuStatistics(
        hypothesis_length=len(words),
        reference_length=_closest_reference_length(len(words), [len(ref) for ref in reference_words]),
        matches=matches,
        totals=[max(0, len(words) - k) for k in range(max_n)],
    )


def _bleu_from_statistics(stats: _BleuStatistics) -> list[float]:
    """BLEU-1..n = BP · (Π_{k≤n} p_k)^(1/n) with p_k = (matches_k + 1e-15) / (totals_k + 1e-9)
    and brevity penalty BP = exp(1 − r/c) when c < r (c, r: hypothesis and reference lengths,
    as ratio (c + 1e-15)/(r + 1e-9)), else 1. The constants are coco-caption's: they make a
    precision with no match tiny rather than zero, so per-image scores are never exactly 0
    for a non-empty hypothesis."""
    scores, product = [], 1.0
    for k, (matched, total) in enumerate(zip(stats.matches, stats.totals, strict=True)):
        product *= (matched + BLEU_TINY) / (total + BLEU_SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    length_ratio = (stats.hypothesis_length + BLEU_TINY) / (stats.reference_length + BLEU_SMALL)
    if length_ratio < 1:
        brevity_penalty = math.exp(1 - 1 / length_ratio)
        scores = [score * brevity_penalty for score in scores]
    return scores


def bleu(predictions: Predictions, references: References, n: int = 4) -> tuple[list[float], dict]:
    """Corpus BLEU-1..n and per-image BLEU-1..n of tokenized captions, as coco-caption's Bleu(n).

    Words are whitespace-separated. The corpus score sums matches, n-gram totals, hypothesis
    lengths and (per-image closest) reference lengths over all images before applying the
    formula of ``_bleu_from_statistics``; it is not the mean of the per-image scores.
    Returns ([BLEU-1, ..., BLEU-n], {image_id: [BLEU-1, ..., BLEU-n]}).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    image_ids = _check_inputs(predictions, references)
    per_image_stats = {i: _bleu_statistics(predictions[i], references[i], n) for i in image_ids}
    corpus_stats = _BleuStatistics(
        hypothesis_length=sum(s.hypothesis_length for s in per_image_stats.values()),
        reference_length=sum(s.reference_length for s in per_image_stats.values()),
        matches=[sum(s.matches[k] for s in per_image_stats.values()) for k in range(n)],
        totals=[sum(s.totals[k] for s in per_image_stats.values()) for k in range(n)],
    )
    per_image = {i: _bleu_from_statistics(stats) for i, stats in per_image_stats.items()}
    return _bleu_from_statistics(corpus_stats), per_image


# ----------------------------------------------------------------------------------------
# ROUGE-L
# ----------------------------------------------------------------------------------------


def _longest_common_subsequence_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common (not necessarily contiguous) subsequence of two word lists."""
    previous = [0] * (len(b) + 1)
    for word_a in a:
        current = [0]
        for j, word_b in enumerate(b):
            current.append(previous[j] + 1 if word_a == word_b else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _rouge_l_single(hypothesis: str, references: Sequence[str], beta: float = ROUGE_BETA) -> float:
    """ROUGE-L of one hypothesis: F_β = (1+β²)·P·R / (R + β²·P), where P is the best
    LCS/len(hypothesis) and R the best LCS/len(reference) over the references, each
    maximised on its own (they may come from different references); 0 when P or R is 0.

    Words are split on single spaces exactly like coco-caption (``str.split(" ")``), so an
    empty caption is one empty word: an empty hypothesis scores 1.0 against an empty
    reference and never divides by zero.
    """
    hypothesis_words = hypothesis.split(" ")
    precisions, recalls = [], []
    for reference in references:
        reference_words = reference.split(" ")
        lcs = _longest_common_subsequence_length(reference_words, hypothesis_words)
        precisions.append(lcs / len(hypothesis_words))
        recalls.append(lcs / len(reference_words))
    precision, recall = max(precisions), max(recalls)
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def rouge_l(predictions: Predictions, references: References) -> tuple[float, dict]:
    """Mean ROUGE-L (β = 1.2) of tokenized captions, and {image_id: ROUGE-L}; as coco-caption's Rouge()."""
    image_ids = _check_inputs(predictions, references)
    per_image = {i: _rouge_l_single(predictions[i], references[i]) for i in image_ids}
    return sum(per_image.values()) / len(per_image), per_image


# ----------------------------------------------------------------------------------------
# CIDEr-D
# ----------------------------------------------------------------------------------------


@dataclass
class _TfIdfVector:
    """One caption as tf-idf weights of its n-grams, split by n-gram order."""

    weights: list[dict[tuple[str, ...], float]]  # weights[k]: (k+1)-gram -> tf · idf
    norms: list[float]  # Euclidean norm of each weights[k]
    length: int  # coco-caption's caption length: its number of *bigrams* (see cider_d)


def _tf_idf_vector(
    counts: Counter[tuple[str, ...]], document_frequency: Counter[tuple[str, ...]], log_num_images: float
) -> _TfIdfVector:
    """tf-idf with tf = raw n-gram count and idf = log(N) − log(max(1, df))."""
    weights: list[dict[tuple[str, ...], float]] = [{} for _ in range(CIDER_MAX_N)]
    for ngram, count in counts.items():
        idf = log_num_images - math.log(max(1.0, document_frequency[ngram]))
        weights[len(ngram) - 1][ngram] = count * idf
    norms = [math.sqrt(sum(w * w for w in order.values())) for order in weights]
    bigram_count = sum(count for ngram, count in counts.items() if len(ngram) == 2)
    return _TfIdfVector(weights, norms, bigram_count)


def _cider_d_similarity(hypothesis: _TfIdfVector, reference: _TfIdfVector) -> list[float]:
    """Per n-gram order: clipped cosine Σ_g min(h_g, r_g)·r_g / (‖h‖·‖r‖), times the length
    penalty exp(−(len_h − len_r)² / (2σ²))."""
    length_penalty = math.exp(-((hypothesis.length - reference.length) ** 2) / (2 * CIDER_SIGMA**2))
    similarities = []
    for k in range(CIDER_MAX_N):
        reference_weights = reference.weights[k]
        dot = sum(min(h, reference_weights.get(g, 0.0)) * reference_weights.get(g, 0.0)
                  for g, h in hypothesis.weights[k].items())
        if hypothesis.norms[k] != 0 and reference.norms[k] != 0:
            dot /= hypothesis.norms[k] * reference.norms[k]
        similarities.append(dot * length_penalty)
    return similarities


def cider_d(predictions: Predictions, references: References) -> tuple[float, dict]:
    """Mean CIDEr-D of tokenized captions, and {image_id: CIDEr-D}; as coco-caption's Cider().

    CIDEr-D(i) = 10 · (1/m) Σ_j (1/4) Σ_{n=1..4} sim_n(hypothesis_i, reference_ij), with sim_n
    from ``_cider_d_similarity`` on tf-idf vectors (``_tf_idf_vector``), σ = 6. The document
    frequency df(g) is the number of scored images whose references contain n-gram g, and
    N is the number of scored images, so scores depend on which images are scored together.

    Quirks kept from coco-caption: the "length" in the length penalty counts bigrams, not
    words (so 0- and 1-word captions have the same length); with a single image every idf
    is log(1) − log(1) = 0 and CIDEr-D is 0 whatever the captions.
    """
    image_ids = _check_inputs(predictions, references)
    reference_counts = {i: [_ngram_counts(ref.split(), CIDER_MAX_N) for ref in references[i]] for i in image_ids}
    document_frequency: Counter[tuple[str, ...]] = Counter()
    for counts_of_image in reference_counts.values():
        document_frequency.update(set().union(*counts_of_image))
    log_num_images = math.log(float(len(image_ids)))

    per_image = {}
    for i in image_ids:
        hypothesis_counts = _ngram_counts(predictions[i].split(), CIDER_MAX_N)
        hypothesis = _tf_idf_vector(hypothesis_counts, document_frequency, log_num_images)
        summed = [0.0] * CIDER_MAX_N
        for counts in reference_counts[i]:
            reference = _tf_idf_vector(counts, document_frequency, log_num_images)
            summed = [s + sim for s, sim in zip(summed, _cider_d_similarity(hypothesis, reference), strict=True)]
        per_image[i] = sum(summed) / CIDER_MAX_N / len(reference_counts[i]) * CIDER_SCALE
    return sum(per_image.values()) / len(per_image), per_image


# ----------------------------------------------------------------------------------------
# METEOR (meteor-1.5.jar)
# ----------------------------------------------------------------------------------------


def _meteor_segment(text: str) -> str:
    """A caption made safe for one field of the jar's line protocol: no field separator
    "|||", no line break; spaces collapsed (METEOR ignores spacing)."""
    return re.sub(" {2,}", " ", _LINE_BREAKS.sub(" ", text.replace("|||", "")))


def _forward_lines(stream: IO[bytes], lines: queue.Queue[str | None]) -> None:
    """Copy a process's output lines into a queue, then None at its end (runs in a thread,
    so the process never blocks on a full pipe and reads can time out)."""
    for raw_line in stream:
        lines.put(raw_line.decode("utf-8", "replace").strip())
    lines.put(None)


def _stop_process(process: subprocess.Popen, stderr_file: IO[bytes]) -> None:
    """Kill the jar (it holds no state worth a graceful exit) and close its log file."""
    with contextlib.suppress(OSError):
        process.stdin.close()
    if process.poll() is None:
        process.kill()
    process.wait()
    stderr_file.close()


class MeteorScorer:
    """A running meteor-1.5.jar (pycocoevalcap's command line: ``-stdio -l en -norm``).

    Starting the jar takes several seconds (it loads a paraphrase table), so keep one
    scorer for many calls, e.g. ``with MeteorScorer() as scorer: meteor(p, r, scorer=scorer)``.
    Thread-safe; the process is killed by close(), by leaving the ``with`` block, when the
    scorer is garbage-collected, at interpreter exit, or after any protocol error (the
    error carries the jar's exit code and error output).

    Protocol: "SCORE ||| ref_1 ||| ... ||| ref_m ||| hypothesis" answers one line of
    sufficient statistics; "EVAL ||| stats_1 ||| ... ||| stats_N" answers N per-image
    scores, then the corpus score, which METEOR computes from the pooled statistics (it is
    not the mean of the per-image scores).
    """

    def __init__(self, *, timeout_s: float = METEOR_TIMEOUT_S) -> None:
        java = _java_executable("METEOR")
        jar = _bundled_file("meteor/meteor-1.5.jar")
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 -- closed by _stop_process
        self._process = subprocess.Popen(
            [java, "-jar", "-Xmx2G", str(jar), "-", "-", "-stdio", "-l", "en", "-norm"],
            cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
        )
        self._finalizer = weakref.finalize(self, _stop_process, self._process, self._stderr)
        self._answers: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_forward_lines, args=(self._process.stdout, self._answers), daemon=True).start()

    def _failure(self, what: str) -> RuntimeError:
        """An error carrying the jar's exit code and error output; the jar is stopped, since
        its answers can no longer be matched to questions."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=1)
        log = ""
        if not self._stderr.closed:
            self._stderr.seek(0)
            log = self._stderr.read().decode("utf-8", "replace")[-2000:].strip()
        exit_code = self._process.returncode
        self._finalizer()
        return RuntimeError(f"meteor-1.5.jar {what} (exit code {exit_code}); its error output: {log!r}")

    def _send(self, lines: Sequence[str]) -> None:
        if self._process.poll() is not None:
            raise self._failure("is not running")
        try:
            self._process.stdin.write("".join(line + "\n" for line in lines).encode("utf-8"))
            self._process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as error:
            raise self._failure("stopped accepting input") from error

    def _receive_line(self) -> str:
        try:
            answer = self._answers.get(timeout=self._timeout_s)
        except queue.Empty:
            raise self._failure(f"gave no answer within {self._timeout_s:.0f} s") from None
        if answer is None:
            raise self._failure("stopped unexpectedly")
        return answer

    def _receive_number(self) -> float:
        answer = self._receive_line()
        try:
            return float(answer)
        except ValueError:
            raise self._failure(f"answered {answer!r} where a number was expected") from None

    def score(self, predictions: Predictions, references: References) -> tuple[float, dict]:
        """Corpus METEOR and {image_id: METEOR} of the captions (already tokenized)."""
        image_ids = _check_inputs(predictions, references)
        score_lines = [
            " ||| ".join(["SCORE", *(_meteor_segment(r) for r in references[i]), _meteor_segment(predictions[i])])
            for i in image_ids
        ]
        with self._lock:
            if not self._finalizer.alive:
                raise RuntimeError("this MeteorScorer was closed")
            self._send(score_lines)
            statistics = [self._receive_line() for _ in image_ids]
            self._send(["EVAL ||| " + " ||| ".join(statistics)])
            per_image = {i: self._receive_number() for i in image_ids}
            corpus = self._receive_number()
        return corpus, per_image

    def close(self) -> None:
        """Stop the jar (safe to call twice)."""
        with self._lock:
            self._finalizer()

    def __enter__(self) -> MeteorScorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def meteor(
    predictions: Predictions, references: References, *, scorer: MeteorScorer | None = None
) -> tuple[float, dict]:
    """Corpus METEOR 1.5 and {image_id: METEOR} of tokenized captions, as coco-caption's Meteor().

    Runs meteor-1.5.jar from the installed pycocoevalcap (raises MissingDependencyError when
    java is missing). Without `scorer` a jar is started for this call and stopped after it.
    Unlike pycocoevalcap's wrapper, which cleans only the hypothesis, "|||" and line breaks
    are removed from the references too: there they would split or end a protocol line.
    """
    if scorer is not None:
        return scorer.score(predictions, references)
    with MeteorScorer() as transient_scorer:
        return transient_scorer.score(predictions, references)


# ----------------------------------------------------------------------------------------
# Everything at once
# ----------------------------------------------------------------------------------------


def caption_metrics(
    predictions: Predictions,
    references: References,
    *,
    tokenizer: str = "auto",
    use_meteor: bool | None = None,
    meteor_scorer: MeteorScorer | None = None,
) -> dict[str, Any]:
    """The coco-caption scores of raw captions, as a JSON-able dict.

    Both sides are tokenised (``tokenize_captions``, method `tokenizer`), then BLEU-1..4,
    METEOR, ROUGE-L and CIDEr-D are computed on the predicted images. use_meteor=None
    computes METEOR when java is available; True demands it (MissingDependencyError without
    java); False skips it. `meteor_scorer` reuses a running METEOR jar.

    Returns {"BLEU-1".."BLEU-4", "METEOR" (absent when not computed), "ROUGE-L", "CIDEr",
    "num_images", "tokenizer": "ptb" | "python", "notes": [what was not computed or may
    differ from coco-caption, and why]}.
    """
    image_ids = _check_inputs(predictions, references)
    notes: list[str] = []
    if tokenizer == "auto" and (reason := _ptb_unavailable_reason()) is not None:
        notes.append(
            f"PTB tokenizer not used: {reason}. Captions were tokenized with the pure-Python imitation, "
            "so scores may differ slightly from coco-caption's"
        )
    scored_references = {i: list(references[i]) for i in image_ids}
    tokenized_references, method = tokenize_captions(scored_references, method=tokenizer)
    tokenized_predictions, _ = tokenize_captions({i: [predictions[i]] for i in image_ids}, method=method)
    hypotheses = {i: captions[0] for i, captions in tokenized_predictions.items()}

    bleu_scores, _ = bleu(hypotheses, tokenized_references, n=4)
    result: dict[str, Any] = {f"BLEU-{k + 1}": score for k, score in enumerate(bleu_scores)}

    if use_meteor is None:
        use_meteor = meteor_scorer is not None or java_available()
        if not use_meteor:
            notes.append(f"METEOR not computed: java was not found on PATH; {JAVA_INSTALL_HINT}")
    elif not use_meteor:
        notes.append("METEOR not computed: disabled by use_meteor=False")
    if use_meteor:
        result["METEOR"], _ = meteor(hypotheses, tokenized_references, scorer=meteor_scorer)

    result["ROUGE-L"], _ = rouge_l(hypotheses, tokenized_references)
    result["CIDEr"], _ = cider_d(hypotheses, tokenized_references)
    if len(image_ids) == 1:
        notes.append("CIDEr is 0 by construction for a single image: its idf weights are log(1/1) = 0")
    result.update(num_images=len(image_ids), tokenizer=method, notes=notes)
    return result
