"""The `sections` chunker keeps an edit's new passages inside its section, and the chunker is part of the
encoder fingerprint: vectors are never reused, nor a delta made, across chunkers."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from rag_model.encoders import EncoderSpec, fingerprint_of
from storage.errors import Rejected
from storage.location import Location
from storage.store import IndexStore
from tasks.chunk import chunk_article
from tasks.delta_version import checked_parent
from tasks.embed import embed_passages, find_reuse_sources
from tests.fixtures.models import write_passages
from tests.fixtures.versions import fingerprint_for, make_version, random_passages


def _section(name: str, words: int) -> str:
    return " ".join(f"{name}{i}" for i in range(words))


ARTICLE = "\n\n".join([_section("lead", 130), _section("history", 240), _section("legacy", 170)])


def _hashes(text: str, chunker: str) -> list[str]:
    return [p["content_hash"] for p in chunk_article(7, 1, "Example", text, chunker=chunker)]


def test_sections_chunker_keeps_other_sections_passages_through_an_edit():
    edited = ARTICLE.replace("lead3 ", "lead3 inserted ", 1)  # one word near the top
    before, after = _hashes(ARTICLE, "sections"), _hashes(edited, "sections")
    assert len(set(after) - set(before)) == 1  # the lead's one window (130 words: its 30-word tail folded in)
    assert after[1:] == before[1:]  # history's and legacy's windows are untouched
    # DPR's windows all shift: every passage after the edit is new.
    dpr_before, dpr_after = _hashes(ARTICLE, "dpr"), _hashes(edited, "dpr")
    assert not set(dpr_after) & set(dpr_before)


def test_sections_chunker_restarts_windows_and_folds_short_tails():
    passages = chunk_article(7, 1, "Example", ARTICLE, chunker="sections")
    assert [len(p["text"].split()) for p in passages] == [130, 100, 140, 100, 70]
    assert [p["passage_id"] for p in passages] == [f"7_{n}" for n in range(5)]
    assert passages[1]["text"].startswith("history0 ") and passages[3]["text"].startswith("legacy0 ")
    # DPR-exact chunking is still there, and is the default of chunk_article.
    assert chunk_article(7, 1, "Example", ARTICLE) == chunk_article(7, 1, "Example", ARTICLE, chunker="dpr")
    assert [len(p["text"].split()) for p in chunk_article(7, 1, "Example", ARTICLE)] == [100] * 5 + [40]
    with pytest.raises(ValueError, match="unknown chunker"):
        chunk_article(7, 1, "Example", ARTICLE, chunker="words")


def test_dpr_chunker_keeps_the_fingerprint_keys_of_existing_stores():
    fp = fingerprint_for(8)
    fields = fp.model_dump(exclude={"model_id", "revision", "chunker"})
    assert fp.key == hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    assert fp.model_copy(update={"chunker": "sections"}).key != fp.key


def test_a_store_built_with_one_chunker_never_reuses_vectors_of_the_other(tmp_path, tiny_dpr):
    dpr, sections = EncoderSpec(str(tiny_dpr.ctx_dir)), EncoderSpec(str(tiny_dpr.ctx_dir), chunker="sections")
    assert fingerprint_of(dpr).key != fingerprint_of(sections).key
    articles = [{"page_id": i, "rev_id": 1, "title": f"page {i}", "text": _section(f"w{i}x", 40)}
                for i in range(6)]  # one short section each: both chunkers cut the same passages
    write_passages(tmp_path / "v1" / "passages", articles)
    embed_passages(Location(tmp_path / "v1" / "passages"), Location(tmp_path / "v1" / "embeddings"), dpr,
                   progress=False, precision="fp32")
    rows = write_passages(tmp_path / "v2" / "passages", articles)
    same = embed_passages(Location(tmp_path / "v2" / "passages"), Location(tmp_path / "same"), dpr,
                          reuse_from=[Location(tmp_path / "v1")], progress=False, precision="fp32")
    other = embed_passages(Location(tmp_path / "v2" / "passages"), Location(tmp_path / "other"), sections,
                           reuse_from=[Location(tmp_path / "v1")], progress=False, precision="fp32")
    assert same["reused"] == len(rows) and other["reused"] == 0 and other["encoded"] == len(rows)
    assert other["fingerprint"]["chunker"] == "sections"

    store = IndexStore(str(tmp_path / "store"))
    vectors = np.random.default_rng(0).standard_normal((20, 8)).astype("float32")
    make_version(store, random_passages(20), vectors, fingerprint_for(8))
    assert find_reuse_sources(store, fingerprint_for(8))
    assert find_reuse_sources(store, fingerprint_for(8).model_copy(update={"chunker": "sections"})) == []


def test_a_delta_with_the_other_chunker_is_refused_in_one_line(tmp_path, tiny_dpr):
    store = IndexStore(str(tmp_path / "store"))
    dpr = EncoderSpec(str(tiny_dpr.ctx_dir))
    fp = fingerprint_of(dpr)
    vectors = np.random.default_rng(0).standard_normal((20, fp.dim)).astype("float32")
    parent = make_version(store, random_passages(20), vectors, fp)
    assert checked_parent(store, parent, dpr)[0].version == parent
    with pytest.raises(Rejected) as refused:
        checked_parent(store, parent, EncoderSpec(str(tiny_dpr.ctx_dir), chunker="sections"))
    message = str(refused.value)
    assert "\n" not in message and "chunker differs" in message and "RAGINDEX_CHUNKER=dpr" in message


def test_a_delta_cuts_changed_pages_with_the_chunker_it_is_given(tmp_path):
    import bz2

    from storage.manifest import SourceDump
    from tasks.clean import clean_article
    from tasks.delta_passages import newest_revisions, write_delta_passages
    from tests.fixtures.history import HistPage, history_xml

    wikitext = f"{_section('lead', 130)}\n\n== History ==\n{_section('history', 120)}\n"
    day = tmp_path / "d.xml.bz2"
    day.write_bytes(bz2.compress(history_xml("enwiki", [HistPage(10, "Edited", [(201, wikitext)])]).encode()))
    source = SourceDump(wiki="enwiki", dump_date="20240103", location="memory://days")
    for chunker in ("dpr", "sections"):
        out = tmp_path / chunker
        write_delta_passages(newest_revisions([Location(str(day))]), {}, Location(str(out)), source, first_row_id=0,
                             chunker=chunker)
        summary = json.loads((out / "passages.json").read_text())
        texts = [r["text"] for s in summary["shards"] for r in pq.read_table(out / s["name"]).to_pylist()]
        want = chunk_article(10, 201, "Edited", clean_article(wikitext), chunker=chunker)
        assert texts == [p["text"] for p in want]
        assert len(texts) == (3 if chunker == "dpr" else 2)  # sections: 130 words of lead, 120 of history
