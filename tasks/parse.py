"""Streaming MediaWiki XML parsing: a dump file (or one byte range of bz2 streams) -> pages.

Constant memory: lxml iterparse on a decompressing stream, each `<page>` cleared with its
preceding siblings once read. A multistream `.bz2` can be cut at any stream start, because every
stream holds whole pages; the cut pieces lack the `<mediawiki>` root, so one is added around them.
Errors (corrupt or truncated bz2, malformed XML) become one `RagindexError` line naming the file
and the compressed byte offset.
"""

from __future__ import annotations

import bz2
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass

from lxml import etree

from storage.errors import RagindexError
from storage.fs import resolve

_READ = 1 << 20
# A bz2 stream starts byte-aligned with "BZh" + block size digit + the block magic (pi in BCD).
_STREAM_MAGIC = re.compile(rb"BZh[1-9]1AY&SY")


class DumpError(RagindexError):
    """A dump file that cannot be read: corrupt compression, malformed XML, no articles."""


@dataclass(frozen=True)
class Page:
    page_id: int
    rev_id: int
    title: str
    ns: int
    redirect: bool
    model: str
    text: str


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


def iter_pages(url: str, start: int | None = None, end: int | None = None,
               s3_endpoint_url: str | None = None) -> Iterator[Page]:
    """Every `<page>` of `url` (or of its bz2 streams in byte range [start, end)), in order."""
    fs, path = resolve(url, s3_endpoint_url)
    name = file_name(url)
    try:
        raw = fs.open(path, "rb")
    except FileNotFoundError:
        raise DumpError(f"dump file not found: {url}") from None
    with raw:
        size = fs.size(path)
        start = start or 0
        ranged = _RangeReader(raw, start, end)
        body = bz2.BZ2File(ranged) if is_bz2(url) else ranged
        # A piece cut from the middle of a multistream file has no root element.
        prefix = b"<mediawiki>" if start else b""
        suffix = b"</mediawiki>" if end is not None and end < size else b""
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
    title = ns = page_id = None
    redirect = False
    rev_id, model, text = 0, "wikitext", ""
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
            for part in child:
                ptag = _local(part.tag)
                if ptag == "id":
                    rev_id = int(part.text or 0)
                elif ptag == "model":
                    model = part.text or model
                elif ptag == "text":
                    text = part.text or ""
    if page_id is None or title is None:
        raise ValueError(f"a <page> without <id> or <title> at XML line {elem.sourceline}")
    return Page(page_id=int(page_id), rev_id=rev_id, title=title, ns=int(ns or 0), redirect=redirect,
                model=model, text=text)


# --- where a multistream file may be cut ----------------------------------------------------------

def stream_offsets_from_index(index_url: str, s3_endpoint_url: str | None = None) -> list[int]:
    """Sorted distinct stream offsets listed in a multistream `-index.txt.bz2` (`offset:page_id:title`)."""
    fs, path = resolve(index_url, s3_endpoint_url)
    offsets: set[int] = set()
    try:
        with fs.open(path, "rb") as raw, bz2.open(raw, "rt", encoding="utf-8") as lines:
            for line in lines:
                head = line.split(":", 1)[0]
                if head.isdigit():
                    offsets.add(int(head))
    except (OSError, EOFError) as exc:
        raise DumpError(f"corrupt index file {file_name(index_url)}: {exc}") from None
    return sorted(offsets)


def scan_stream_offsets(url: str, s3_endpoint_url: str | None = None) -> list[int]:
    """Byte-aligned bz2 stream starts found by scanning for the stream header magic."""
    fs, path = resolve(url, s3_endpoint_url)
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


def starts_with_page(url: str, offset: int, s3_endpoint_url: str | None = None) -> bool:
    """Whether the bz2 stream at `offset` begins with a `<page>`: a safe place to cut.

    Guards stream scanning against files whose streams split pages (e.g. pbzip2 output) and
    against a chance match of the magic inside compressed data.
    """
    fs, path = resolve(url, s3_endpoint_url)
    decomp = bz2.BZ2Decompressor()
    with fs.open(path, "rb") as f:
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
    return out.lstrip().startswith(b"<page")


def file_size(url: str, s3_endpoint_url: str | None = None) -> int:
    fs, path = resolve(url, s3_endpoint_url)
    return fs.size(path)

