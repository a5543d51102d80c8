"""Chunking: an article's plain text -> disjoint 100-word passages (columns: storage.layout).

Two chunkers (`CHUNKERS`), recorded in the encoder fingerprint so that a store never mixes them:
- `dpr`: DPR's, consecutive 100-word windows over the whole article. An edit shifts every later window,
  so every later passage is new and re-embedded.
- `sections`: the same windows, restarted at every section the cleaner kept (`tasks.clean.clean_article`
  separates them by a blank line), a short tail folded into its section's previous window. An edit
  changes only the passages of its own section from the edit on.
"""

from __future__ import annotations

import hashlib
import re

import pyarrow as pa
import pyarrow.compute as pc

WORDS_PER_PASSAGE = 100
# Caps for text that is not prose (unbalanced markup the cleaner could not remove, base64 blobs):
# a "word" longer than MAX_WORD_CHARS is cut to it, and a passage stops before MAX_PASSAGE_CHARS.
# Real 100-word passages are far below both (a few hundred to ~1500 characters), so their ids and
# text are exactly DPR's.
MAX_WORD_CHARS = 100
MAX_PASSAGE_CHARS = 4000
CHUNKERS = ("dpr", "sections")
# `sections`: a section's last window shorter than this joins the window before it (at most ~150 words,
# within the encoders' 256 tokens), so section ends do not leave many scrap passages.
MIN_TAIL_WORDS = 50
_SECTION_BREAK = re.compile(r"\n[ \t]*\n")


def content_hash(title: str, text: str) -> str:
    """The key for reusing embeddings across versions: what the encoder sees, nothing else."""
    return hashlib.sha1(f"{title}\n{text}".encode()).hexdigest()


def content_hashes(titles: pa.Array | pa.ChunkedArray, texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`content_hash` of every row, computed from its title and text (about 3.5 µs a passage): what a
    version's passages carry, whatever a file handed to assembly claimed."""
    joined = pc.binary_join_element_wise(titles, texts, "\n").cast(pa.large_binary())
    return pa.array([hashlib.sha1(row).hexdigest() for row in joined.to_numpy(zero_copy_only=False)], pa.string())


def check_chunker(chunker: str) -> str:
    if chunker not in CHUNKERS:
        raise ValueError(f"unknown chunker {chunker!r}: one of {', '.join(CHUNKERS)}")
    return chunker


def chunk_article(page_id: int, rev_id: int, title: str, text: str,
                  words_per_passage: int = WORDS_PER_PASSAGE, chunker: str = "dpr") -> list[dict]:
    """Split on whitespace into disjoint `words_per_passage`-word passages (the last may be shorter);
    `chunker="sections"` restarts the windows at each section (see the module docstring).

    Passages are numbered from 0 in article order, so `passage_id` depends only on the article.
    Words over `MAX_WORD_CHARS` are cut, and a passage that would pass `MAX_PASSAGE_CHARS` ends early.
    """
    if check_chunker(chunker) == "dpr":
        bodies = _bodies(_words(text), words_per_passage)
    else:
        bodies = [body for section in _SECTION_BREAK.split(text)
                  for body in _with_tail_folded(_bodies(_words(section), words_per_passage))]
    passages = []
    for n, body in enumerate(bodies):
        passages.append({
            "passage_id": f"{page_id}_{n}",
            "page_id": page_id,
            "rev_id": rev_id,
            "title": title,
            "text": body,
            "content_hash": content_hash(title, body),
        })
    return passages


def _words(text: str) -> list[str]:
    return [w[:MAX_WORD_CHARS] for w in text.split()]


def _with_tail_folded(bodies: list[str]) -> list[str]:
    if len(bodies) < 2:
        return bodies
    tail, before = bodies[-1], bodies[-2]
    if len(tail.split()) >= MIN_TAIL_WORDS or len(before) + 1 + len(tail) > MAX_PASSAGE_CHARS:
        return bodies
    return [*bodies[:-2], f"{before} {tail}"]


def _bodies(words: list[str], words_per_passage: int) -> list[str]:
    bodies, current, size = [], [], 0
    for word in words:
        grown = size + len(word) + (1 if current else 0)
        if current and (len(current) == words_per_passage or grown > MAX_PASSAGE_CHARS):
            bodies.append(" ".join(current))
            current, grown = [], len(word)
        current.append(word)
        size = grown
    if current:
        bodies.append(" ".join(current))
    return bodies
