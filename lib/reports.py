"""Labels from radiology report text (English and Japanese), CheXpert style, with traceable evidence.

Why rules and not a model: labels must be reproducible, explainable word by word, fast enough to
relabel a whole archive after a vocabulary edit, and runnable offline. The pipeline is the classic
one (NegEx / ConText / CheXpert labeler): split sections and sentences, find mentions from editable
vocabularies (``lib/vocab/*.yaml``), give each mention an assertion from trigger phrases whose scope
ends at conjunctions and sentence ends, then aggregate mentions into one row per report.

Values follow CheXpert: 1 positive, 0 negative, -1 uncertain, NaN (blank) not mentioned.
Historical ("History of ...") and hypothetical ("Rule out ...") mentions, and anything in indication,
comparison or technique sections, never give a positive label. Every phrase and regex is compiled
once per vocabulary and language into a trie-shaped alternation, so a report costs two regex scans.
"""

from __future__ import annotations

import bisect
import hashlib
import html
import io
import json
import math
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from lib.io import DataError, SkippedCases

VOCAB_DIR = Path(__file__).resolve().parent / "vocab"
LANGS = ("en", "ja")
MAX_CHARS = 1_000_000  # longer texts are refused (named in the batch's unusable rows), not truncated
IGNORED_SECTIONS = frozenset({"indication", "comparison", "technique"})
VALUE = {"affirmed": 1.0, "possible": -1.0, "negated": 0.0, "normal": 0.0}
_RANK = {"affirmed": 3, "possible": 2, "negated": 1, "normal": 0}
# How far a trigger reaches when no terminator stops it: words (en) or characters (ja).
WINDOW = {"en": 8, "ja": 40}
# How far a generic word ("cyst") may sit from its organ ("kidney") to be composed into one finding.
COMPOSE_DISTANCE = {"en": 80, "ja": 30}
_W = "a-z0-9"
_SEP = r"[\s\-]+"
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uff01-\uff5e]")
_TRIGGER_ORDER = ("normal", "pseudo", "terminate", "negated", "possible", "hypothetical", "historical")


# ----------------------------------------------------------------------------- text primitives


def _lower(text: str) -> str:
    """Lower-case without changing length, so match offsets index the original text."""
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in text)


def _key(phrase: str) -> str:
    return re.sub(r"[\s\-]+", " ", phrase.lower()).strip()


def _is_word_char(ch: str) -> bool:
    return bool(re.match(f"[{_W}]", ch))


def _trie_pattern(phrases: list[str]) -> str:
    """One alternation for many phrases, shaped like a trie so the regex engine never rescans.

    Longer phrases are tried before their prefixes; ASCII phrases only match whole words; a space
    in a phrase matches any run of spaces or hyphens.
    """
    trie: dict = {}
    for p in phrases:
        node = trie
        for ch in p:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict, prev: str) -> str:
        alts = [(_SEP if ch == " " else re.escape(ch)) + emit(node[ch], ch) for ch in sorted(node) if ch]
        if "" in node:
            alts.append(f"(?![{_W}])" if _is_word_char(prev) else "")
        return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"

    # literal first, then "no word character before it": the engine can reject a branch on one char
    alts = [re.escape(ch) + (f"(?<![{_W}]{re.escape(ch)})" if _is_word_char(ch) else "") + emit(trie[ch], ch)
            for ch in sorted(trie)]
    return "(?:" + "|".join(alts) + ")" if alts else "(?!)"


def _variants(phrase: str, lang: str) -> list[str]:
    """English plurals are added so vocabularies list each noun once."""
    k = _key(phrase)
    if lang != "en" or not k or not k[-1].isalpha():
        return [k]
    out = [k]
    if k.endswith(("s", "x", "ch", "sh")):
        out.append(k + "es")
    elif k.endswith("y") and len(k) > 3 and k[-2] not in "aeiou":
        out.append(k[:-1] + "ies")
    else:
        out.append(k + "s")
    return out


def detect_lang(text: str) -> str:
    """'ja' when the text holds Japanese characters, else 'en' (for mixed or unlabeled batches)."""
    return "ja" if _CJK.search(text) else "en"


# ----------------------------------------------------------------------------- sections and sentences


@dataclass(frozen=True)
class Sentence:
    start: int
    end: int
    section: str  # findings | impression | indication | comparison | technique | other


_SECTION_KEYS = (
    ("indication", ("history", "indication", "reason", "clinical", "臨床", "依頼", "目的", "既往", "主訴", "病歴")),
    ("comparison", ("comparison", "比較")),
    ("technique", ("technique", "procedure", "protocol", "exam", "撮影", "方法", "検査")),
    ("findings", ("finding", "所見")),
    ("impression", ("impression", "conclusion", "summary", "opinion", "diagnos", "診断", "印象", "結論", "まとめ")),
)
# comparison/technique statements are one sentence; what follows without a new header is findings text
_ONE_SENTENCE_SECTIONS = frozenset({"comparison", "technique"})
_EN_HEADER_NAME = re.compile(
    r"(?:clinical\s+)?(?:history|indications?|reason\s+for\s+(?:exam(?:ination)?|study|referral)"
    r"|clinical\s+(?:information|indications?|data|details|notes)|comparisons?|techniques?|procedures?"
    r"|examination|exam|findings?|impressions?|conclusions?|summary|recommendations?|opinion"
    r"|(?:post|pre)[\s-]*op(?:erative)?\s+diagnosis|diagnosis)", re.I)
