"""Cleaning transforms: Unicode normalization, mojibake repair, HTML remnants, control characters
and whitespace, and boilerplate lines repeated across the documents of one source.

Each class is one curation step (see :class:`lmforge.curation.base.Step`); a transform rewrites
``doc["text"]`` and returns a removal reason only when nothing is left.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter

import xxhash

from lmforge.config.curation import BoilerplateConfig, NormalForm

# Control characters other than newline and tab are noise from PDFs, terminals and bad encodings;
# zero-width characters and the BOM hide inside words and split them for the tokenizer.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_INNER_SPACES = re.compile(r"(?<=\S)[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")
# UTF-8 read as Latin-1/cp1252 leaves these pairs behind (Ã©, â€™, Â ); clean text rarely has them.
_MOJIBAKE_HINT = re.compile("[ÃÂâÅÐÑ][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6"
                            "\u02dc\u2013\u2014\u2018-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122]")
# Only real HTML tag names: docstrings and code hold `<class 'int'>` and `a < b`, which must stay.
_TAG_NAMES = ("a|abbr|article|aside|b|blockquote|body|br|button|center|code|div|em|figcaption|figure|font|"
              "footer|form|h[1-6]|head|header|hr|html|i|iframe|img|input|label|li|link|main|meta|nav|noscript|"
              "ol|option|p|pre|section|select|small|span|strong|sub|sup|table|tbody|td|th|thead|title|tr|u|ul")
_SCRIPT = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.I | re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_BLOCK_TAG = re.compile(r"</?(?:br|p|div|li|tr|h[1-6]|hr|section|article|header|footer|nav|ul|ol|table)\b[^<>]*>",
                        re.I)
_TAG = re.compile(rf"</?(?:{_TAG_NAMES})\b(?:\s[^<>]*)?/?>", re.I)
_ENTITY = re.compile(r"&(?:#\d{1,7}|#x[0-9a-f]{1,6}|[a-z]{2,8});", re.I)


class Normalize:
    name = "normalize"

    def __init__(self, form: NormalForm) -> None:
        self.form = form
        self.counts: Counter = Counter()

    def __call__(self, doc: dict) -> str | None:
        if self.form != "none":
            text = doc["text"]
            # is_normalized is a fast C check; most text is already normal.
            if not unicodedata.is_normalized(self.form, text):
                doc["text"] = unicodedata.normalize(self.form, text)
                self.counts["documents"] += 1
        return None


class FixMojibake:
    """ftfy repairs text decoded with the wrong codec; a cheap regex decides whether to ask it."""

    name = "fix_mojibake"

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        try:
            import ftfy

            # Only the encoding repair: quotes, widths and ligatures are left to `normalize`.
            config = ftfy.TextFixerConfig(unescape_html=False, normalization=None, uncurl_quotes=False,
                                          fix_latin_ligatures=False, fix_character_width=False, explain=False)
            self._fix = lambda text: ftfy.fix_text(text, config)
        except ImportError:  # ftfy is a dependency; this keeps a broken install usable
            self._fix = _recode

    def __call__(self, doc: dict) -> str | None:
        text = doc["text"]
        if _MOJIBAKE_HINT.search(text):
            fixed = self._fix(text)
            if fixed != text:
                doc["text"] = fixed
                self.counts["documents"] += 1
        return None


def _recode(text: str) -> str:
    try:
        return text.encode("cp1252").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


class StripHtml:
    name = "strip_html"

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def __call__(self, doc: dict) -> str | None:
        text = doc["text"]
        if "<" in text and (_TAG.search(text) or _COMMENT.search(text)):
            text = _COMMENT.sub("", _SCRIPT.sub("", text))
            text = _TAG.sub("", _BLOCK_TAG.sub("\n", text))
            self.counts["documents"] += 1
        if "&" in text and _ENTITY.search(text):
            text = html.unescape(text)
        doc["text"] = text
        return None if text.strip() else "empty"


class CleanWhitespace:
    """Drop control characters, unify newlines, squeeze spaces inside lines (indentation stays)."""

    name = "clean_whitespace"

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def __call__(self, doc: dict) -> str | None:
        text = _CONTROL.sub("", doc["text"].replace("\r\n", "\n").replace("\r", "\n"))
        lines = [_INNER_SPACES.sub(" ", line).rstrip() for line in text.split("\n")]
        text = _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip("\n")
        doc["text"] = text
        return None if text.strip() else "empty"


# ---------------------------------------------------------------- boilerplate


def line_key(line: str) -> int:
    return xxhash.xxh64_intdigest(" ".join(line.lower().split()).encode("utf-8", "surrogatepass"))


def count_lines(doc: dict, counts: dict[str, Counter], cfg: BoilerplateConfig) -> None:
    """Count, per source, the documents each long-enough line appears in (once per document)."""
    keys = {line_key(line) for line in doc["text"].split("\n") if len(line.strip()) >= cfg.min_line_chars}
    counts.setdefault(doc["source"], Counter()).update(keys)
    counts[doc["source"]][0] += 1  # key 0 holds the source's document count


def boilerplate_lines(counts: dict[str, Counter], cfg: BoilerplateConfig) -> dict[str, set[int]]:
    """The line keys of each source that cross both thresholds."""
    found: dict[str, set[int]] = {}
    for source, counter in counts.items():
        needed = max(cfg.min_documents, cfg.min_fraction * counter[0])
        found[source] = {key for key, n in counter.items() if key and n >= needed}
    return found


class RemoveBoilerplate:
    name = "boilerplate"

    def __init__(self, lines: dict[str, set[int]], cfg: BoilerplateConfig) -> None:
        self.lines = lines
        self.cfg = cfg
        self.counts: Counter = Counter()

    def __call__(self, doc: dict) -> str | None:
        known = self.lines.get(doc["source"])
        if not known:
            return None
        kept, dropped = [], 0
        for line in doc["text"].split("\n"):
            if len(line.strip()) >= self.cfg.min_line_chars and line_key(line) in known:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            self.counts["lines"] += dropped
            doc["text"] = _BLANK_LINES.sub("\n\n", "\n".join(kept)).strip("\n")
        return None if doc["text"].strip() else "boilerplate_only"
