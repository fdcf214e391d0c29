"""Image-captioning metrics with the numbers of the coco-caption toolkit (pycocoevalcap 1.2).

    predictions = {image_id: "a dog runs on the grass"}
    references  = {image_id: ["A dog running on grass.", "The dog is running."]}
    caption_metrics(predictions, references)
    # {"BLEU-1": ..., "BLEU-4": ..., "METEOR": ..., "ROUGE-L": ..., "CIDEr": ..., "num_images": 1,
    #  "tokenizer": "ptb", "notes": []}

Reading order: input checks → locating java and the jars bundled in pycocoevalcap →
tokenisation (Stanford PTB jar, or a pure-Python imitation of it) → BLEU, ROUGE-L, CIDEr-D
(pycocoevalcap's scorers) → METEOR (meteor-1.5.jar over its "-stdio" protocol) →
``caption_metrics``.

One implementation per metric. BLEU, ROUGE-L and CIDEr-D are pycocoevalcap's own scorers,
called after our input checks. Tokenisation and METEOR run the Java programs that ship inside
the installed pycocoevalcap package (so they need ``java``) through wrappers of ours; what
pycocoevalcap's wrappers get wrong, measured, is written where ours are. Without java the
tokenizer falls back to a pure-Python imitation of the PTB jar, and METEOR is left out.
Figures: ``benchmarks/caption_metrics.py``.

Inputs are plain dicts: predictions ``{image_id: caption}``, references
``{image_id: [caption, ...]}``. As in coco-caption, exactly the predicted images are
scored: each needs at least one reference, extra references are ignored, and the CIDEr-D
document frequencies come from the references of the scored images only.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import unicodedata
import weakref
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


# Why our own call of the PTB jar rather than pycocoevalcap's PTBTokenizer: both run the same
# jar with the same options and give the same tokens in the same time (30,000 captions of
# benchmarks/caption_metrics.py --tokenizers: identical, 0.82 s ours against 0.75 s), but
# PTBTokenizer replaces only "\n" inside a caption. The jar reads \r, \v, \f, U+2028 and
# U+2029 as line ends too, and every caption after one lands on the wrong image, silently:
# PTBTokenizer().tokenize({1: ["A dog.\rA cat."], 2: ["Line one\u2028two"], 3: ["A bird."]})
# (as {"caption": ...} dicts) returns {1: ["a dog"], 2: ["a cat"], 3: ["line one"]}.
# It also writes its temporary file into the installed package's folder.


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
# Kept for machines without java, where neither the jar nor pycocoevalcap's PTBTokenizer can
# run; with java the jar is used. It is slower (30,000 captions of
# benchmarks/caption_metrics.py --tokenizers: 7.2 s against 0.82 s for the jar) and gave the
# jar's tokens on every one of them.
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
# BLEU, ROUGE-L and CIDEr-D: pycocoevalcap's own scorers
# ----------------------------------------------------------------------------------------
#
# These three call pycocoevalcap's scorers: they need no java, and our re-implementations
# (the last commit with them is 4d99932) bought no speed worth their 200 lines and no other
# numbers. Measured with `.venv/bin/python benchmarks/caption_metrics.py` (5,000 tokenized
# captions, 5 references each, 2-core machine, 2026-12-08), theirs against ours: BLEU-1..4
# 0.81 s against 0.86 s, ROUGE-L 0.66 s against 0.52 s, CIDEr-D 2.19 s against 1.73 s (an
# earlier run on a busier machine: 0.90/1.70, 1.49/1.17, 2.88/3.30); the largest difference
# of any corpus or per-image score was 2.5e-15.


def _coco_format(predictions: Predictions, references: References) -> tuple[list[ImageId], dict, dict]:
    """(image ids in prediction order, gts {id: [references]}, res {id: [prediction]}): the
    input of pycocoevalcap's scorers, after our checks (theirs are bare asserts)."""
    image_ids = _check_inputs(predictions, references)
    gts = {i: list(references[i]) for i in image_ids}
    res = {i: [predictions[i]] for i in image_ids}
    return image_ids, gts, res


def _import_scorer(module: str, name: str) -> type:
    """A scorer class of pycocoevalcap, or MissingDependencyError when it is not installed."""
    try:
        return getattr(importlib.import_module(f"pycocoevalcap.{module}"), name)
    except ImportError as error:
        raise MissingDependencyError(
            f"pycocoevalcap.{module} could not be imported ({error}); run: pip install 'pycocoevalcap>=1.2,<2'"
        ) from error