# "Family History", "Other Clinical Conditions": Title Case field names, trusted only after a lost line break
_TITLE_HEADER = re.compile(r"[A-Z][a-z]+(?:[ /&-]+(?:[A-Z][a-z]+|of|and|or|for)){0,3}")
_EN_HEADER_TAIL = re.compile(r"[A-Za-z][A-Za-z/&\- ]{0,40}$")
_JA_HEADER = re.compile(r"【(?P<h>[^】\n]{1,20})】|(?m:^[ \t]*(?P<h2>所見|診断|臨床情報|臨床診断|依頼内容|"
                        r"検査目的|比較|既往歴|印象|結論|まとめ|コメント|画像診断|読影所見)[ \t]*[:：])")
# a period at a line end always ends the sentence, so it is one match with its line break (half the matches)
_EN_BOUND = re.compile(r"[.!?]+[ \t]*\n|[.!?]+(?=\s|$)|\n")
_EN_ABBREV = frozenset(["dr", "mr", "mrs", "ms", "vs", "e.g", "i.e", "etc", "approx", "no", "nos", "fig", "st",
                        "cf", "incl", "min", "max", "sq", "vol", "ca", "pt", "pts", "hx", "dx", "rx", "tx", "inc",
                        "co", "jr", "sr", "ie", "eg", "al", "mt"])
_JA_BOUND = re.compile(r"[。！？!?．]+|\n")
_LIST_START = re.compile(r"\s*(?:[-*•·・]|\(?\d{1,2}[.)])\s*")


@cache
def _section_type(header: str) -> str:
    h = header.lower()
    for kind, keys in _SECTION_KEYS:
        if any(k in h for k in keys):
            return kind
    return "other"


def _sections(text: str, lang: str) -> list[tuple[int, int, str]]:
    """(start, end, section type) of the text between headers; the header words themselves are dropped."""
    cuts: list[tuple[int, int, str]] = []
    if lang == "ja":
        for m in _JA_HEADER.finditer(text):
            cuts.append((m.start(), m.end(), _section_type(m.group("h") or m.group("h2"))))
    else:  # "NAME:" at a line or sentence start, NAME a known header or ALL CAPS; colons are rare, so scan them
        pos = text.find(":")
        while pos >= 0:
            m = _EN_HEADER_TAIL.search(text, max(0, pos - 41), pos)
            if m:
                start, tail = m.start(), m.group()
                gap = tail.rfind("  ")  # a lost line break inside the tail: the header starts after it
                if gap >= 0:
                    rest = tail[gap + 2:]
                    start += gap + 2 + len(rest) - len(rest.lstrip())
                h = text[start:pos].strip()
                raw = text[max(0, start - 40):start]
                before = raw.rstrip(" \t")
                # a line start, a sentence end, or 2+ spaces / "***" where exported text lost its line breaks
                flat = raw.endswith("  ") or before.endswith("*")
                if (not before or before[-1] in "\n.!?:;" or flat) and (
                        (h.isupper() and len(h) >= 3) or _EN_HEADER_NAME.fullmatch(h)
                        or (flat and _TITLE_HEADER.fullmatch(h))):
                    cuts.append((start, pos + 1, _section_type(h)))
            pos = text.find(":", pos + 1)
    out, pos, kind = [], 0, "other"
    for s, e, k in cuts:
        if s > pos:
            out.append((pos, s, kind))
        pos, kind = e, k
    out.append((pos, len(text), kind))
    return out


def _split_en(text: str, a: int, b: int) -> list[tuple[int, int]]:
    spans, start = [], a
    for m in _EN_BOUND.finditer(text, a, b):
        s, e = m.span()
        if text[e - 1] == "\n" and s + 1 < e:
            pass  # "...stone.\n": always a boundary
        elif text[s] == "\n":
            before = text[max(start, s - 80):s].rstrip()
            nxt = text[e:min(b, e + 80)]
            stripped = nxt.lstrip(" \t")
            if not (not before or before[-1] in ".!?:;" or stripped[:1] == "\n" or _LIST_START.match(nxt)
                    or (stripped[:1].isupper() and s - start < 60)):
                continue  # a line wrapped inside a sentence
        else:
            tail = text[max(start, s - 12):s].rsplit(None, 1)
            w = tail[-1].lower().lstrip("(\"'") if tail else ""
            nxt = text[e:min(b, e + 4)].lstrip()[:1]
            if (w in _EN_ABBREV or (len(w) == 1 and w.isalpha()) or (nxt and nxt.islower())
                    or (w.isdigit() and len(w) <= 2 and not text[start:s - len(w)].strip())):
                continue
        spans.append((start, e))
        start = e
    spans.append((start, b))
    return spans


def _split_ja(text: str, a: int, b: int) -> list[tuple[int, int]]:
    spans, start = [], a
    for m in _JA_BOUND.finditer(text, a, b):
        spans.append((start, m.end()))
        start = m.end()
    spans.append((start, b))
    return spans


