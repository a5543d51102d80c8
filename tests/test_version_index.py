"""VersionIndex: a version opened for serving, local and on S3, through transformers' RAG Index API."""

from __future__ import annotations

import numpy as np
import pytest

from rag_model.index import VersionIndex, revision_url, wiki_language
from storage.errors import NotFound, Rejected
from tests.fixtures.rag import TOPICS_A, build_version


def test_search_returns_passages_with_provenance(store, tiny_question_encoder):
    served = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000)
    index = VersionIndex.open(store, served.version, with_embeddings=True)
    assert index.version == served.version and index.size == len(TOPICS_A)
    title, text = TOPICS_A[2]
    hits = index.search(tiny_question_encoder.encode([f"{title} {text}"]), k=3)[0]
    assert len(hits) == 3
    assert hits[0].title == title  # a passage's own vector is its best match
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    top = hits[0]
    assert top.version == served.version and top.page_id in served.page_ids
    assert top.text == text and top.passage_id.startswith(f"{top.page_id}_")
    assert top.url == f"https://en.wikipedia.org/w/index.php?curid={top.page_id}&oldid={top.rev_id}"


def test_rag_index_interface(store, tiny_question_encoder):
    served = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000)
    index = VersionIndex.open(store, served.version, with_embeddings=True)
    index.init_index()
    assert index.is_initialized()
    queries = tiny_question_encoder.encode(["paris tower", "music in new orleans"])
    ids, vectors = index.get_top_docs(queries, n_docs=4)
    assert ids.shape == (2, 4) and vectors.shape == (2, 4, tiny_question_encoder.dim)
    # the vectors handed to RAG are the version's stored document vectors for exactly those rows
    stored = tiny_question_encoder.encode([f"{t} {x}" for t, x in TOPICS_A])
    np.testing.assert_allclose(vectors, stored[ids], rtol=1e-5, atol=1e-5)
    docs = index.get_doc_dicts(ids)
    assert [d["title"] for d in docs] == [[TOPICS_A[i][0] for i in row] for row in ids]
    assert all(len(d["text"]) == 4 for d in docs)


def test_retrieval_only_open_does_not_need_embeddings(store, tiny_question_encoder):
    served = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000)
    index = VersionIndex.open(store, served.version)
    assert index.search(tiny_question_encoder.encode(["chess"]), 2)[0]
    with pytest.raises(Exception, match="without its embeddings"):
        index.get_top_docs(tiny_question_encoder.encode(["chess"]), 2)


def test_unknown_or_broken_versions_are_refused(tmp_path, tiny_question_encoder):
    from storage.store import IndexStore

    store = IndexStore(str(tmp_path / "store"))
    with pytest.raises(NotFound):
        VersionIndex.open(store, "enwiki-20240101-20240102t000000z")
    served = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000)
    (tmp_path / "store" / "versions" / served.version / "passages.arrow").write_bytes(b"not arrow")
    with pytest.raises(Rejected, match="passages.arrow"):
        VersionIndex.open(store, served.version)


def test_wikipedia_urls():
    assert wiki_language("enwiki") == "en"
    assert wiki_language("simplewiki") == "simple"
    assert wiki_language("zh_min_nanwiki") == "zh-min-nan"
    assert revision_url("de", 12, 34) == "https://de.wikipedia.org/w/index.php?curid=12&oldid=34"


def test_rows_are_found_across_the_tables_record_batches(tmp_path):
    from storage.errors import RagindexError
    from storage.store import IndexStore
    from tests.fixtures.versions import clustered_vectors, fingerprint_for, make_version, random_passages

    store = IndexStore(str(tmp_path / "store"))
    version = make_version(store, random_passages(300, seed=4), clustered_vectors(300, 8, seed=4), fingerprint_for(8),
                           shard_rows=64)
    index = VersionIndex.open(store, version)
    assert len(index.segments[0].batches) >= 5  # one batch per passage shard at least
    wanted = [299, 0, 64, 63, 128, 200, 5]
    assert [r["row_id"] for r in index.rows(wanted)] == wanted
    with pytest.raises(RagindexError, match="no row 300"):
        index.rows([300])
