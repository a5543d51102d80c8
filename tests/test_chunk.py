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


def test_unbalanced_markup_cannot_make_huge_passages():
    from tasks.chunk import MAX_PASSAGE_CHARS, MAX_WORD_CHARS

    blob = "{{" + "x" * 300_000  # one 300 KB "word": a template the cleaner could not close
    wide = " ".join("y" * 90 for _ in range(250))  # 90-character words: 100 of them pass the char cap
    passages = chunk_article(3, 30, "T", f"lead {blob} {wide} end")
    assert passages and all(len(p["text"]) <= MAX_PASSAGE_CHARS for p in passages)
    assert all(len(w) <= MAX_WORD_CHARS for p in passages for w in p["text"].split())
    assert passages[0]["text"].startswith("lead {{xxx") and passages[-1]["text"].endswith(" end")
    assert [p["passage_id"] for p in passages] == [f"3_{n}" for n in range(len(passages))]


def test_normal_text_keeps_dpr_passages():
    text = " ".join(f"word{i}" for i in range(230))
    assert [p["text"] for p in chunk_article(1, 1, "T", text)] == [
        " ".join(f"word{i}" for i in range(a, min(a + 100, 230))) for a in (0, 100, 200)]