def split_sentences(text: str, lang: str = "en") -> list[Sentence]:
    """Sentences with their section: periods (not abbreviations or list numbers), 「。」, line breaks
    that end a sentence, bullets, and headers such as FINDINGS: / IMPRESSION: / 【所見】 / 診断：."""
    out = []
    split = _split_ja if lang == "ja" else _split_en
    for a, b, kind in _sections(text, lang):
        for s, e in split(text, a, b):
            seg = text[s:e]
            core = seg.strip()
            if core:
                s += len(seg) - len(seg.lstrip())
                out.append(Sentence(s, s + len(core), kind))
                if kind in _ONE_SENTENCE_SECTIONS:
                    kind = "other"  # "Comparison: none. There is a mass..." (findings without their header)
    return out


# ----------------------------------------------------------------------------- vocabularies


@dataclass
class _Matcher:
    regex: re.Pattern
    lookup: dict[str, tuple[str, object]]

    def find(self, low: str, pos: int = 0, endpos: int | None = None) -> list[tuple[int, int, str, object]]:
        out = []
        lookup = self.lookup
        for m in self.regex.finditer(low, pos, len(low) if endpos is None else endpos):
            g = m.group()
            hit = lookup.get(g) or lookup.get(_key(g))
            if hit is not None:
                out.append((m.start(), m.end(), *hit))
        return out


def _build_matcher(entries: list[tuple[str, str, object]], lang: str, plural: bool) -> _Matcher:
    """entries: (phrase, kind, payload); earlier entries win a phrase claimed twice, same kinds merge."""
    lookup: dict[str, tuple[str, object]] = {}
    for phrase, kind, payload in entries:
        for v in (_variants(phrase, lang) if plural else [_key(phrase)]):
            if not v:
                continue
            old = lookup.get(v)
            if old is None:
                lookup[v] = (kind, payload)
            elif old[0] == kind and kind == "label":
                lookup[v] = (kind, tuple(dict.fromkeys(old[1] + payload)))
            elif old[0] == kind and kind == "head":
                lookup[v] = (kind, {**payload, **old[1]})
    return _Matcher(re.compile(_trie_pattern(sorted(lookup))), lookup)


def _check_phrases(spec: object, path: Path, where: str = "") -> None:
    """YAML turns a bare no/yes/on into booleans and "a: b" into mappings: refuse them loudly."""
    if isinstance(spec, dict):
        for k, v in spec.items():
            _check_phrases(v, path, f"{where}/{k}")
    elif isinstance(spec, list):
        bad = [p for p in spec if not isinstance(p, str | int | float) or isinstance(p, bool)]
        if bad:
            raise DataError(path, f"{where}: phrases must be strings, got {bad!r} (quote them)")


@cache
def _trigger_spec() -> dict:
    path = VOCAB_DIR / "triggers.yaml"
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    _check_phrases(spec, path)
    return spec


def _trigger_entries(lang: str) -> list[tuple[str, str, object]]:
    spec = _trigger_spec().get(lang, {})
    dirs: dict[tuple[str, str], set] = {}
    for cat in _TRIGGER_ORDER:
        for direction, phrases in (spec.get(cat) or {}).items():
            for p in phrases or []:
                dirs.setdefault((cat, _key(str(p))), set()).add(direction)
    entries = []
    for cat in _TRIGGER_ORDER:  # a phrase in two categories keeps the first (e.g. normal over pseudo)
        for (c, p), ds in dirs.items():
            if c == cat:
                d = "both" if "both" in ds or len(ds) > 1 else next(iter(ds))
                entries.append((p, cat, d))
    return entries


@cache
def _generic_triggers(lang: str) -> _Matcher:
    return _build_matcher(_trigger_entries(lang), lang, plural=False)


@dataclass
class Vocabulary:
    """A compiled vocabulary: its columns and, per language, a concept matcher and a trigger matcher."""

    name: str
    labels: list[str]
    label_organ: dict[str, str | None]
    organs: list[str]
    organ_normal: dict[str, list[str]]
    abnormal: bool
    no_finding: str | None
    no_finding_ignore: frozenset
    concepts: dict[str, _Matcher]
    triggers: dict[str, _Matcher]
    path: Path

    @property
    def columns(self) -> list[str]:
        cols = ([self.no_finding] if self.no_finding else []) + self.labels
        return cols + ([f"{o}_abnormal" for o in self.organs] if self.abnormal else [])

    @property
    def abnormal_columns(self) -> list[str]:
        return [f"{o}_abnormal" for o in self.organs] if self.abnormal else []


def _vocab_path(vocabulary: str | Path) -> Path:
    p = Path(vocabulary)
    if p.suffix in (".yaml", ".yml", ".json") and p.exists():
        return p
    p = VOCAB_DIR / f"{vocabulary}.yaml"
    if not p.exists():
        names = sorted(x.stem for x in VOCAB_DIR.glob("*.yaml") if x.stem != "triggers")
        raise ValueError(f"unknown vocabulary {vocabulary!r}; choose from {names} or pass a YAML path")
    return p


