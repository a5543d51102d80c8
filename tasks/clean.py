"""Wikitext -> plain prose sections, as DPR's passages need them.

Cheap regex/scanner passes first remove what is never prose and is costly to parse (comments,
`<ref>`s, templates, tables, math/gallery-style tags); mwparserfromhell then handles the rest
(links, remaining tags, entities). Removing those before parsing roughly doubles the speed and
shrinks the input on which mwparserfromhell can misbehave.

The cleaning functions are pure: no time limits of their own. The guard against pathological pages
(size cap and time budget, enforced from outside the parsing call) lives in `tasks.passages`, which
runs them in a child process (`python -m tasks.clean`) speaking the frame protocol at the bottom
of this module.
"""

from __future__ import annotations

import json
import re
import signal
import struct
import sys
from dataclasses import dataclass, field, fields

import mwparserfromhell
from mwparserfromhell.nodes import ExternalLink, HTMLEntity, Tag, Text, Wikilink

# Trailing, non-prose sections, per language. Headings are compared lower-cased.
DROP_SECTIONS: dict[str, tuple[str, ...]] = {
    "en": ("references", "external links", "see also", "further reading", "notes", "bibliography",
           "sources", "footnotes", "citations", "notes and references", "references and notes",
           "works cited", "external link", "reference", "general references", "primary sources",
           "secondary sources", "selected bibliography", "discography", "filmography", "gallery"),
    "de": ("einzelnachweise", "weblinks", "literatur", "siehe auch", "anmerkungen", "quellen",
           "belege", "fußnoten"),
    "fr": ("références", "liens externes", "voir aussi", "notes et références", "bibliographie",
           "articles connexes", "notes", "sources"),
    "es": ("referencias", "enlaces externos", "véase también", "bibliografía", "notas", "fuentes"),
    "it": ("note", "bibliografia", "voci correlate", "collegamenti esterni", "altri progetti"),
    "nl": ("referenties", "externe links", "zie ook", "bronnen", "literatuur", "noten"),
}
FILE_NAMESPACES: dict[str, tuple[str, ...]] = {
    "en": ("file", "image", "media"),
    "de": ("datei", "bild"),
    "fr": ("fichier", "image"),
    "es": ("archivo", "imagen"),
    "it": ("file", "immagine"),
    "nl": ("bestand", "afbeelding"),
}
CATEGORY_NAMESPACES: dict[str, tuple[str, ...]] = {
    "en": ("category",),
    "de": ("kategorie",),
    "fr": ("catégorie",),
    "es": ("categoría",),
    "it": ("categoria",),
    "nl": ("categorie",),
}
DISAMBIGUATION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "en": ("disambiguation", "disambig", "dab", "disamb", "dbig", "hndis", "geodis", "numberdis",
           "hospitaldis", "schooldis", "mil-unit-dis", "roaddis", "shipindex", "set index article",
           "letter-number combination disambiguation", "surname", "given name"),
    "de": ("begriffsklärung",),
    "fr": ("homonymie", "patronymie", "toponymie"),
    "es": ("desambiguación",),
    "it": ("disambigua",),
    "nl": ("dp", "dpintro"),
}
# Inline interwiki prefixes whose link text is prose (unlike interlanguage links, which are not).
INLINE_INTERWIKI = frozenset({
    "w", "wikt", "wiktionary", "s", "wikisource", "b", "wikibooks", "q", "wikiquote", "n", "wikinews",
    "v", "wikiversity", "voy", "wikivoyage", "c", "commons", "m", "meta", "species", "wikispecies",
    "d", "wikidata", "mw", "foundation", "wmf", "phab", "doi",
})
# Tags whose contents are not prose; removed with their contents.
DROP_TAGS = ("ref", "references", "gallery", "math", "chem", "ce", "timeline", "score", "graph",
             "imagemap", "mapframe", "maplink", "templatedata", "templatestyles", "syntaxhighlight",
             "source", "hiero", "inputbox", "categorytree", "section", "indicator", "table", "pre",
             "nowiki", "math-chem", "sub-ref")


