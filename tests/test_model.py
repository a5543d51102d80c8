"""RagService: a tiny real RAG model that picks up a promoted version without reloading or changing weights."""

from __future__ import annotations

import pytest
import torch

from rag_model.model import RagService
from rag_model.watcher import CurrentWatcher
from storage.store import IndexStore
from tests.fixtures.rag import TOPICS_A, TOPICS_B, build_version


@pytest.fixture(scope="module")
def service(tiny_rag) -> RagService:
    return RagService.from_pretrained(str(tiny_rag.rag_dir))


def test_generate_follows_a_promote_with_the_same_untouched_model(tmp_path, service, tiny_question_encoder):
    store = IndexStore(str(tmp_path / "store"))
    # The RAG checkpoint's question encoder is the tiny DPR one, so versions built with its vectors fit.
    a = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000, promote=True)
    b = build_version(store, tiny_question_encoder, TOPICS_B, 2000, 6000)
    watcher = CurrentWatcher(store, service.retriever, poll_seconds=1)
    assert watcher.check().ok

    model = service.sequence_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = service.generate("where is the eiffel tower", n_docs=3, mode="sequence", max_new_tokens=6)
    assert first.version == a.version
    assert len(first.docs) == 3 and all(d.page_id in a.page_ids and d.version == a.version for d in first.docs)
    assert isinstance(first.answer, str)
    assert all(d.url.startswith("https://en.wikipedia.org/w/index.php?curid=") for d in first.docs), first.docs

    store.promote(b.version)
    assert watcher.check().version == b.version
    second = service.generate("where is the eiffel tower", n_docs=2, mode="sequence", max_new_tokens=6)
    assert second.version == b.version and len(second.docs) == 2
    assert all(d.page_id in b.page_ids for d in second.docs)
    token = service.generate("capital of england", n_docs=2, mode="token", max_new_tokens=6)
    assert token.version == b.version and all(d.page_id in b.page_ids for d in token.docs)

    assert service.sequence_model is model  # no reload
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights byte-identical
    # RAG-Token shares the very same modules: one copy of the weights
    assert service.models["token"].generator is model.generator


def test_scores_and_docs_match_the_model_retrieval(tmp_path, service, tiny_question_encoder):
    store = IndexStore(str(tmp_path / "store"))
    a = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000, promote=True)
    assert service.retriever.swap_to(store, a.version).ok
    result = service.generate("music genre from new orleans", n_docs=3, max_new_tokens=4)
    direct = service.retriever.retrieve_with_provenance(["music genre from new orleans"], 3)
    assert [d.passage_id for d in result.docs] == [h.passage_id for h in direct.hits[0]]
    assert [round(d.score, 3) for d in result.docs] == [round(h.score, 3) for h in direct.hits[0]]


def test_bad_requests_are_one_line_errors(service):
    from storage.errors import RagindexError

    with pytest.raises(RagindexError, match="unknown mode"):
        service.generate("x", mode="beam")
    with pytest.raises(RagindexError, match="empty"):
        service.generate("   ")