@cache
def load_vocabulary(vocabulary: str | Path) -> Vocabulary:
    """Read and compile a vocabulary YAML (name in lib/vocab or a path); cached per process."""
    path = _vocab_path(vocabulary)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DataError(path, f"not a readable vocabulary ({exc})") from exc
    if not isinstance(spec, dict) or not isinstance(spec.get("labels"), dict):
        raise DataError(path, "vocabulary needs a 'labels' mapping")
    _check_phrases(spec, path)
    labels = list(spec["labels"])
    organs_spec = spec.get("organs") or {}
    label_organ = {k: (v or {}).get("organ") for k, v in spec["labels"].items()}
    organ_normal = {o: list((v or {}).get("normal_labels") or [k for k, og in label_organ.items() if og == o])
                    for o, v in organs_spec.items()}
    nf = spec.get("no_finding") or {}
    concepts, triggers = {}, {}
    for lang in LANGS:
        entries: list[tuple[str, str, object]] = []
        for lab, v in spec["labels"].items():
            entries += [(str(p), "label", (lab,)) for p in (v or {}).get(lang) or []]
        for name, v in (spec.get("compose") or {}).items():
            mapping = dict(v.get("labels") or {})
            if set(mapping.values()) - set(labels) or set(mapping) - set(organs_spec):
                raise DataError(path, f"compose group {name!r} names unknown organs or labels")
            entries += [(str(p), "head", mapping) for p in v.get(lang) or []]
        for o, v in organs_spec.items():
            entries += [(str(p), "organ", o) for p in (v or {}).get(lang) or []]
        entries += [(str(p), "other", None) for p in (spec.get("other_findings") or {}).get(lang) or []]
        entries += [(str(p), "ignore", None) for p in (spec.get("ignore") or {}).get(lang) or []]
        concepts[lang] = _build_matcher(entries, lang, plural=True)
        normal = [(str(p), "normal", "both") for p in (spec.get("normal") or {}).get(lang) or []]
        triggers[lang] = _build_matcher(normal + _trigger_entries(lang), lang, plural=False)
    return Vocabulary(name=spec.get("name", path.stem), labels=labels, label_organ=label_organ,
                      organs=list(organs_spec), organ_normal=organ_normal,
                      abnormal=bool(spec.get("abnormal_columns")), no_finding=nf.get("column"),
                      no_finding_ignore=frozenset(nf.get("ignore") or []), concepts=concepts,
                      triggers=triggers, path=path)


# ----------------------------------------------------------------------------- assertion


@dataclass(frozen=True)
class _Trig:
    start: int
    end: int
    cat: str
    direction: str


# what may stand between a finding and a normal statement about it: "engorgement appears within normal limits"
_COPULA = re.compile(r"\s*(?:(?:is|are|was|were|appears?|seems?|looks?|remains?)"
                     r"(?:\s+(?:to\s+be|grossly|otherwise))?\s*)?")


def _gap_ok(low: str, a: int, b: int, lang: str) -> bool:
    if lang == "ja":
        return b - a <= WINDOW["ja"]
    return len(low[a:b].split()) <= WINDOW["en"]


def _assert_span(low: str, ms: int, me: int, s0: int, s1: int, trigs: list[_Trig], lang: str
                 ) -> tuple[str, str, _Trig | None]:
    """(negation status, temporality, deciding trigger) of the mention [ms, me) in sentence [s0, s1).

    Status is the nearest in-scope negated/possible trigger (ties: negated); temporality is
    'hypothetical' or 'historical' when such a trigger reaches the mention, else 'current'.
    """
    terms = [t for t in trigs if t.cat == "terminate"]
    best: tuple[int, int, _Trig] | None = None
    temporal = "current"
    for t in trigs:
        if t.cat in ("pseudo", "terminate"):
            continue
        if ms <= t.start and t.end <= me and (t.start, t.end) != (ms, me):
            continue  # a trigger word inside the finding's own name ("... suspicious for neoplasm")
        if t.start < me and ms < t.end:
            dist = 0
        elif t.end <= ms and t.direction in ("forward", "both"):
            stop = min([x.start for x in terms if x.start >= t.end] + [s1])
            if ms >= stop or not _gap_ok(low, t.end, ms, lang):
                continue
            dist = ms - t.end
        elif t.start >= me and t.direction in ("backward", "both"):
            stop = max([x.end for x in terms if x.end <= t.start] + [s0])
            if me <= stop or not _gap_ok(low, me, t.start, lang):
                continue
            dist = t.start - me
        else:
            continue
        if t.cat in ("historical", "hypothetical"):
            if temporal != "hypothetical":
                temporal = t.cat
            continue
        if t.cat == "normal" and dist and not (t.start >= me and _COPULA.fullmatch(low, me, t.start)):
            continue  # "no focal lesion" negates a lesion it contains, not its neighbours; "X appears normal" does
        key = (dist, 0 if t.cat in ("negated", "normal") else 1)
        if best is None or key < best[:2]:
            best = (*key, t)
    if best is None:
        return "affirmed", temporal, None
    t = best[2]
    return ("possible" if t.cat == "possible" else "negated"), temporal, t