def _languages(wiki: str | None) -> tuple[str, ...]:
    """English rules always apply (enwiki-style markup is everywhere); add the dump's language."""
    lang = (wiki or "en").removesuffix("wiki").split("_")[0] or "en"
    return ("en",) if lang == "en" else ("en", lang)


def _merged(table: dict[str, tuple[str, ...]], langs: tuple[str, ...]) -> frozenset[str]:
    return frozenset(name for lang in langs for name in table.get(lang, ()))


@dataclass(frozen=True)
class CleanOptions:
    """What counts as prose, and the guard limits for one page. Build per dump with `for_wiki`."""

    drop_sections: frozenset[str] = field(default_factory=lambda: _merged(DROP_SECTIONS, ("en",)))
    file_namespaces: frozenset[str] = field(default_factory=lambda: _merged(FILE_NAMESPACES, ("en",)))
    category_namespaces: frozenset[str] = field(default_factory=lambda: _merged(CATEGORY_NAMESPACES, ("en",)))
    disambiguation_templates: frozenset[str] = field(
        default_factory=lambda: _merged(DISAMBIGUATION_TEMPLATES, ("en",)))
    max_page_chars: int = 4_000_000  # larger pages are skipped ("too_large") without parsing
    page_timeout_s: float = 20.0  # wall-clock budget for cleaning one page ("timeout")

    @classmethod
    def for_wiki(cls, wiki: str | None, **overrides) -> CleanOptions:
        langs = _languages(wiki)
        base = {
            "drop_sections": _merged(DROP_SECTIONS, langs),
            "file_namespaces": _merged(FILE_NAMESPACES, langs),
            "category_namespaces": _merged(CATEGORY_NAMESPACES, langs),
            "disambiguation_templates": _merged(DISAMBIGUATION_TEMPLATES, langs),
        }
        base.update(overrides)
        return cls(**base)


# --- cheap passes ---------------------------------------------------------------------------------

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_REF_SELF = re.compile(r"<ref\b[^>]*/\s*>", re.I)
_REF = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.I | re.S)
_DROP_TAG_NAMES = "|".join(re.escape(t) for t in DROP_TAGS)
_DROP_TAG = re.compile(rf"<({_DROP_TAG_NAMES})\b[^>]*?(?:/\s*>|>.*?</\1\s*>)", re.I | re.S)
_TEMPLATE_TOKEN = re.compile(r"\{\{|\}\}")
_TABLE_TOKEN = re.compile(r"^[ \t:]*(\{\|)|^[ \t]*(\|\})", re.M)
_MAGIC = re.compile(r"__[A-Z]+__")
_LIST_MARKUP = re.compile(r"^[*#:;]+[ \t]*", re.M)  # bullets/indents: each would be a Tag node to build
_HEADING = re.compile(r"^(={1,6})[ \t]*(.+?)[ \t]*\1[ \t]*$", re.M)
_QUOTES = re.compile(r"'{2,}")
_SPACES = re.compile(r"[ \t\u00a0]+")
_DISAMBIG_TITLE = re.compile(r"\((?:disambiguation|begriffsklärung|homonymie|desambiguación|disambigua)\)\s*$",
                             re.I)
# Innermost wikilinks (no brackets inside): resolved by regex, innermost first, so that a File link's
# caption links become text and the File link is then innermost itself. mwparserfromhell builds
# several Python objects per link, and links are most of an article's nodes.
_SIMPLE_LINK = re.compile(r"\[\[([^\[\]|\n]*)(?:\|([^\[\]]*))?\]\]")
_BRACKET_URL = re.compile(r"\[(?:https?:|ftp:)?//[^\s\[\]]+(?:[ \t]+([^\[\]\n]*))?\]", re.I)
_TEMPLATE_NAME = re.compile(r"\{\{\s*([^{}|\n]+?)\s*(?:\||\}\})")


