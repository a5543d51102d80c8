"""DPR chunking: disjoint 100-word passages, nothing lost, stable ids."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from storage.layout import PASSAGE_SCHEMA, UNIT_SCHEMA
from tasks.chunk import chunk_article

words = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc")), min_size=1,
                max_size=8)
separators = st.sampled_from([" ", "  ", "\n", "\t", "\n\n", " \u00a0 "])


@st.composite
def articles(draw):
    tokens = draw(st.lists(words, max_size=450))
    seps = draw(st.lists(separators, min_size=len(tokens), max_size=len(tokens)))
    text = "".join(w + s for w, s in zip(tokens, seps, strict=True))
    return draw(st.integers(1, 2**40)), draw(st.integers(1, 2**40)), draw(st.text(max_size=30)), text


@settings(max_examples=150, deadline=None)
@given(articles())
def test_no_word_lost_or_duplicated_and_ids_stable(article):
    page_id, rev_id, title, text = article
    passages = chunk_article(page_id, rev_id, title, text)

    rejoined = [w for p in passages for w in p["text"].split()]
    assert rejoined == text.split()
    assert all(1 <= len(p["text"].split()) <= 100 for p in passages)
    assert all(len(p["text"].split()) == 100 for p in passages[:-1])  # only the last may be shorter
    assert [p["passage_id"] for p in passages] == [f"{page_id}_{n}" for n in range(len(passages))]
    for p in passages:
        assert (p["page_id"], p["rev_id"], p["title"]) == (page_id, rev_id, title)
        assert p["content_hash"] == hashlib.sha1(f"{title}\n{p['text']}".encode()).hexdigest()
    assert chunk_article(page_id, rev_id, title, text) == passages  # same input, same passages


def test_exact_boundaries():
    text = " ".join(str(i) for i in range(250))
    passages = chunk_article(7, 70, "T", text)
    assert [len(p["text"].split()) for p in passages] == [100, 100, 50]
    assert passages[1]["text"].split()[0] == "100"
    assert chunk_article(7, 70, "T", " \n ") == []


def test_schema_is_the_contract():
    assert PASSAGE_SCHEMA.names == ["row_id", "passage_id", "page_id", "rev_id", "title", "text", "content_hash"]
    assert [str(t) for t in PASSAGE_SCHEMA.types] == ["int64", "string", "int64", "int64", "string", "string",
                                                      "string"]
    assert UNIT_SCHEMA.names == PASSAGE_SCHEMA.names[1:]