def _find_concept(low: str, concept: str) -> list[tuple[int, int]]:
    words = [re.escape(w) for w in re.split(r"[\s\-]+", _lower(concept).strip()) if w]
    if not words:
        return []
    spans = [m.span() for m in re.finditer(r"[\s\-]+".join(words), low)]
    if spans:
        return spans
    for w in sorted(words, key=len, reverse=True):  # concept worded differently: anchor on its longest word
        if len(w) >= 3 or _CJK.search(w):
            spans = [m.span() for m in re.finditer(w, low)]
            if spans:
                return spans[:1]
    return []


def assertion(sentence: str, concept: str, lang: str = "en") -> str:
    """'affirmed', 'negated' or 'possible' for ``concept`` as used in ``sentence``.

    Hypothetical mentions ("rule out X") count as 'possible'; historical ones keep their status
    ("history of X" is affirmed, "no history of X" negated). When the concept occurs more than once
    the most positive reading wins; when its words are not in the sentence it is 'affirmed'.
    """
    if not isinstance(sentence, str) or not isinstance(concept, str):
        raise TypeError(f"sentence and concept must be str, got {type(sentence).__name__}, "
                        f"{type(concept).__name__}")
    if lang in (None, "auto"):
        lang = detect_lang(sentence)
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {LANGS} or 'auto', got {lang!r}")
    low = _lower(sentence)
    spans = _find_concept(low, concept)
    if not spans:
        return "affirmed"
    sents = split_sentences(sentence, lang) or [Sentence(0, len(sentence), "other")]
    starts = [s.start for s in sents]
    # a concept inside a header ("ALLERGIES: ...") is a heading, not a mention
    spans = [sp for sp in spans if any(s.start <= sp[0] < s.end for s in sents)] or spans
    # test kits (NegEx) mark the target occurrence by upper-casing it in mixed-case text
    marked = [sp for sp in spans if sentence[sp[0]:sp[1]].isupper() and not concept.isupper()]
    if 0 < len(marked) < len(spans) and not sentence.isupper():
        spans = marked
    matcher = _generic_triggers(lang)
    trig_hits = matcher.find(low)
    # a pseudo-trigger running into the concept ("no change| in vision") is the concept's own word:
    # what precedes the concept is read again on its own ("no")
    for a, b, cat, _ in list(trig_hits):
        if cat == "pseudo" and any(a < ms < b for ms, _ in spans):
            ms = min(ms for ms, _ in spans if a < ms < b)
            trig_hits += matcher.find(low, a, ms)
    results = []
    for ms, me in spans:
        s = sents[max(0, bisect.bisect_right(starts, ms) - 1)]
        trigs = [_Trig(a, b, c, d) for a, b, c, d in trig_hits if a < s.end and b > s.start]
        status, temporal, _ = _assert_span(low, ms, me, s.start, s.end, trigs, lang)
        if status == "affirmed" and temporal == "hypothetical":
            status = "possible"
        results.append(status)
    return max(results, key=lambda r: _RANK[r])


# ----------------------------------------------------------------------------- labelling


def _analyse(text: str, vocab: Vocabulary, lang: str) -> tuple[dict[str, float], list[dict]]:
    """Label values and evidence rows of one report."""
    low = _lower(text)
    sents = split_sentences(text, lang)
    starts = [s.start for s in sents]
    concepts = vocab.concepts[lang].find(low)
    triggers = vocab.triggers[lang].find(low)
    by_sent: dict[int, list] = {}
    for c in concepts:
        i = bisect.bisect_right(starts, c[0]) - 1
        if i >= 0 and c[1] <= sents[i].end:
            by_sent.setdefault(i, []).append(c)
    trig_by_sent: dict[int, list[_Trig]] = {}
    for a, b, cat, d in triggers:
        i = bisect.bisect_right(starts, a) - 1
        if i >= 0 and a < sents[i].end:
            trig_by_sent.setdefault(i, []).append(_Trig(a, b, cat, d))

    best: dict[str, str] = {}
    normal_organs: set[str] = set()
    others: list[str] = []
    evidence: list[dict] = []
    maxd = COMPOSE_DISTANCE[lang]
    for i, found in by_sent.items():
        s = sents[i]
        counted = s.section not in IGNORED_SECTIONS
        trigs = trig_by_sent.get(i, [])
        terms = [t for t in trigs if t.cat == "terminate"]
        organs = [(a, b, o) for a, b, k, o in found if k == "organ"]
        mentions: list[tuple[int, int, int, int, tuple, str]] = []  # span, evidence span, labels, kind
        for a, b, kind, payload in found:
            if kind == "label":
                mentions.append((a, b, a, b, payload, "label"))
            elif kind == "other":
                mentions.append((a, b, a, b, ("other finding",), "other"))
            elif kind == "head" and organs:
                oa, ob, organ = min(organs, key=lambda o: abs((o[0] + o[1]) - (a + b)))
                lo, hi = min(oa, a), max(ob, b)
                if organ in payload and hi - lo - (ob - oa) - (b - a) <= maxd:
                    mentions.append((a, b, lo, hi, (payload[organ],), "composed"))
        for a, b, ea, eb, labs, kind in mentions:
            status, temporal, trig = _assert_span(low, a, b, s.start, s.end, trigs, lang)
            shown = status if temporal == "current" else temporal
            use = counted and temporal == "current"
            for lab in labs:
                evidence.append({"section": s.section, "sentence": text[s.start:s.end], "phrase": text[ea:eb],
                                 "start": ea, "end": eb, "label": lab, "assertion": shown,
                                 "trigger": text[trig.start:trig.end] if trig else "", "counted": use})
                if not use:
                    continue
                if kind == "other":
                    if status != "negated":
                        others.append(lab)
                elif _RANK[status] > _RANK.get(best.get(lab, ""), -1):
                    best[lab] = status
        if not counted:
            continue
        for t in trigs:  # normal statements: "The liver and spleen are unremarkable" / 「肝に異常を認めない」
            if t.cat != "normal":
                continue
            lo = max([x.end for x in terms if x.end <= t.start] + [s.start])
            hi = min([x.start for x in terms if x.start >= t.end] + [s.end])
            for oa, ob, organ in organs:
                if lo <= oa and ob <= hi and organ in vocab.organ_normal:
                    normal_organs.add(organ)
                    evidence.append({"section": s.section, "sentence": text[s.start:s.end],
                                     "phrase": text[min(oa, t.start):max(ob, t.end)], "start": min(oa, t.start),
                                     "end": max(ob, t.end), "label": f"{organ} (normal)", "assertion": "normal",
                                     "trigger": text[t.start:t.end], "counted": True})
    values: dict[str, float] = {lab: VALUE[st] for lab, st in best.items()}
    for organ in normal_organs:
        for lab in vocab.organ_normal[organ]:
            values.setdefault(lab, 0.0)
    if vocab.no_finding:
        findings = [v for k, v in values.items() if k not in vocab.no_finding_ignore]
        values[vocab.no_finding] = 0.0 if (others or any(v != 0 for v in findings)) else 1.0
    if vocab.abnormal:
        for organ in vocab.organs:
            vals = [values[k] for k, o in vocab.label_organ.items() if o == organ and k in values]
            if 1.0 in vals:
                values[f"{organ}_abnormal"] = 1.0
            elif -1.0 in vals:
                values[f"{organ}_abnormal"] = -1.0
            elif vals or organ in normal_organs:
                values[f"{organ}_abnormal"] = 0.0
    return values, evidence