def _remove_balanced(text: str, tokens: re.Pattern, opener: str) -> str:
    """Remove outermost balanced spans (templates `{{..}}`, tables `{|..|}`) in one linear scan.

    An unmatched closer is left alone; an unclosed opener leaves the rest of the text untouched
    (removing to the end would throw away a whole article over one typo).
    """
    out: list[str] = []
    depth = 0
    keep_from = 0
    span_start = 0
    for m in tokens.finditer(text):
        is_open = (m.group(0) == opener) if m.lastindex is None else m.lastindex == 1
        if is_open:
            if depth == 0:
                span_start = m.start()
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                out.append(text[keep_from:span_start])
                keep_from = m.end()
    out.append(text[keep_from:])
    return "".join(out)


def preclean(text: str) -> str:
    """Remove comments, refs, non-prose tags, templates, tables and magic words (no parsing)."""
    text = _COMMENT.sub("", text)
    text = _REF_SELF.sub("", text)
    text = _REF.sub("", text)
    text = _DROP_TAG.sub("", text)
    if "{{" in text:
        text = _remove_balanced(text, _TEMPLATE_TOKEN, "{{")
    if "{|" in text:
        text = _remove_balanced(text, _TABLE_TOKEN, "{|")
    return _LIST_MARKUP.sub("", _MAGIC.sub("", text))


def resolve_links(text: str, options: CleanOptions) -> str:
    """Replace wikilinks by their visible text (file/category/interlanguage links by nothing)."""

    def link(m: re.Match) -> str:
        title, label = m.group(1), m.group(2)
        if _link_kind(title.strip(), options) == "drop":
            return ""
        if label is None or not label.strip():  # [[Page]] or the pipe trick [[Page (x)|]]
            shown = title.strip().lstrip(":")
            return shown.split(" (", 1)[0] if label is not None else shown
        return label

    for _ in range(4):  # captions nest links rarely more than twice
        text, n = _SIMPLE_LINK.subn(link, text)
        if not n:
            break
    return _BRACKET_URL.sub(lambda m: m.group(1) or "", text)


def is_disambiguation(title: str, text: str, options: CleanOptions) -> bool:
    if _DISAMBIG_TITLE.search(title):
        return True
    names = options.disambiguation_templates
    for m in _TEMPLATE_NAME.finditer(text):
        name = m.group(1).replace("_", " ").strip().lower()
        if name in names or "disambiguation" in name:
            return True
    return False


# --- mwparserfromhell pass ------------------------------------------------------------------------

_LANG_PREFIX = re.compile(r"^[a-z]{2,3}(?:-[a-z]{2,8})*$")


def _link_kind(title: str, options: CleanOptions) -> str:
    """'keep', or 'drop' for file/category/interlanguage links."""
    if title.startswith(":") or ":" not in title:
        return "keep"
    prefix = title.split(":", 1)[0].strip().lower()
    if prefix in options.file_namespaces or prefix in options.category_namespaces:
        return "drop"
    if prefix not in INLINE_INTERWIKI and _LANG_PREFIX.match(prefix):
        return "drop"
    return "keep"


def _strip(code, options: CleanOptions, out: list[str]) -> None:
    for node in code.nodes:
        kind = type(node)
        if kind is Text:
            out.append(node.value)
        elif kind is Wikilink:
            title = str(node.title).strip()
            if _link_kind(title, options) == "drop":
                continue
            if node.text is not None:
                _strip(node.text, options, out)
            else:
                out.append(title.lstrip(":").split("#", 1)[0] or title)
        elif kind is ExternalLink:
            if node.brackets and node.title is not None:
                _strip(node.title, options, out)
        elif kind is Tag:
            tag = str(node.tag).strip().lower()
            if tag in ("br", "hr"):
                out.append("\n")
            elif tag in DROP_TAGS or tag in ("td", "th", "tr", "caption"):
                continue
            elif node.contents is not None and not node.self_closing:
                _strip(node.contents, options, out)
        elif kind is HTMLEntity:
            out.append(node.normalize())
        # Template, Comment, Argument, Heading: never prose.


def _tidy(text: str) -> str:
    text = _SPACES.sub(" ", _QUOTES.sub("", text))  # whole-text passes: one call, not one per line
    return "\n".join(line for line in (raw.strip() for raw in text.split("\n")) if line)


