"""DPR chunking: an article's plain text -> disjoint 100-word passages (columns: storage.layout)."""

from __future__ import annotations

import hashlib

WORDS_PER_PASSAGE = 100


def content_hash(title: str, text: str) -> str:
    """The key for reusing embeddings across versions: what the encoder sees, nothing else."""
    return hashlib.sha1(f"{title}\n{text}".encode()).hexdigest()


def chunk_article(page_id: int, rev_id: int, title: str, text: str,
                  words_per_passage: int = WORDS_PER_PASSAGE) -> list[dict]:
    """Split on whitespace into disjoint `words_per_passage`-word passages (the last may be shorter).

    Passages are numbered from 0 in article order, so `passage_id` depends only on the article.
    """
    words = text.split()
    passages = []
    for n, start in enumerate(range(0, len(words), words_per_passage)):
        body = " ".join(words[start:start + words_per_passage])
        passages.append({
            "passage_id": f"{page_id}_{n}",
            "page_id": page_id,
            "rev_id": rev_id,
            "title": title,
            "text": body,
            "content_hash": content_hash(title, body),
        })
    return passages