def _as_text(value: object) -> str:
    """The report text, or a ValueError saying why this row cannot be labelled."""
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        raise ValueError("missing text")
    if not isinstance(value, str):
        raise ValueError(f"not text ({type(value).__name__})")
    if not value.strip():
        raise ValueError("empty text")
    if len(value) > MAX_CHARS:
        raise ValueError(f"text too long ({len(value):,} characters > {MAX_CHARS:,})")
    return value


def _label_batch(texts: list, vocabulary: str | Path, lang: str = "en", ids: list | None = None
                 ) -> tuple[pd.DataFrame, pd.DataFrame, SkippedCases]:
    vocab = load_vocabulary(vocabulary)
    if lang not in (*LANGS, "auto"):
        raise ValueError(f"lang must be one of {LANGS} or 'auto', got {lang!r}")
    texts = list(texts)
    ids = list(range(len(texts))) if ids is None else list(ids)
    rows: list[dict[str, float]] = []
    evidence: list[dict] = []
    skipped = SkippedCases()
    for rid, value in zip(ids, texts, strict=True):
        try:
            text = _as_text(value)
            values, ev = _analyse(text, vocab, detect_lang(text) if lang == "auto" else lang)
        except Exception as exc:  # one unusable report never stops the batch
            skipped.add(str(rid), exc if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}",
                        stage="reports")
            values, ev = {}, []
        rows.append(values)
        for e in ev:
            e["report"] = rid
        evidence.extend(ev)
    labels = pd.DataFrame(rows, columns=vocab.columns, dtype=float)
    labels.index = pd.RangeIndex(len(texts))
    labels.attrs["unusable"] = skipped.to_frame().rename(columns={"case": "row"})
    ev_cols = ["report", "section", "sentence", "phrase", "start", "end", "label", "assertion", "trigger",
               "counted"]
    return labels, pd.DataFrame(evidence, columns=ev_cols), skipped


def label_reports(texts: list[str], vocabulary: str, lang: str = "en") -> pd.DataFrame:
    """One row per text, CheXpert-style columns: 1 positive, 0 negative, -1 uncertain, NaN not mentioned.

    ``vocabulary``: "chest-xray" (CheXpert observations incl. "No Finding"), "abdominal-ct"
    (``lib.synth.LABEL_COLUMNS`` + ``ABNORMAL_COLUMNS``) or a YAML path. ``lang``: "en", "ja" or
    "auto" (per text). Unusable texts (None, NaN, empty, not text, undecodable bytes, too long) give
    an all-blank row and are listed in ``result.attrs["unusable"]`` (row, reason).
    """
    return _label_batch(texts, vocabulary, lang)[0]


def report_evidence(texts: list[str], vocabulary: str, lang: str = "en", ids: list | None = None) -> pd.DataFrame:
    """Every mention behind the labels: report id, section, sentence, matched phrase, character span
    (in the report text), label, assertion (affirmed/negated/possible/historical/hypothetical/normal),
    the deciding trigger, and whether it counted (mentions in indication/comparison sections do not)."""
    return _label_batch(texts, vocabulary, lang, ids)[1]