def bleu(predictions: Predictions, references: References, n: int = 4) -> tuple[list[float], dict]:
    """Corpus BLEU-1..n and per-image BLEU-1..n of tokenized captions: pycocoevalcap's Bleu(n).

    BLEU-k = BP · (Π_{j≤k} p_j)^(1/k), with p_j the clipped j-gram precision (each hypothesis
    j-gram counts at most as often as in the one reference where it occurs most) and the
    brevity penalty BP = exp(1 − r/c) when c < r, where r is the length of the reference
    closest in length to the hypothesis ("closest"). coco-caption adds 1e-15 to matches and
    1e-9 to denominators, so a precision with no match is tiny rather than zero. The corpus
    score pools the counts and lengths of all images; it is not the mean of per-image scores.
    Returns ([BLEU-1, ..., BLEU-n], {image_id: [BLEU-1, ..., BLEU-n]}).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    image_ids, gts, res = _coco_format(predictions, references)
    corpus, per_order = _import_scorer("bleu.bleu", "Bleu")(n).compute_score(gts, res, verbose=0)
    per_image = {i: [float(per_order[k][index]) for k in range(n)] for index, i in enumerate(image_ids)}
    return [float(score) for score in corpus], per_image


def rouge_l(predictions: Predictions, references: References) -> tuple[float, dict]:
    """Mean ROUGE-L and {image_id: ROUGE-L} of tokenized captions: pycocoevalcap's Rouge().

    ROUGE-L = (1+β²)·P·R / (R + β²·P) with β = 1.2, where P is the best LCS/len(hypothesis)
    and R the best LCS/len(reference) over the references, each maximised on its own; 0 when
    P or R is 0. Words are split on single spaces, so an empty caption is one empty word.
    """
    image_ids, gts, res = _coco_format(predictions, references)
    corpus, scores = _import_scorer("rouge.rouge", "Rouge")().compute_score(gts, res)
    return float(corpus), {i: float(score) for i, score in zip(image_ids, scores, strict=True)}


def cider_d(predictions: Predictions, references: References) -> tuple[float, dict]:
    """Mean CIDEr-D and {image_id: CIDEr-D} of tokenized captions: pycocoevalcap's Cider().

    CIDEr-D(i) = 10 · (1/m) Σ_j (1/4) Σ_{n=1..4} sim_n(hypothesis_i, reference_ij), where sim_n
    is the clipped cosine Σ_g min(h_g, r_g)·r_g / (‖h‖·‖r‖) of tf-idf vectors (tf the raw
    n-gram count, idf = log N − log max(1, df)) times the length penalty exp(−Δ² / (2·6²)).
    df(g) counts the scored images whose references contain g and N is the number of scored
    images, so scores depend on which images are scored together; the "length" in Δ counts
    bigrams, not words; and with a single image every idf is 0, so CIDEr-D is 0.
    """
    image_ids, gts, res = _coco_format(predictions, references)
    if not any(reference.split() for references_of_image in gts.values() for reference in references_of_image):
        # No reference holds a word (e.g. only punctuation, dropped by tokenisation): nothing can
        # match, so every score is 0; pycocoevalcap's Cider would fail on max() of no frequencies.
        return 0.0, {i: 0.0 for i in image_ids}
    corpus, scores = _import_scorer("cider.cider", "Cider")().compute_score(gts, res)
    return float(corpus), {i: float(score) for i, score in zip(image_ids, scores, strict=True)}


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


# Why our own wrapper of meteor-1.5.jar rather than pycocoevalcap's Meteor: both run the same
# jar with the same options and give the same scores in about the same time (5,000 captions
# with 5 references, jar start-up included: identical corpus and per-image scores; 15.6 and
# 15.9 s ours, 16.6 and 12.6 s theirs). But Meteor cleans only the hypothesis, has no timeout
# and never reads the jar's error output: a reference "a dog\non grass" made its
# compute_score raise ValueError("could not convert string to float: b'2.0 2.0 1.0 ...'")
# (the answers were out of step with the questions), after which the interpreter hung at
# exit, its lock still held. Ours cleans every field, times out, and reports the jar's
# exit code and error output.


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
