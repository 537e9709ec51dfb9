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

Text is matched after NFKC normalisation with zero-width characters removed (full-width letters,
half-width katakana and a zero-width space inside a word would otherwise hide a finding); evidence
offsets always index the text as given. Time and memory grow linearly with a report's length: each
mention's assertion costs a few binary searches, and evidence keeps offsets, not sentence copies.
"""

from __future__ import annotations

import bisect
import html
import io
import json
import math
import re
import unicodedata
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from lib.cache import fingerprint
from lib.io import DataError, SkippedCases, write_json

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
LABEL_VALUES = (1.0, 0.0, -1.0)  # and blank: the only values a labels table may hold
EVIDENCE_CHARS = 1000  # longer sentences/phrases are shown abridged in evidence (their offsets stay exact)


# ----------------------------------------------------------------------------- text primitives


def _lower(text: str) -> str:
    """Lower-case without changing length, so match offsets index the original text."""
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in text)


def _key(phrase: str) -> str:
    """Lookup form of a phrase: normalised like report text, lower case, separators as one space."""
    return re.sub(r"[\s\-]+", " ", normalize_text(phrase).lower()).strip()


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

    if 2 * sum(_is_word_char(p[:1]) for p in phrases) > len(phrases):
        # mostly words (English): one look-behind per position rejects the inside of words before any branch
        words = [re.escape(ch) + emit(trie[ch], ch) for ch in sorted(trie) if _is_word_char(ch)]
        alts = [re.escape(ch) + emit(trie[ch], ch) for ch in sorted(trie) if not _is_word_char(ch)]
        if words:
            alts.insert(0, f"(?<![{_W}])(?:" + "|".join(words) + ")")
    else:
        # mostly CJK: literal first, so the engine skips positions by the set of first characters
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


# ----------------------------------------------------------------------------- normalisation

ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff"
_ZW = re.compile(f"[{ZERO_WIDTH}]")
# Kept as typed: a full-width full stop ends a Japanese sentence, the ASCII "." NFKC would turn it into does not.
_NFKC_KEEP = frozenset("\uff0e")
# Marks that join the character before them under NFKC although their combining class is 0 (voiced kana marks).
_JOINERS = frozenset("\u3099\u309a\uff9e\uff9f")


def _unstable(ch: str) -> bool:
    """True for a character that normalisation changes, removes, or joins to its neighbour."""
    return (ch in ZERO_WIDTH or ch in _JOINERS or unicodedata.combining(ch) != 0
            or (ch not in _NFKC_KEEP and unicodedata.normalize("NFKC", ch) != ch))


@lru_cache(maxsize=4096)
def _nfkc(cluster: str) -> str:
    if cluster[:1] in _NFKC_KEEP:
        return cluster[0] + _nfkc(cluster[1:]) if len(cluster) > 1 else cluster
    out = unicodedata.normalize("NFKC", cluster)
    return _ZW.sub("", out) if any(c in ZERO_WIDTH for c in out) else out


def _normalize(text: str, limit: int | None = None) -> tuple[str, array | None, array | None]:
    """(normalised text, start, end) where ``start[i]:end[i]`` is the span of the given text that normalised
    character ``i`` came from; both None when normalisation changes nothing (the usual case, no copy).

    Why per character cluster: NFKC joins a character with the marks after it (か + ゛ -> が) and may change
    the length ("㎜" -> "mm"); mapping each cluster keeps every offset exact. ``limit``: a ValueError as
    soon as the normalised text would be longer (NFKC can expand one character into 18).
    """
    if unicodedata.is_normalized("NFKC", text) and not _ZW.search(text):
        return text, None, None
    bad = "".join(sorted(c for c in set(text) if _unstable(c)))
    if not bad:
        return text, None, None
    joins = frozenset(c for c in bad if c in _JOINERS or unicodedata.combining(c))
    cls = "[" + re.escape(bad) + "]"
    pieces: list[str] = []
    starts, ends = array("i"), array("i")
    pos = n_out = 0
    for m in re.finditer(f"(?s:.?{cls}+)", text):
        a, b = m.span()
        if a > pos:
            pieces.append(text[pos:a])
            starts.extend(range(pos, a))
            ends.extend(range(pos + 1, a + 1))
            n_out += a - pos
        if joins.isdisjoint(text[a:b]):  # every character is its own cluster: map them in one go
            outs = list(map(_nfkc, text[a:b]))
            lens = list(map(len, outs))
            n_out += sum(lens)
            if limit is not None and n_out > limit:
                raise ValueError(f"text too long after normalisation (> {limit:,} characters)")
            if lens.count(1) == len(lens):
                starts.extend(range(a, b))
                ends.extend(range(a + 1, b + 1))
            else:
                for p, n in enumerate(lens, start=a):
                    starts.extend([p] * n)
                    ends.extend([p + 1] * n)
            pieces.append("".join(outs))
            pos = b
            continue
        p = a
        while p < b:  # clusters: a character and the marks that join it
            q = p + 1
            while q < b and text[q] in joins:
                q += 1
            cluster = text[p:q]
            out = _nfkc(cluster)
            if len(out) == len(cluster):
                starts.extend(range(p, q))
                ends.extend(range(p + 1, q + 1))
            else:
                starts.extend([p] * len(out))
                ends.extend([q] * len(out))
            pieces.append(out)
            n_out += len(out)
            if limit is not None and n_out > limit:
                raise ValueError(f"text too long after normalisation (> {limit:,} characters)")
            p = q
        pos = b
    pieces.append(text[pos:])
    starts.extend(range(pos, len(text)))
    ends.extend(range(pos + 1, len(text) + 1))
    n_out += len(text) - pos
    if limit is not None and n_out > limit:
        raise ValueError(f"text too long after normalisation ({n_out:,} characters > {limit:,})")
    return "".join(pieces), starts, ends


def normalize_text(text: str) -> str:
    """NFKC with zero-width characters (U+200B..U+200D, U+2060, U+FEFF) removed: the form that is matched.

    A full-width full stop is kept (it ends a Japanese sentence; an ASCII period does not).
    """
    return _normalize(text)[0]


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
# a period at a line end always ends the sentence, so it is one match with its line break (half the matches);
# a run of periods is tried from its first character only (from each one, "....x" would cost quadratic time)
_EN_BOUND = re.compile(r"(?<![.!?])(?:[.!?]++[ \t]*+\n|[.!?]++(?=\s|$))|\n")
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
    if lang != "ja" and ":" not in text:  # no header; one sentence unless a boundary comes before its end
        m = _EN_BOUND.search(text)
        if m is None or not text[m.end():].strip():
            core = text.strip()
            if not core:
                return []
            s = len(text) - len(text.lstrip())
            return [Sentence(s, s + len(core), "other")]
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


@dataclass(frozen=True, slots=True)
class _Trig:
    start: int
    end: int
    cat: str
    direction: str


# what may stand between a finding and a normal statement about it: "engorgement appears within normal limits"
_COPULA = re.compile(r"\s*(?:(?:is|are|was|were|appears?|seems?|looks?|remains?)"
                     r"(?:\s+(?:to\s+be|grossly|otherwise))?\s*)?")
_STATUS_CATS = ("negated", "possible", "normal")
_SCOPELESS = ("pseudo", "terminate")  # categories that assert nothing: a sentence with only these needs no clauses
_TEMPORAL_CATS = ("historical", "hypothetical")


class _Gaps:
    """How far a trigger reaches: at most ``WINDOW`` words (en, as ``str.split`` counts them) or characters (ja).

    Word starts are indexed once per text, so a gap is counted with two binary searches instead of
    splitting a copy of the text between trigger and mention (quadratic on one long sentence).
    """

    def __init__(self, low: str, lang: str) -> None:
        self.low, self.lang = low, lang
        self._starts: array | None = None

    def ok(self, a: int, b: int) -> bool:
        if self.lang == "ja":
            return b - a <= WINDOW["ja"]
        if b - a <= 256:  # short gap: splitting it is cheaper than the index
            return len(self.low[a:b].split()) <= WINDOW["en"]
        if self._starts is None:
            self._starts = array("i", (m.start() for m in re.finditer(r"\S+", self.low)))
        s = self._starts
        # words in low[a:b]: runs starting inside (a, b), plus the run holding a
        n = bisect.bisect_left(s, b) - bisect.bisect_right(s, a) + (not self.low[a].isspace())
        return n <= WINDOW["en"]


class _Scope:
    """One sentence's triggers, indexed so that a mention's assertion costs a few binary searches.

    Scope rules (NegEx / ConText): a trigger reaches a mention on its side(s) unless a terminator lies
    between them or they are more than ``WINDOW`` apart; overlapping triggers always reach it. A
    trigger's reach is monotone (when a farther trigger of one kind reaches the mention, the nearest
    of that kind does too), so only the nearest trigger of each kind on each side can decide: this
    gives the same answer as scanning every trigger for every mention, in linear total time.
    """

    SCAN_MAX = 16  # up to this many triggers a direct scan is faster than building the index

    def __init__(self, low: str, trigs: Sequence[_Trig], s0: int, s1: int, gaps: _Gaps) -> None:
        self.low, self.trigs, self.s0, self.s1, self.gaps = low, list(trigs), s0, s1, gaps
        trigs = self.trigs
        self.terms = [t for t in trigs if t.cat == "terminate"]
        self.term_starts: Sequence[int] = sorted(t.start for t in self.terms) if self.terms else ()
        self.term_ends: Sequence[int] = sorted(t.end for t in self.terms) if self.terms else ()
        self.indexed = len(trigs) > self.SCAN_MAX
        if self.indexed:
            self._index()

    def _index(self) -> None:
        trigs = self.trigs
        # int arrays, not lists: a run-on sentence may hold hundreds of thousands of triggers
        order = array("i", sorted(range(len(trigs)), key=lambda i: (trigs[i].start, i)))
        self.by_start = order
        self.starts = array("i", (trigs[i].start for i in order))
        self.pmax = array("i")  # running maximum of ends, in start order: where overlaps can stop
        top = -1
        for i in order:
            top = max(top, trigs[i].end)
            self.pmax.append(top)
        fwd: dict[str, list[tuple[int, int]]] = {c: [] for c in (*_STATUS_CATS, *_TEMPORAL_CATS)}
        bwd: dict[str, list[tuple[int, int]]] = {c: [] for c in fwd}
        for i, t in enumerate(trigs):
            if t.cat in fwd:
                if t.direction in ("forward", "both"):
                    fwd[t.cat].append((t.end, -i))  # nearest first from the right: ties go to the earlier trigger
                if t.direction in ("backward", "both"):
                    bwd[t.cat].append((t.start, i))
        self.fwd = {c: (array("i", (e for e, _ in sorted(v))), array("i", (-i for _, i in sorted(v))))
                    for c, v in fwd.items()}
        self.bwd = {c: (array("i", (x for x, _ in sorted(v))), array("i", (i for _, i in sorted(v))))
                    for c, v in bwd.items()}

    def _fwd_reaches(self, t: _Trig, ms: int) -> bool:
        j = bisect.bisect_left(self.term_starts, t.end)
        stop = min(self.term_starts[j], self.s1) if j < len(self.term_starts) else self.s1
        return ms < stop and self.gaps.ok(t.end, ms)

    def _bwd_reaches(self, t: _Trig, me: int) -> bool:
        j = bisect.bisect_right(self.term_ends, t.start) - 1
        stop = max(self.term_ends[j], self.s0) if j >= 0 else self.s0
        return me > stop and self.gaps.ok(me, t.start)

    def _nearest_fwd(self, cat: str, ms: int) -> int | None:
        ends, idx = self.fwd[cat]
        k = bisect.bisect_right(ends, ms) - 1
        if k < 0 or not self._fwd_reaches(self.trigs[idx[k]], ms):
            return None
        return idx[k]

    def _nearest_bwd(self, cat: str, me: int) -> int | None:
        starts, idx = self.bwd[cat]
        k = bisect.bisect_left(starts, me)
        if k == len(starts) or not self._bwd_reaches(self.trigs[idx[k]], me):
            return None
        return idx[k]

    def assert_span(self, ms: int, me: int) -> tuple[str, str, _Trig | None]:
        """(negation status, temporality, deciding trigger) of the mention [ms, me).

        Status is the nearest in-scope negated/possible trigger (ties: negated, then the earlier
        trigger); temporality is 'hypothetical' or 'historical' when such a trigger reaches the
        mention, else 'current'. A normal statement ("unremarkable") negates a mention it overlaps,
        touches, or follows after a copula ("X appears normal").
        """
        if not self.indexed:
            return self._scan(ms, me)
        trigs = self.trigs
        cands: list[tuple[int, int, int]] = []  # (distance, 0 negated/normal | 1 possible, trigger index)
        temporal: set[str] = set()
        j = bisect.bisect_left(self.starts, me) - 1
        while j >= 0 and self.pmax[j] > ms:  # triggers overlapping the mention
            i = self.by_start[j]
            t = trigs[i]
            j -= 1
            if t.end <= ms or t.cat in ("pseudo", "terminate"):
                continue
            if ms <= t.start and t.end <= me and (t.start, t.end) != (ms, me):
                continue  # a trigger word inside the finding's own name ("... suspicious for neoplasm")
            if t.cat in _TEMPORAL_CATS:
                temporal.add(t.cat)
            else:
                cands.append((0, int(t.cat == "possible"), i))
        for cat in _STATUS_CATS + _TEMPORAL_CATS:
            i = self._nearest_fwd(cat, ms)
            if i is not None:
                dist = ms - trigs[i].end
                if cat in _TEMPORAL_CATS:
                    temporal.add(cat)
                elif cat != "normal" or dist == 0:
                    cands.append((dist, int(cat == "possible"), i))
            if cat == "normal":
                continue
            i = self._nearest_bwd(cat, me)
            if i is not None:
                if cat in _TEMPORAL_CATS:
                    temporal.add(cat)
                else:
                    cands.append((trigs[i].start - me, int(cat == "possible"), i))
        # a normal statement after the mention counts only across a copula: try the few that start within one
        starts, idx = self.bwd["normal"]
        reach = _COPULA.match(self.low, me).end()
        for k in range(bisect.bisect_left(starts, me), bisect.bisect_right(starts, reach)):
            t = trigs[idx[k]]
            if not self._bwd_reaches(t, me):
                break
            if t.start == me or _COPULA.fullmatch(self.low, me, t.start):
                cands.append((t.start - me, 0, idx[k]))
                break
        temp = "hypothetical" if "hypothetical" in temporal else "historical" if temporal else "current"
        if not cands:
            return "affirmed", temp, None
        t = trigs[min(cands)[2]]
        return ("possible" if t.cat == "possible" else "negated"), temp, t


    def _scan(self, ms: int, me: int) -> tuple[str, str, _Trig | None]:
        """``assert_span`` by visiting every trigger (the rules spelled out; few triggers: no index needed)."""
        low, terms = self.low, self.terms
        best: tuple[int, int, _Trig] | None = None
        temporal = "current"
        for t in self.trigs:
            if t.cat in ("pseudo", "terminate"):
                continue
            if ms <= t.start and t.end <= me and (t.start, t.end) != (ms, me):
                continue  # a trigger word inside the finding's own name ("... suspicious for neoplasm")
            if t.start < me and ms < t.end:
                dist = 0
            elif t.end <= ms and t.direction in ("forward", "both"):
                stop = min([x.start for x in terms if x.start >= t.end] + [self.s1])
                if ms >= stop or not self.gaps.ok(t.end, ms):
                    continue
                dist = ms - t.end
            elif t.start >= me and t.direction in ("backward", "both"):
                stop = max([x.end for x in terms if x.end <= t.start] + [self.s0])
                if me <= stop or not self.gaps.ok(me, t.start):
                    continue
                dist = t.start - me
            else:
                continue
            if t.cat in _TEMPORAL_CATS:
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


# ----------------------------------------------------------------------------- clauses

_HIRAGANA = "\u3041-\u3096"
_KANJI = "\u3400-\u9fff\u3005"
_NOUN_START = re.compile(f"[{_KANJI}\u30a1-\u30ffa-z0-9]")  # what begins a noun: an attributive form precedes one


def _phrases(spec: dict, key: str) -> list[str]:
    return sorted({_key(str(p)) for p in spec.get(key) or []} - {""})


@cache
def _clause_grammar(lang: str) -> tuple[re.Pattern | None, re.Pattern | None, frozenset]:
    """The clause grammar of ``lang`` from ``triggers.yaml`` (``clause``): a regex whose groups are ``b``/``b2``
    boundaries, ``t`` topic markers, ``j`` conjunctions and ``n`` coordinators (consumed, never a boundary); a
    regex of case particles (``c``) and genitives (``g``), scanned only after a topic; and the singular words
    that begin a one-subject trigger."""
    spec = _trigger_spec().get(lang, {}).get("clause") or {}
    alts, after_topic = [], []
    if lang == "ja":
        if spec.get("coordinator"):
            alts.append(f"(?P<n>{_trie_pattern(_phrases(spec, 'coordinator'))})")
        if spec.get("continuative"):
            alts.append(f"(?P<b>{_trie_pattern(_phrases(spec, 'continuative'))}(?![{_HIRAGANA}]))")
        if spec.get("after_kanji"):
            alts.append(f"(?P<b2>(?<=[{_KANJI}]){_trie_pattern(_phrases(spec, 'after_kanji'))}(?![{_HIRAGANA}]))")
        if spec.get("topic") and spec.get("case"):
            alts.append(f"(?P<t>(?<![{_HIRAGANA}]){_trie_pattern(_phrases(spec, 'topic'))})")
            after_topic.append(f"(?P<c>(?<![{_HIRAGANA}]){_trie_pattern(_phrases(spec, 'case'))})")
            if spec.get("genitive"):
                after_topic.append(f"(?P<g>(?<![{_HIRAGANA}]){_trie_pattern(_phrases(spec, 'genitive'))})")
    elif spec.get("conjunction"):
        conj = _trie_pattern(_phrases(spec, "conjunction"))
        if spec.get("predicate"):
            alts.append(f"{_trie_pattern(_phrases(spec, 'predicate'))}(?P<b>\\s*,\\s*(?:{conj})?|\\s+{conj})")
        if spec.get("determiner"):
            alts.append(f"(?P<b2>{conj})(?=\\s+{_trie_pattern(_phrases(spec, 'determiner'))})")
        alts.append(f"(?P<j>{conj})")
    singular = frozenset(_phrases(spec, "singular"))
    return (re.compile("|".join(alts)) if alts else None,
            re.compile("|".join(after_topic)) if after_topic else None, singular)


def _reach_hull(trigs: list[_Trig], items: Sequence[tuple[int, int]], s0: int, s1: int) -> tuple[int, int]:
    """[lo, hi): where a clause boundary between mentions and the triggers that may reach them can begin (a
    superset, in linear time; a boundary's own words, "seen and", may begin inside a mention or trigger).
    Empty (lo >= hi) when every trigger touches or precedes the mentions it could reach."""
    lo, hi = s1, s0
    if not items:
        return lo, hi
    first_start, first_end = min(a for a, _ in items), min(b for _, b in items)
    last_start = max(a for a, _ in items)
    for t in trigs:
        if t.cat in _SCOPELESS:
            continue
        if t.direction != "forward" and t.start > first_end:
            lo, hi = min(lo, first_start), max(hi, t.start)
        if t.direction != "backward" and t.end < last_start:
            lo, hi = min(lo, t.start), max(hi, last_start)
    return lo, hi


def _with_clauses(low: str, s0: int, s1: int, lang: str, trigs: list[_Trig],
                  items: Sequence[tuple[int, int]] | None = None) -> list[_Trig]:
    """The sentence ``low[s0:s1]``'s triggers with its clause boundaries added as terminators, so that a trigger
    covers the clause it closes and not earlier chained clauses.

    Chained clauses end at a continuative form (「認め、」「〜しており」) or at a predicate followed by a comma or
    conjunction ("is seen and"); coordinated noun phrases (「A及びBは認めない」, "effusion and pneumothorax are not
    seen") hold no boundary. A topic 「Aは」 ends a clause when a case particle (「結節は肺癌を疑う」) or a genitive
    right before the trigger (「結節は転移の可能性」) follows it before the next trigger or boundary. A trigger
    in the singular ("is suspected") has one subject, so the conjunction before it is a boundary. A hedge used
    attributively (「肺塞栓を疑う造影欠損は認めない」) is dropped when a negation of its head noun follows in the
    same clause: the negation covers the whole noun phrase. ``items``: the spans of the sentence's mentions;
    only the text between them and the triggers that may reach them is scanned (all of it when None).
    """
    rx, rx_case, singular = _clause_grammar(lang)
    if rx is None:
        return trigs
    lo, hi = (s0, s1) if items is None else _reach_hull(trigs, items, s0, s1)
    if lo >= hi:
        return trigs
    bounds: list[_Trig] = []
    topics: list[tuple[int, int]] = []
    conjs: list[int] = []  # ends of conjunctions
    for m in rx.finditer(low, lo, s1):  # the sentence end stays the end: a guard must see what follows
        if m.start() >= hi:
            break
        kind = m.lastgroup
        if kind == "t":
            topics.append(m.span())
        elif kind == "j":
            conjs.append(m.end())
        elif kind == "b" or kind == "b2":
            a, b = m.span(kind)
            bounds.append(_Trig(a, b, "terminate", "both"))
            if lang == "en":
                conjs.append(b)
    if topics and rx_case is not None:
        cases: list[int] = []
        t_starts = None
        for m in rx_case.finditer(low, topics[0][1], s1):
            if m.lastgroup == "c":
                cases.append(m.start())
            else:  # a genitive counts where a trigger begins right after it
                if t_starts is None:
                    t_starts = {t.start for t in trigs if t.cat not in _SCOPELESS}
                if m.end() in t_starts:
                    cases.append(m.start())
        if cases:
            stops = sorted([t.start for t in trigs if t.cat != "pseudo"] + [t.start for t in bounds])
            for a, b in topics:
                k = bisect.bisect_left(cases, b)
                j = bisect.bisect_left(stops, b)
                if k < len(cases) and (j == len(stops) or cases[k] < stops[j]):
                    bounds.append(_Trig(a, b, "terminate", "both"))
    if singular and conjs:
        conjs.sort()
        for t in trigs:
            if (t.cat not in _SCOPELESS and t.direction != "forward"
                    and low[t.start:t.end].split(None, 1)[0] in singular):
                k = bisect.bisect_right(conjs, t.start) - 1
                if k >= 0:
                    bounds.append(_Trig(conjs[k], conjs[k], "terminate", "both"))
    if lang == "ja":
        trigs = _drop_attributive_hedges(low, s1, trigs, bounds)
    return trigs + bounds if bounds else trigs


def _drop_attributive_hedges(low: str, s1: int, trigs: list[_Trig], bounds: list[_Trig]) -> list[_Trig]:
    """Without the hedges that modify a noun which a later negation in the same clause denies."""
    hedges = [t for t in trigs if t.cat == "possible" and t.direction != "forward" and t.end < s1
              and _NOUN_START.match(low, t.end)]
    if not hedges:
        return trigs
    negs = sorted(t.start for t in trigs if t.cat == "negated")
    stops = sorted(t.start for t in (*trigs, *bounds) if t.cat == "terminate")
    drop = set()
    for h in hedges:
        k = bisect.bisect_left(negs, h.end)
        j = bisect.bisect_left(stops, h.end)
        if k < len(negs) and (j == len(stops) or negs[k] <= stops[j]):
            drop.add(h)
    return [t for t in trigs if t not in drop]


_SEP_RE = re.compile(r"[\s\-]+")


@lru_cache(maxsize=65536)
def _concept_words(concept: str) -> tuple[str, ...]:
    return tuple(w for w in _SEP_RE.split(_lower(concept).strip()) if w)


@lru_cache(maxsize=65536)
def _words_regex(words: tuple[str, ...]) -> re.Pattern:
    return re.compile(r"[\s\-]+".join(map(re.escape, words)))


def _find_all(low: str, word: str) -> list[tuple[int, int]]:
    """Non-overlapping occurrences of ``word``, by plain search (compiling a regex costs more than one sentence)."""
    out, n = [], len(word)
    i = low.find(word)
    while i >= 0:
        out.append((i, i + n))
        i = low.find(word, i + n)
    return out


def _find_concept(low: str, concept: str) -> list[tuple[int, int]]:
    words = _concept_words(concept)
    if not words:
        return []
    spans = _find_all(low, words[0]) if len(words) == 1 else [m.span() for m in _words_regex(words).finditer(low)]
    if spans:
        return spans
    for w in sorted(words, key=len, reverse=True):  # concept worded differently: anchor on its longest word
        if len(w) >= 3 or _CJK.search(w):
            i = low.find(w)
            if i >= 0:
                return [(i, i + len(w))]
    return []


def assertion(sentence: str, concept: str, lang: str = "en") -> str:
    """'affirmed', 'negated' or 'possible' for ``concept`` as used in ``sentence``.

    Hypothetical mentions ("rule out X") count as 'possible'; historical ones keep their status
    ("history of X" is affirmed, "no history of X" negated). When the concept occurs more than once
    the most positive reading wins; when its words are not in the sentence it is 'affirmed'. Both
    texts are normalised (NFKC, zero-width characters removed) before matching.
    """
    if not isinstance(sentence, str) or not isinstance(concept, str):
        raise TypeError(f"sentence and concept must be str, got {type(sentence).__name__}, "
                        f"{type(concept).__name__}")
    if lang in (None, "auto"):
        lang = detect_lang(sentence)
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {LANGS} or 'auto', got {lang!r}")
    sentence, concept = normalize_text(sentence), normalize_text(concept)
    low = _lower(sentence)
    spans = _find_concept(low, concept)
    if not spans:
        return "affirmed"
    matcher = _generic_triggers(lang)
    hits = matcher.find(low)
    if all(h[2] == "terminate" for h in hits):  # nothing can assert anything: no sentence split needed
        return "affirmed"
    sents = split_sentences(sentence, lang) or [Sentence(0, len(sentence), "other")]
    starts = [s.start for s in sents]
    # a concept inside a header ("ALLERGIES: ...") is a heading, not a mention
    spans = [sp for sp in spans if any(s.start <= sp[0] < s.end for s in sents)] or spans
    # test kits (NegEx) mark the target occurrence by upper-casing it in mixed-case text
    marked = [sp for sp in spans if sentence[sp[0]:sp[1]].isupper() and not concept.isupper()]
    if 0 < len(marked) < len(spans) and not sentence.isupper():
        spans = marked
    trig_hits = list(hits)
    # a pseudo-trigger running into the concept ("no change| in vision") is the concept's own word:
    # what precedes the concept is read again on its own ("no")
    span_starts = sorted(ms for ms, _ in spans)
    for a, b, cat, _ in list(trig_hits):
        k = bisect.bisect_right(span_starts, a)
        if cat == "pseudo" and k < len(span_starts) and span_starts[k] < b:
            trig_hits += matcher.find(low, a, span_starts[k])
    # triggers of a sentence: those overlapping it (found through start order and a running maximum of ends)
    if len(sents) > 1:
        order = sorted(range(len(trig_hits)), key=lambda i: (trig_hits[i][0], i))
        hit_starts = [trig_hits[i][0] for i in order]
        pmax, top = [], -1
        for i in order:
            top = max(top, trig_hits[i][1])
            pmax.append(top)
    gaps = _Gaps(low, lang)
    scopes: dict[int, _Scope] = {}
    results = []
    for ms, me in spans:
        k = max(0, bisect.bisect_right(starts, ms) - 1)
        if k not in scopes:
            s = sents[k]
            if len(sents) == 1:
                trigs = [_Trig(*h) for h in trig_hits if h[1] > s.start and h[0] < s.end]
            else:
                j = bisect.bisect_left(hit_starts, s.end) - 1
                inside = []
                while j >= 0 and pmax[j] > s.start:
                    if trig_hits[order[j]][1] > s.start:
                        inside.append(order[j])
                    j -= 1
                trigs = [_Trig(*trig_hits[i]) for i in sorted(inside)]  # list order decides ties
            if any(t.cat not in _SCOPELESS for t in trigs):
                trigs = _with_clauses(low, s.start, s.end, lang, trigs,
                                      [sp for sp in spans if s.start <= sp[0] < s.end])
            scopes[k] = _Scope(low, trigs, s.start, s.end, gaps)
        status, temporal, _ = scopes[k].assert_span(ms, me)
        if status == "affirmed" and temporal == "hypothetical":
            status = "possible"
        results.append(status)
    return max(results, key=lambda r: _RANK[r])


# ----------------------------------------------------------------------------- labelling

# Evidence of one mention, in offsets of the analysed text: section, sentence span, evidence span, label,
# assertion, trigger span ((-1, -1): none), counted.
_Ev = tuple[str, int, int, int, int, str, str, int, int, bool]
# A normal statement and the organs it covers give one evidence row per pair up to this many pairs per
# clause; beyond it (a run-on clause naming organs and "normal" hundreds of times) one row per organ.
_MAX_NORMAL_PAIRS = 64


def _analyse(text: str, vocab: Vocabulary, lang: str) -> tuple[dict[str, float], list[_Ev]]:
    """Label values and evidence (offsets only) of one report, in time and memory linear in its length."""
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
        if i in by_sent and a < sents[i].end:  # only sentences with mentions need their triggers
            trig_by_sent.setdefault(i, []).append(_Trig(a, b, cat, d))
    del triggers

    best: dict[str, str] = {}
    normal_organs: set[str] = set()
    others: list[str] = []
    evidence: list[_Ev] = []
    maxd = COMPOSE_DISTANCE[lang]
    gaps = _Gaps(low, lang)
    for i, found in by_sent.items():
        s = sents[i]
        counted = s.section not in IGNORED_SECTIONS
        trigs = trig_by_sent.get(i, [])
        if any(t.cat not in _SCOPELESS for t in trigs):
            trigs = _with_clauses(low, s.start, s.end, lang, trigs, [(a, b) for a, b, _, _ in found])
        scope = _Scope(low, trigs, s.start, s.end, gaps)
        organs = [(a, b, o) for a, b, k, o in found if k == "organ"]  # disjoint, in text order
        centres = [a + b for a, b, _ in organs]
        mentions: list[tuple[int, int, int, int, tuple, str]] = []  # span, evidence span, labels, kind
        for a, b, kind, payload in found:
            if kind == "label":
                mentions.append((a, b, a, b, payload, "label"))
            elif kind == "other":
                mentions.append((a, b, a, b, ("other finding",), "other"))
            elif kind == "head" and organs:
                k = bisect.bisect_left(centres, a + b)  # nearest organ (ties: the earlier one)
                if k == len(organs) or (k > 0 and a + b - centres[k - 1] <= centres[k] - (a + b)):
                    k -= 1
                oa, ob, organ = organs[k]
                lo, hi = min(oa, a), max(ob, b)
                if organ in payload and hi - lo - (ob - oa) - (b - a) <= maxd:
                    mentions.append((a, b, lo, hi, (payload[organ],), "composed"))
        for a, b, ea, eb, labs, kind in mentions:
            status, temporal, trig = scope.assert_span(a, b)
            shown = status if temporal == "current" else temporal
            use = counted and temporal == "current"
            ts, te = (trig.start, trig.end) if trig else (-1, -1)
            for lab in labs:
                evidence.append((s.section, s.start, s.end, ea, eb, lab, shown, ts, te, use))
                if not use:
                    continue
                if kind == "other":
                    if status != "negated":
                        others.append(lab)
                elif _RANK[status] > _RANK.get(best.get(lab, ""), -1):
                    best[lab] = status
        if counted:
            _normal_statements(s, trigs, scope, organs, vocab, normal_organs, evidence)
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


def _normal_statements(s: Sentence, trigs: list[_Trig], scope: _Scope, organs: list[tuple[int, int, str]],
                       vocab: Vocabulary, normal_organs: set[str], evidence: list[_Ev]) -> None:
    """Organs a normal statement covers ("The liver and spleen are unremarkable" / 「肝に異常を認めない」).

    A statement covers the organs of its clause (between terminators); clauses are found by binary
    search, so a long run-on sentence costs linear time.
    """
    normals = [t for t in trigs if t.cat == "normal"]
    if not normals or not organs:
        return
    o_starts = [a for a, _, _ in organs]
    o_ends = [b for _, b, _ in organs]
    clauses: dict[tuple[int, int], list[_Trig]] = {}
    for t in normals:
        j = bisect.bisect_right(scope.term_ends, t.start) - 1
        lo = max(scope.term_ends[j], s.start) if j >= 0 else s.start
        j = bisect.bisect_left(scope.term_starts, t.end)
        hi = min(scope.term_starts[j], s.end) if j < len(scope.term_starts) else s.end
        clauses.setdefault((lo, hi), []).append(t)
    for (lo, hi), ts in clauses.items():
        covered = [o for o in organs[bisect.bisect_left(o_starts, lo):bisect.bisect_right(o_ends, hi)]
                   if o[0] >= lo and o[2] in vocab.organ_normal]
        if not covered:
            continue
        normal_organs.update(o for _, _, o in covered)
        if len(ts) * len(covered) <= _MAX_NORMAL_PAIRS:
            pairs = [(t, o) for t in ts for o in covered]
        else:
            t_ends = [t.end for t in ts]
            pairs = []
            for o in covered:  # the statement nearest to each organ
                k = bisect.bisect_left(t_ends, o[0])
                near = [ts[x] for x in (k - 1, k) if 0 <= x < len(ts)]
                pairs.append((min(near, key=lambda t, o=o: abs(t.start + t.end - o[0] - o[1])), o))
        for t, (oa, ob, organ) in pairs:
            evidence.append((s.section, s.start, s.end, min(oa, t.start), max(ob, t.end), f"{organ} (normal)",
                             "normal", t.start, t.end, True))


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


def _excerpt(text: str, a: int, b: int) -> str:
    """``text[a:b]``, or its first 100 and last 40 characters beyond ``EVIDENCE_CHARS`` (a run-on sentence
    repeated on each of its mentions' rows would make evidence.csv grow with the square of its length)."""
    if b - a <= EVIDENCE_CHARS:
        return text[a:b]
    return f"{text[a:a + 100]} … {text[b - 40:b]}"


EV_COLUMNS = ["report", "section", "sentence", "phrase", "start", "end", "label", "assertion", "trigger",
              "counted", "sentence_start", "sentence_end"]


def _evidence_rows(rid: object, raw: str, ev: list[_Ev], starts: array | None, ends: array | None
                   ) -> list[tuple]:
    """Evidence rows with offsets into the text as given (mapped back through normalisation) and text
    excerpts; one sentence excerpt per sentence, shared by its rows, never a copy per mention."""
    sentences: dict[tuple[int, int], tuple[int, int, str]] = {}
    rows = []
    limit = EVIDENCE_CHARS
    for section, s0, s1, ea, eb, lab, shown, ts, te, use in ev:
        if starts is not None and ends is not None:
            ea, eb = starts[ea], ends[eb - 1]
            if ts >= 0:
                ts, te = starts[ts], ends[te - 1]
        sent = sentences.get((s0, s1))
        if sent is None:
            r0, r1 = (s0, s1) if starts is None or ends is None else (starts[s0], ends[s1 - 1])
            sent = sentences[s0, s1] = (r0, r1, _excerpt(raw, r0, r1))
        phrase = raw[ea:eb] if eb - ea <= limit else _excerpt(raw, ea, eb)
        trigger = "" if ts < 0 else raw[ts:te] if te - ts <= limit else _excerpt(raw, ts, te)
        rows.append((rid, section, sent[2], phrase, ea, eb, lab, shown, trigger, use, sent[0], sent[1]))
    return rows


def _label_batch(texts: list, vocabulary: str | Path, lang: str = "en", ids: list | None = None
                 ) -> tuple[pd.DataFrame, pd.DataFrame, SkippedCases]:
    vocab = load_vocabulary(vocabulary)
    if lang not in (*LANGS, "auto"):
        raise ValueError(f"lang must be one of {LANGS} or 'auto', got {lang!r}")
    texts = list(texts)
    ids = list(range(len(texts))) if ids is None else list(ids)
    rows: list[dict[str, float]] = []
    evidence: list[tuple] = []
    skipped = SkippedCases()
    for rid, value in zip(ids, texts, strict=True):
        try:
            raw = _as_text(value)
            text, starts, ends = _normalize(raw, MAX_CHARS)
            if not text.strip():
                raise ValueError("empty text (only zero-width characters)")
            values, ev = _analyse(text, vocab, detect_lang(raw) if lang == "auto" else lang)
            ev_rows = _evidence_rows(rid, raw, ev, starts, ends)
        except Exception as exc:  # one unusable report never stops the batch
            skipped.add(str(rid), exc if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}",
                        stage="reports")
            values, ev_rows = {}, []
        rows.append(values)
        evidence.extend(ev_rows)
    labels = pd.DataFrame(rows, columns=vocab.columns, dtype=float)
    labels.index = pd.RangeIndex(len(texts))
    # plain records, not a DataFrame: pandas compares attrs when frames are concatenated or merged
    labels.attrs["unusable"] = [{"row": r["case"], **{k: r[k] for k in ("stage", "file", "reason")}}
                                for r in skipped.rows]
    return labels, pd.DataFrame.from_records(evidence, columns=EV_COLUMNS), skipped


def label_reports(texts: list[str], vocabulary: str, lang: str = "en") -> pd.DataFrame:
    """One row per text, CheXpert-style columns: 1 positive, 0 negative, -1 uncertain, NaN not mentioned.

    ``vocabulary``: "chest-xray" (CheXpert observations incl. "No Finding"), "abdominal-ct"
    (``lib.synth.LABEL_COLUMNS`` + ``ABNORMAL_COLUMNS``) or a YAML path. ``lang``: "en", "ja" or
    "auto" (per text). Unusable texts (None, NaN, empty, not text, undecodable bytes, too long) give
    an all-blank row and are listed in ``result.attrs["unusable"]``: a list of {row, stage, file,
    reason} records (``pd.DataFrame(result.attrs["unusable"])`` for a table).
    """
    return _label_batch(texts, vocabulary, lang)[0]


def report_evidence(texts: list[str], vocabulary: str, lang: str = "en", ids: list | None = None) -> pd.DataFrame:
    """Every mention behind the labels: report id, section, sentence, matched phrase, character span
    (``start``/``end`` in the report text as given, before normalisation), label, assertion
    (affirmed/negated/possible/historical/hypothetical/normal), the deciding trigger, whether it counted
    (mentions in indication/comparison sections do not), and the sentence's span (``sentence_start``/
    ``sentence_end``). ``sentence``/``phrase``/``trigger`` are abridged beyond ``EVIDENCE_CHARS``."""
    return _label_batch(texts, vocabulary, lang, ids)[1]


def label_reports_with_evidence(texts: list[str], vocabulary: str, lang: str = "en", ids: list | None = None
                                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Labels and evidence from one pass (what ``label_cohort`` uses)."""
    labels, evidence, _ = _label_batch(texts, vocabulary, lang, ids)
    return labels, evidence


# ----------------------------------------------------------------------------- cohort entry point

# characters a CP932 decoding yields from bytes that are not Japanese text (Microsoft private-use
# fallbacks and C1 controls): their presence means the file is not Shift-JIS either
_NOT_CP932 = re.compile(r"[\x80-\x9f\ue000-\uf8ff]")


def decode_text_file(path: Path, raw: bytes) -> tuple[str, str]:
    """(text, encoding) of a text file: UTF-8 (with or without BOM), else Shift-JIS / CP932.

    Why: Japanese hospital exports are often CP932, and reading them as UTF-8 with replacement gives
    all-blank labels without an error. Refused with a DataError when neither decodes, when the CP932
    reading holds no Japanese text, or when the bytes are mostly valid UTF-8 with a few broken ones (a
    corrupt UTF-8 file also "decodes" as CP932, as mojibake).
    """
    try:
        return raw.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError as exc:
        utf8_error = exc
    where = f"byte 0x{raw[utf8_error.start]:02x} at offset {utf8_error.start}"
    try:
        text = raw.decode("cp932")
    except UnicodeDecodeError as exc:
        raise DataError(path, f"neither UTF-8 ({where}) nor Shift-JIS/CP932 ({exc.reason} at offset "
                              f"{exc.start}); save it as UTF-8") from exc
    as_utf8 = raw.decode("utf-8", errors="replace")
    n_bad = as_utf8.count("\ufffd")
    n_good = len(as_utf8) - len(as_utf8.encode("ascii", errors="ignore")) - n_bad
    if n_good >= n_bad or _NOT_CP932.search(text) or not _CJK.search(text):
        raise DataError(path, f"not valid UTF-8 ({n_bad} undecodable byte(s), first {where}) and not "
                              "Shift-JIS/CP932 Japanese text either; fix or re-export it as UTF-8")
    return text, "cp932"


#: Columns of a reports table the labeller reads (``study_id`` and ``text`` required, the others optional).
REPORT_COLUMNS = ("study_id", "text", "patient_id", "lang")


def report_column_map(columns: Mapping[str, str] | None) -> dict[str, str]:
    """``{standard name: column in the user's CSV}`` checked: only :data:`REPORT_COLUMNS` may be mapped."""
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(REPORT_COLUMNS))
    if unknown:
        raise ValueError(f"report columns {unknown} are not report fields; map any of {list(REPORT_COLUMNS)} to "
                         "your CSV's column names, e.g. {'study_id': '検査ID', 'text': '所見'}")
    return {k: str(v) for k, v in columns.items()}


def read_reports_csv(path: str | Path, columns: Mapping[str, str] | None = None) -> tuple[pd.DataFrame, SkippedCases]:
    """reports.csv as strings, decoded as UTF-8 or Shift-JIS/CP932 (``df.attrs["encoding"]``).

    ``columns`` maps the standard names (``study_id``, ``text``, ``patient_id``, ``lang``) to the CSV's own
    column names (``{"study_id": "検査ID", "text": "所見"}``); the table comes back with the standard names.
    Returns the table and the skip records of its rows (none are produced while reading; the batch
    labeller adds unusable rows).
    """
    path = Path(path)
    mapping = report_column_map(columns)
    if not path.exists():
        raise DataError(path, "file not found")
    decoded, encoding = decode_text_file(path, path.read_bytes())
    try:
        df = pd.read_csv(io.StringIO(decoded), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(path, f"not a readable CSV ({exc})") from exc
    df.columns = [str(c).strip().lstrip("\ufeff") for c in df.columns]
    absent = {k: v for k, v in mapping.items() if v not in df.columns}
    if absent:
        raise DataError(path, "mapped column(s) not found: " + ", ".join(f"{k} -> {v!r}" for k, v in absent.items())
                        + f"; found {list(df.columns)}")
    clash = sorted(k for k, v in mapping.items() if k in df.columns and v != k)
    df = df.drop(columns=clash).rename(columns={v: k for k, v in mapping.items()})
    missing = {"study_id", "text"} - set(df.columns)
    if missing:
        hint = " (name your CSV's columns with report_columns, e.g. {'study_id': '検査ID', 'text': '所見'})"
        raise DataError(path, f"missing column(s) {sorted(missing)}; found {list(df.columns)}{hint}")
    df.attrs["encoding"] = encoding
    return df, SkippedCases()


def check_label_values(df: pd.DataFrame, columns: Sequence[str] | None = None, source: str | Path = "labels",
                       allowed: Sequence[float] = LABEL_VALUES) -> pd.DataFrame:
    """``df`` unchanged when every value of ``columns`` is blank or in ``allowed``, else a DataError.

    Why: a stray "2", "yes" or "0.5" in a labels table would otherwise become a class of its own (or be
    silently counted as negative). The error names the file (``source``), each bad column and its values.
    ``columns`` defaults to every column except study_id / patient_id / lang.
    """
    cols = list(columns) if columns is not None else [c for c in df.columns
                                                       if c not in ("study_id", "patient_id", "lang")]
    ok = {float(v) for v in allowed}
    problems = []
    for c in cols:
        v = df[c]
        if v.dtype == bool:
            bad = v.astype(str)
        else:
            text = v.astype("string").str.strip()
            present = v.notna() & (text != "")
            num = pd.to_numeric(text[present], errors="coerce").astype(float)
            bad = v[present][~num.isin(ok)]
        if len(bad):
            shown = sorted({str(x) for x in bad})[:8]
            problems.append(f"column {c!r}: {len(bad)} value(s) not in {_allowed_text(ok)}, e.g. {shown}")
    if problems:
        raise DataError(source, "; ".join(problems))
    return df


def _allowed_text(ok: set[float]) -> str:
    return "/".join(f"{v:g}" for v in sorted(ok, reverse=True)) + "/blank"


def read_labels(path: str | Path, columns: Sequence[str] | None = None,
                allowed: Sequence[float] = LABEL_VALUES) -> pd.DataFrame:
    """A labels table (``labels.csv`` or ``ground_truth/labels.csv``) with its values checked.

    ``attrs["source"]`` keeps the path (a string), so later checks can name the file.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "labels file not found")
    try:  # as text first, so an error quotes the values as written ("2", not 2.0)
        df = pd.read_csv(path, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(path, f"not a readable CSV ({exc})") from exc
    cols = list(columns) if columns is not None else [c for c in df.columns
                                                       if c not in ("study_id", "patient_id", "lang")]
    check_label_values(df, cols, path, allowed)
    for c in cols:
        df[c] = pd.to_numeric(df[c].astype(object).where(df[c].notna() & (df[c].str.strip() != "")))
    df.attrs["source"] = str(path)
    return df


def with_report_defaults(df: pd.DataFrame, lang: str) -> pd.DataFrame:
    """A reports table with ``lang`` (``lang`` when the CSV has no language column; lower-cased) and
    ``patient_id`` (blank when absent) columns, as the labeller and the notebooks read it."""
    df = df.copy()
    if "lang" not in df.columns:
        df["lang"] = lang if lang in LANGS else ""
    if "patient_id" not in df.columns:
        df["patient_id"] = ""
    df["lang"] = df["lang"].str.strip().str.lower()
    return df


def label_cohort(cohort_dir: str | Path, lang: str = "ja", run_dir: str | Path | None = None,
                 vocabulary: str = "abdominal-ct", force: bool = False, scheduler: str | None = None,
                 reports_csv: str | Path | None = None, columns: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Label ``<cohort>/reports.csv`` (or ``reports_csv``, its columns named by ``columns`` as in
    :func:`read_reports_csv`) and write ``run_dir/labels.csv`` + ``run_dir/evidence.csv``.

    Idempotent: when reports, vocabulary, triggers, code and arguments are unchanged the cached
    ``labels.csv`` is returned (its values checked: a hand-edited "2" is refused, not made a class).
    ``lang``: "en"/"ja" keep that language's rows; "auto" labels every row in its own language.
    reports.csv may be UTF-8 or Shift-JIS/CP932. Never reads ``ground_truth/`` (evaluation is
    ``evaluate_against``). ``scheduler``: None labels in this process; ``"local"`` or a Dask scheduler address
    labels in chunks there (``lib.cluster.label_texts``), with the same files as a result.
    """
    from lib import cluster, config

    scheduler = cluster.check_scheduler(scheduler)

    cohort_dir = Path(cohort_dir)
    run_dir = config.resolve_run_dir(run_dir)
    path = Path(reports_csv) if reports_csv else cohort_dir / "reports.csv"
    if not path.exists():
        raise DataError(path, "file not found (expected a reports CSV with study_id and text columns)")
    vocab = load_vocabulary(vocabulary)
    columns = report_column_map(columns)
    key = fingerprint({"lang": lang, "vocabulary": str(vocabulary), "columns": columns}, ("lib.reports",),
                      files=[path, vocab.path, VOCAB_DIR / "triggers.yaml"])
    meta_path, labels_path, ev_path = run_dir / "labels.json", run_dir / "labels.csv", run_dir / "evidence.csv"
    if (not force and meta_path.exists() and labels_path.exists() and ev_path.exists()
            and json.loads(meta_path.read_text()).get("key") == key):
        return read_labels(labels_path)

    df, skipped = read_reports_csv(path, columns)
    df = with_report_defaults(df, lang)
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
        batch = ([texts[i] for i in idx], vocab.path, lg, [df["study_id"][i] for i in idx])
        lab, ev, sk = (_label_batch(*batch) if scheduler is None
                       else cluster.label_texts(*batch, scheduler=scheduler))
        lab.index = idx
        lab.attrs = {}  # unusable rows travel in ``skipped``; parts must concatenate whatever their attrs
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
    write_json(meta_path, {"key": key, "cohort": str(cohort_dir), "reports": str(path), "lang": lang,
                           "vocabulary": str(vocabulary), "n_reports": len(out), "n_unusable": len(skipped),
                           "encoding": df.attrs.get("encoding", "utf-8")})
    return read_labels(labels_path)


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
    counts as 0. The table ends with a "macro" row (mean over labels with positives). Values outside
    0/1 (truth) or 1/0/-1/blank (labels) are refused with a DataError naming the table
    (``attrs["source"]`` when read with ``read_labels``), the column and the values.
    """
    from sklearn.metrics import precision_recall_fscore_support

    if labels_df["study_id"].duplicated().any():
        raise ValueError("labels_df has several rows per study_id; filter one language first")
    cols = columns or [c for c in labels_df.columns if c in truth_df.columns and c not in
                       ("study_id", "patient_id", "lang")]
    truth_src = truth_df.attrs.get("source", "truth_df")
    check_label_values(truth_df, cols, truth_src, allowed=(1, 0))
    blank = [c for c in cols if truth_df[c].isna().any()]
    if blank:
        raise DataError(truth_src, f"blank truth values in column(s) {blank} (truth must be 0 or 1)")
    check_label_values(labels_df, cols, labels_df.attrs.get("source", "labels_df"))
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
    """Long table (label, value, count, fraction) for prevalence plots (values outside 1/0/-1/blank refused)."""
    cols = columns or [c for c in labels_df.columns if c not in ("study_id", "patient_id", "lang")]
    check_label_values(labels_df, cols, labels_df.attrs.get("source", "labels_df"))
    rows = []
    for c in cols:
        v = labels_df[c].astype(float)
        for name, mask in (("positive", v == 1), ("uncertain", v == -1), ("negative", v == 0),
                           ("blank", v.isna())):
            rows.append({"label": c, "value": name, "count": int(mask.sum()),
                         "fraction": float(mask.mean()) if len(v) else 0.0})
    return pd.DataFrame(rows)