def label_reports_with_evidence(texts: list[str], vocabulary: str, lang: str = "en", ids: list | None = None
                                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Labels and evidence from one pass (what ``label_cohort`` uses)."""
    labels, evidence, _ = _label_batch(texts, vocabulary, lang, ids)
    return labels, evidence


# ----------------------------------------------------------------------------- cohort entry point


def read_reports_csv(path: str | Path) -> tuple[pd.DataFrame, SkippedCases]:
    """reports.csv as strings; bytes that are not UTF-8 are replaced and their rows reported."""
    path = Path(path)
    skipped = SkippedCases()
    if not path.exists():
        raise DataError(path, "file not found")
    raw = path.read_bytes()
    try:
        decoded = raw.decode("utf-8-sig")
        bad = False
    except UnicodeDecodeError:
        decoded, bad = raw.decode("utf-8", errors="replace"), True
    try:
        df = pd.read_csv(io.StringIO(decoded), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(path, f"not a readable CSV ({exc})") from exc
    missing = {"study_id", "text"} - set(df.columns)
    if missing:
        raise DataError(path, f"missing column(s) {sorted(missing)}; found {list(df.columns)}")
    if bad:
        for sid, text in zip(df["study_id"], df["text"], strict=True):
            if "\ufffd" in text:
                skipped.add(sid, DataError(path, "non-UTF-8 bytes replaced by U+FFFD (row still labelled)"),
                            stage="reports")
    return df, skipped


def _fingerprint(paths: list[Path], extra: dict) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def label_cohort(cohort_dir: str | Path, lang: str = "ja", run_dir: str | Path | None = None,
                 vocabulary: str = "abdominal-ct", force: bool = False) -> pd.DataFrame:
    """Label ``<cohort>/reports.csv`` and write ``run_dir/labels.csv`` + ``run_dir/evidence.csv``.

    Idempotent: when reports, vocabulary, triggers, code and arguments are unchanged the cached
    ``labels.csv`` is returned. ``lang``: "en"/"ja" keep that language's rows; "auto" labels every row
    in its own language. Never reads ``ground_truth/`` (evaluation is ``evaluate_against``).
    """
    from lib import config

    cohort_dir = Path(cohort_dir)
    run_dir = config.resolve_run_dir(run_dir)
    path = cohort_dir / "reports.csv"
    if not path.exists():
        raise DataError(path, "file not found (expected a reports.csv with study_id and text columns)")
    vocab = load_vocabulary(vocabulary)
    key = _fingerprint([path, vocab.path, VOCAB_DIR / "triggers.yaml", Path(__file__)],
                       {"lang": lang, "vocabulary": str(vocabulary)})
    meta_path, labels_path, ev_path = run_dir / "labels.json", run_dir / "labels.csv", run_dir / "evidence.csv"
    if (not force and meta_path.exists() and labels_path.exists() and ev_path.exists()
            and json.loads(meta_path.read_text()).get("key") == key):
        return pd.read_csv(labels_path, dtype={"study_id": str, "patient_id": str, "lang": str})

    df, skipped = read_reports_csv(path)
    if "lang" not in df.columns:
        df["lang"] = lang if lang in LANGS else ""
    if "patient_id" not in df.columns:
        df["patient_id"] = ""
    df["lang"] = df["lang"].str.strip().str.lower()
    if lang in LANGS:
        df = df[df["lang"] == lang]
        if df.empty:
            raise DataError(path, f"no reports in language {lang!r}")
    elif lang != "auto":
        raise ValueError(f"lang must be one of {LANGS} or 'auto', got {lang!r}")
    df = df.reset_index(drop=True)
    langs = [x if x in LANGS else detect_lang(t) for x, t in zip(df["lang"], df["text"], strict=True)]
    texts = [t if t.strip() else None for t in df["text"]]
    parts, evs = [], []
    for lg in sorted(set(langs)):
        idx = [i for i, x in enumerate(langs) if x == lg]
        lab, ev, sk = _label_batch([texts[i] for i in idx], vocab.path, lg, [df["study_id"][i] for i in idx])
        lab.index = idx
        parts.append(lab)
        evs.append(ev.rename(columns={"report": "study_id"}).assign(lang=lg))
        skipped.extend(sk)
    labels = pd.concat(parts).sort_index()
    out = pd.concat([df[["study_id", "patient_id"]].assign(lang=langs), labels], axis=1)
    cols = [c for c in out.columns if c not in ("study_id", "patient_id", "lang")]
    out[cols] = out[cols].astype("Int64")
    out.to_csv(labels_path, index=False)
    pd.concat(evs, ignore_index=True).to_csv(ev_path, index=False)
    skip_path = run_dir / "skipped_reports.csv"
    if len(skipped):
        skipped.save(skip_path)
    elif skip_path.exists():
        skip_path.unlink()
    meta_path.write_text(json.dumps({"key": key, "cohort": str(cohort_dir), "lang": lang,
                                     "vocabulary": str(vocabulary), "n_reports": len(out),
                                     "n_unusable": len(skipped)}, indent=1))
    return pd.read_csv(labels_path, dtype={"study_id": str, "patient_id": str, "lang": str})


def ensure_labels(run_dir: str | Path | None = None, profile: str = "smoke", seed: int | None = None,
                  lang: str = "ja", vocabulary: str = "abdominal-ct") -> pd.DataFrame:
    """Stage 01's idempotent entry point for later notebooks run standalone: ``run_dir/labels.csv`` and
    ``evidence.csv`` for the synthetic cohort of ``profile``/``seed``, computed only when missing or stale."""
    from lib import config, synth

    seed = config.DEFAULT_SEED if seed is None else seed
    return label_cohort(synth.ensure_cohort(profile, seed), lang, config.resolve_run_dir(run_dir, profile), vocabulary)


# ----------------------------------------------------------------------------- evaluation and display


def evaluate_against(truth_df: pd.DataFrame, labels_df: pd.DataFrame, uncertain_as: int = 0,
                     columns: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-label precision/recall/F1 of positive detection, and the confusion of truth vs label value.

    ``truth_df`` holds 0/1 per label (e.g. a synthetic cohort's ground_truth/labels.csv); rows are
    joined on ``study_id``. A label of -1 counts as ``uncertain_as`` (0: U-Zeros, 1: U-Ones); blank
    counts as 0. The table ends with a "macro" row (mean over labels with positives).
    """
    from sklearn.metrics import precision_recall_fscore_support

    if labels_df["study_id"].duplicated().any():
        raise ValueError("labels_df has several rows per study_id; filter one language first")
    cols = columns or [c for c in labels_df.columns if c in truth_df.columns and c not in
                       ("study_id", "patient_id", "lang")]
    merged = truth_df[["study_id", *cols]].merge(labels_df[["study_id", *cols]], on="study_id",
                                                 suffixes=("_true", "_pred"))
    rows, conf = [], []
    for c in cols:
        y = merged[f"{c}_true"].astype(int).to_numpy()
        v = merged[f"{c}_pred"].astype(float).to_numpy()
        pred = np.where(v == 1, 1, np.where(v == -1, uncertain_as, 0))
        p, r, f, _ = precision_recall_fscore_support(y, pred, average="binary", zero_division=np.nan)
        rows.append({"label": c, "n": len(y), "positives": int(y.sum()), "predicted": int(pred.sum()),
                     "tp": int(((pred == 1) & (y == 1)).sum()), "precision": p, "recall": r, "f1": f})
        kind = np.select([v == 1, v == -1, v == 0], ["positive (1)", "uncertain (-1)", "negative (0)"],
                         "blank")
        conf.append(pd.DataFrame({"truth": np.where(y == 1, "present", "absent"), "label": kind}))
    table = pd.DataFrame(rows)
    has_pos = table[table.positives > 0]
    macro = {"label": "macro", "n": int(table.n.max()) if len(table) else 0, "positives": int(table.positives.sum()),
             "predicted": int(table.predicted.sum()), "tp": int(table.tp.sum()),
             **{m: float(has_pos[m].mean()) for m in ("precision", "recall", "f1")}}
    table = pd.concat([table, pd.DataFrame([macro])], ignore_index=True)
    allc = pd.concat(conf, ignore_index=True) if conf else pd.DataFrame(columns=["truth", "label"])
    confusion = pd.crosstab(allc["truth"], allc["label"])
    order = [k for k in ("positive (1)", "uncertain (-1)", "negative (0)", "blank") if k in confusion.columns]
    return table, confusion[order]


_COLORS = {"affirmed": "#f8b4b4", "possible": "#fde68a", "negated": "#bfdbfe", "normal": "#bbf7d0",
           "historical": "#e5e7eb", "hypothetical": "#e5e7eb"}


def highlight_html(text: str, evidence: pd.DataFrame) -> str:
    """The report as HTML with each evidence span marked (colour = assertion, hover = label, trigger)."""
    spans = sorted(evidence[["start", "end", "label", "assertion", "trigger"]].itertuples(index=False),
                   key=lambda r: (r.start, -r.end))
    out, pos = [], 0
    for r in spans:
        s, e = int(r.start), int(r.end)
        if s < pos:
            continue
        title = html.escape(f"{r.label}: {r.assertion}" + (f" (trigger: {r.trigger})" if r.trigger else ""),
                            quote=True)
        out.append(html.escape(text[pos:s]))
        out.append(f'<mark style="background:{_COLORS.get(r.assertion, "#eee")}" title="{title}">'
                   f"{html.escape(text[s:e])}<sub>{html.escape(str(r.label))}: {r.assertion}</sub></mark>")
        pos = e
    out.append(html.escape(text[pos:]))
    return '<pre style="white-space:pre-wrap;font-family:inherit">' + "".join(out) + "</pre>"


def label_summary(labels_df: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    """Long table (label, value, count, fraction) for prevalence plots."""
    cols = columns or [c for c in labels_df.columns if c not in ("study_id", "patient_id", "lang")]
    rows = []
    for c in cols:
        v = labels_df[c].astype(float)
        for name, mask in (("positive", v == 1), ("uncertain", v == -1), ("negative", v == 0),
                           ("blank", v.isna())):
            rows.append({"label": c, "value": name, "count": int(mask.sum()),
                         "fraction": float(mask.mean()) if len(v) else 0.0})
    return pd.DataFrame(rows)
