"""Streaming MediaWiki XML parsing: a dump file (or one byte range of bz2 streams) -> pages.

Constant memory: lxml iterparse on a decompressing stream, each `<page>` cleared with its
preceding siblings once read. A multistream `.bz2` can be cut at any stream start, because every
stream holds whole pages; the cut pieces lack the `<mediawiki>` root, so one is added around them,
in the file's own encoding (XML allows UTF-16 and others; Special:Export output can be UTF-16).
Errors (corrupt or truncated bz2, malformed XML) become one `RagindexError` line naming the file
and the compressed byte offset.
"""

from __future__ import annotations

import bz2
import codecs
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass

from lxml import etree

from storage.errors import RagindexError
from storage.location import Location

_READ = 1 << 20
# A bz2 stream starts byte-aligned with "BZh" + block size digit + the block magic (pi in BCD).
_STREAM_MAGIC = re.compile(rb"BZh[1-9]1AY&SY")


class DumpError(RagindexError):
    """A dump file that cannot be read: corrupt compression, malformed XML, no articles."""


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
         (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
# Without a BOM, the first character '<' shows UTF-16/32 and their byte order (XML 1.0, appendix F).
_NO_BOM = ((b"<\0\0\0", "utf-32-le"), (b"\0\0\0<", "utf-32-be"), (b"<\0", "utf-16-le"), (b"\0<", "utf-16-be"))
_DECLARED = re.compile(rb"""\s*<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z][A-Za-z0-9._-]*)["']""")


def xml_encoding(head: bytes) -> str:
    """The Python codec of an XML document, from its first bytes: a BOM, the byte pattern of its
    first '<', or its declaration; UTF-8 when none says otherwise."""
    for bom, codec in _BOMS:
        if head.startswith(bom):
            return codec
    for pattern, codec in _NO_BOM:
        if head.startswith(pattern):
            return codec
    m = _DECLARED.match(head)
    if m:
        try:
            return codecs.lookup(m.group(1).decode()).name
        except LookupError:
            pass
    return "utf-8"


def decoded_head(head: bytes) -> str:
    """The first bytes of an XML document as text, in its own encoding (a cut last character is dropped)."""
    return head.decode(xml_encoding(head), errors="ignore").lstrip("\ufeff")


def _frame(codec: str, end: bool) -> bytes:
    if codec == "utf-8":
        return b"</mediawiki>" if end else b"<mediawiki>"
    if end:
        return "</mediawiki>".encode(codec)
    if codec.startswith(("utf-16", "utf-32")):
        return "\ufeff<mediawiki>".encode(codec)  # the BOM tells lxml the encoding of a piece that has none
    return f'<?xml version="1.0" encoding="{codec}"?><mediawiki>'.encode(codec)


def _first_bytes(raw, compressed: bool, n: int = 256) -> bytes:
    """The first `n` bytes of the document in `raw` (decompressed), leaving `raw` at offset 0."""
    raw.seek(0)
    data = raw.read(64 << 10)
    raw.seek(0)
    if not compressed:
        return data[:n]
    try:
        return bz2.BZ2Decompressor().decompress(data, max_length=n)
    except OSError:
        return b""


@dataclass(frozen=True)
class Page:
    page_id: int
    rev_id: int
    title: str
    ns: int
    redirect: bool
    model: str
    text: str
    revisions: int = 1  # <revision>s the page element held (a history dump holds several)


def file_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def is_bz2(url: str) -> bool:
    return url.endswith(".bz2")


def is_index_file(url: str) -> bool:
    """The multistream `-index.txt.bz2` companions (also `-index1.txt-p1p41242.bz2` part files)."""
    name = file_name(url)
    return "-index" in name and ".txt" in name


def index_name_for(data_name: str) -> str:
    """enwiki-D-pages-articles-multistream1.xml-p1p5.bz2 -> enwiki-D-pages-articles-multistream-index1.txt-p1p5.bz2"""
    return data_name.replace("-multistream", "-multistream-index", 1).replace(".xml", ".txt", 1)


class _RangeReader(io.RawIOBase):
    """Read bytes [start, end) of a file opened through fsspec; tracks the position for errors."""

    def __init__(self, f, start: int, end: int | None) -> None:
        self._f = f
        self.pos = start
        self._end = end
        if start:
            f.seek(start)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        want = len(buffer)
        if self._end is not None:
            want = min(want, self._end - self.pos)
        if want <= 0:
            return 0
        data = self._f.read(want)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


class _Framed(io.RawIOBase):
    """prefix + body + suffix as one readable stream (adds the missing `<mediawiki>` root)."""

    def __init__(self, prefix: bytes, body, suffix: bytes) -> None:
        self._parts = [io.BytesIO(prefix), body, io.BytesIO(suffix)]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._parts:
            n = self._parts[0].readinto(buffer)
            if n:
                return n
            self._parts.pop(0)
        return 0


def iter_pages(source: Location, start: int | None = None, end: int | None = None) -> Iterator[Page]:
    """Every `<page>` of `source` (or of its bz2 streams in byte range [start, end)), in order."""
    fs, path, url = source.fs, source.path, source.url
    name = file_name(url)
    try:
        raw = fs.open(path, "rb")
    except FileNotFoundError:
        raise DumpError(f"dump file not found: {url}") from None
    with raw:
        size = fs.size(path)
        start = start or 0
        codec = xml_encoding(_first_bytes(raw, is_bz2(url))) if start or end is not None else "utf-8"
        ranged = _RangeReader(raw, start, end)
        body = bz2.BZ2File(ranged) if is_bz2(url) else ranged
        # A piece cut from the middle of a multistream file has no root element.
        prefix = _frame(codec, end=False) if start else b""
        suffix = _frame(codec, end=True) if end is not None and end < size else b""
        stream = io.BufferedReader(_Framed(prefix, body, suffix), buffer_size=_READ)
        try:
            yield from _pages(stream)
        except (OSError, EOFError) as exc:
            what = "truncated" if isinstance(exc, EOFError) else "corrupt"
            raise DumpError(f"{what} bz2 data in {name} near byte {ranged.pos}: {exc}") from None
        except etree.XMLSyntaxError as exc:
            line = exc.position[0] if exc.position else "?"
            raise DumpError(f"malformed XML in {name} (stream at byte {start}, XML line {line}): {exc.msg}") \
                from None
        except ValueError as exc:
            raise DumpError(f"malformed page in {name} (stream at byte {start}): {exc}") from None


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _pages(stream) -> Iterator[Page]:
    for _, elem in etree.iterparse(stream, events=("end",), tag="{*}page", huge_tree=True,
                                   resolve_entities=False, no_network=True):
        yield _page(elem)
        # Free what was read: the page itself and any siblings before it (siteinfo, whitespace).
        elem.clear(keep_tail=False)
        parent = elem.getparent()
        if parent is not None:
            while elem.getprevious() is not None:
                del parent[0]


def _page(elem) -> Page:
    """A `<page>` with its newest revision: the only one of an articles dump, the highest id of a history dump."""
    title = ns = page_id = None
    redirect = False
    rev_id, model, text, revisions = 0, "wikitext", "", 0
    for child in elem:
        tag = _local(child.tag)
        if tag == "title":
            title = child.text or ""
        elif tag == "ns":
            ns = child.text
        elif tag == "id":
            page_id = child.text
        elif tag == "redirect":
            redirect = True
        elif tag == "revision":
            revisions += 1
            this_id, this_model, this_text = 0, "wikitext", ""
            for part in child:
                ptag = _local(part.tag)
                if ptag == "id":
                    this_id = int(part.text or 0)
                elif ptag == "model":
                    this_model = part.text or this_model
                elif ptag == "text":
                    this_text = part.text or ""
            if revisions == 1 or this_id > rev_id:
                rev_id, model, text = this_id, this_model, this_text
    if page_id is None or title is None:
        raise ValueError(f"a <page> without <id> or <title> at XML line {elem.sourceline}")
    return Page(page_id=int(page_id), rev_id=rev_id, title=title, ns=int(ns or 0), redirect=redirect,
                model=model, text=text, revisions=max(revisions, 1))


# --- where a multistream file may be cut ----------------------------------------------------------

def stream_offsets_from_index(index: Location) -> list[int]:
    """Sorted distinct stream offsets listed in a multistream `-index.txt.bz2` (`offset:page_id:title`)."""
    fs, path = index.fs, index.path
    offsets: set[int] = set()
    try:
        with fs.open(path, "rb") as raw, bz2.open(raw, "rt", encoding="utf-8") as lines:
            for line in lines:
                head = line.split(":", 1)[0]
                if head.isdigit():
                    offsets.add(int(head))
    except (OSError, EOFError) as exc:
        raise DumpError(f"corrupt index file {file_name(index.url)}: {exc}") from None
    return sorted(offsets)


def scan_stream_offsets(source: Location) -> list[int]:
    """Byte-aligned bz2 stream starts found by scanning for the stream header magic."""
    fs, path = source.fs, source.path
    offsets = []
    overlap = 9
    with fs.open(path, "rb") as f:
        base, tail = 0, b""
        while chunk := f.read(8 * _READ):
            buf = tail + chunk
            offsets.extend(base - len(tail) + m.start() for m in _STREAM_MAGIC.finditer(buf))
            base += len(chunk)
            tail = buf[-overlap:]
    return sorted(set(offsets))


def starts_with_page(source: Location, offset: int) -> bool:
    """Whether the bz2 stream at `offset` begins with a `<page>`: a safe place to cut.

    Guards stream scanning against files whose streams split pages (e.g. pbzip2 output) and
    against a chance match of the magic inside compressed data.
    """
    fs, path = source.fs, source.path
    decomp = bz2.BZ2Decompressor()
    with fs.open(path, "rb") as f:
        codec = xml_encoding(_first_bytes(f, compressed=True))
        f.seek(offset)
        out = b""
        try:
            while not out.strip() and not decomp.eof:
                chunk = f.read(256 << 10) if decomp.needs_input else b""
                if decomp.needs_input and not chunk:
                    break
                out += decomp.decompress(chunk, max_length=4096)
        except OSError:
            return False
    return out.decode(codec, errors="ignore").lstrip("\ufeff \t\r\n").startswith("<page")


def file_size(source: Location) -> int:
    return source.fs.size(source.path)