def strip_markup(text: str, options: CleanOptions) -> str:
    """Plain text of one section's wikitext (already precleaned)."""
    code = mwparserfromhell.parse(text, skip_style_tags=True)
    out: list[str] = []
    _strip(code, options, out)
    return _tidy("".join(out))


def _heading_text(raw: str) -> str:
    return _tidy(preclean(raw)).replace("[[", "").replace("]]", "").strip().lower()


def split_sections(text: str) -> list[tuple[int, str, str]]:
    """[(level, heading, body)]; the lead section has level 0 and heading ''."""
    sections = []
    last_end, level, heading = 0, 0, ""
    for m in _HEADING.finditer(text):
        sections.append((level, heading, text[last_end:m.start()]))
        level, heading, last_end = len(m.group(1)), m.group(2), m.end()
    sections.append((level, heading, text[last_end:]))
    return sections


def clean_wikitext(text: str, options: CleanOptions | None = None) -> list[tuple[str, str]]:
    """Plain-text sections `(heading, text)` of an article, non-prose sections dropped.

    Headings are returned for reference only: they are not passage text. Sections that clean to
    nothing are left out.
    """
    options = options or CleanOptions()
    kept: list[tuple[str, str]] = []
    dropping_below: int | None = None  # level of a dropped heading: its subsections go too
    for level, heading, body in split_sections(resolve_links(preclean(text), options)):
        if dropping_below is not None and level > dropping_below:
            continue
        dropping_below = None
        name = _heading_text(heading)
        if level and name in options.drop_sections:
            dropping_below = level
            continue
        plain = strip_markup(body, options)
        if plain:
            kept.append((name, plain))
    return kept


def clean_article(text: str, options: CleanOptions | None = None) -> str:
    """The article's prose as one string, sections separated by blank lines."""
    return "\n\n".join(body for _, body in clean_wikitext(text, options))



# --- the cleaner child process --------------------------------------------------------------------
# Frames on stdin/stdout: a 4-byte little-endian length, then UTF-8. Requests are raw wikitext; the
# first frame is the options as JSON. Replies start with b"o" (plain text follows) or b"e" (error).

def options_to_json(options: CleanOptions) -> str:
    return json.dumps({f.name: sorted(v) if isinstance(v := getattr(options, f.name), frozenset) else v
                       for f in fields(options)}, sort_keys=True)


def options_from_json(text: str) -> CleanOptions:
    raw = json.loads(text)
    return CleanOptions(**{k: frozenset(v) if isinstance(v, list) else v for k, v in raw.items()})


def _read_exact(stream, size: int) -> bytes:
    """Read `size` bytes, or fewer only at EOF (an unbuffered pipe returns what it has so far)."""
    parts, got = [], 0
    while got < size:
        part = stream.read(size - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def read_frame(stream) -> bytes | None:
    head = _read_exact(stream, 4)
    if len(head) < 4:
        return None
    (size,) = struct.unpack("<I", head)
    data = _read_exact(stream, size)
    return data if len(data) == size else None


def write_frame(stream, data: bytes) -> None:
    stream.write(struct.pack("<I", len(data)) + data)
    stream.flush()


def serve_cleaner() -> None:
    """Body of the cleaner child process: wikitext in, plain text (or an error) out, until EOF.

    Runs in its own process so that the parent can enforce a page's time budget by killing it,
    which works even when mwparserfromhell's C tokenizer never returns to Python.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but frames may reach the parent's pipe
    first = read_frame(stdin)
    if first is None:
        return
    options = options_from_json(first.decode())
    write_frame(stdout, b"ready")  # the page budget starts after the interpreter's start-up
    while (request := read_frame(stdin)) is not None:
        try:
            reply = b"o" + clean_article(request.decode("utf-8", "replace"), options).encode()
        except RecursionError:
            reply = b"erecursion limit"
        except Exception as exc:  # any failure on one page is that page's problem, not the run's
            reply = b"e" + f"{type(exc).__name__}: {exc}"[:200].encode()
        write_frame(stdout, reply)


if __name__ == "__main__":
    serve_cleaner()
