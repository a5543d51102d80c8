"""DPR chunking: an article's plain text -> disjoint 100-word passages (columns: storage.layout)."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc

WORDS_PER_PASSAGE = 100
# Caps for text that is not prose (unbalanced markup the cleaner could not remove, base64 blobs):
# a "word" longer than MAX_WORD_CHARS is cut to it, and a passage stops before MAX_PASSAGE_CHARS.
# Real 100-word passages are far below both (a few hundred to ~1500 characters), so their ids and
# text are exactly DPR's.
MAX_WORD_CHARS = 100
MAX_PASSAGE_CHARS = 4000


def content_hash(title: str, text: str) -> str:
    """The key for reusing embeddings across versions: what the encoder sees, nothing else."""
    return hashlib.sha1(f"{title}\n{text}".encode()).hexdigest()


def content_hashes(titles: pa.Array | pa.ChunkedArray, texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`content_hash` of every row, computed from its title and text (about 3.5 µs a passage): what a
    version's passages carry, whatever a file handed to assembly claimed."""
    joined = pc.binary_join_element_wise(titles, texts, "\n").cast(pa.large_binary())
    return pa.array([hashlib.sha1(row).hexdigest() for row in joined.to_numpy(zero_copy_only=False)], pa.string())


def chunk_article(page_id: int, rev_id: int, title: str, text: str,
                  words_per_passage: int = WORDS_PER_PASSAGE) -> list[dict]:
    """Split on whitespace into disjoint `words_per_passage`-word passages (the last may be shorter).

    Passages are numbered from 0 in article order, so `passage_id` depends only on the article.
    Words over `MAX_WORD_CHARS` are cut, and a passage that would pass `MAX_PASSAGE_CHARS` ends early.
    """
    words = [w[:MAX_WORD_CHARS] for w in text.split()]
    passages = []
    for n, body in enumerate(_bodies(words, words_per_passage)):
        passages.append({
            "passage_id": f"{page_id}_{n}",
            "page_id": page_id,
            "rev_id": rev_id,
            "title": title,
            "text": body,
            "content_hash": content_hash(title, body),
        })
    return passages


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
