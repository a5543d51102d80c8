"""HotSwapRetriever and CurrentWatcher: atomic swaps, no mixed answers, refusals, rollbacks."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest

from rag_model.retriever import HotSwapRetriever, NotReady
from rag_model.watcher import CurrentWatcher
from storage.store import IndexStore
from tests.fixtures.rag import TOPICS_A, TOPICS_B, build_version


@pytest.fixture
def local_store(tmp_path) -> IndexStore:
    return IndexStore(str(tmp_path / "store"))


@pytest.fixture
def two_versions(local_store, tiny_question_encoder):
    a = build_version(local_store, tiny_question_encoder, TOPICS_A, 1000, 5000, promote=True)
    b = build_version(local_store, tiny_question_encoder, TOPICS_B, 2000, 6000)
    return a, b


def test_not_ready_until_a_version_is_loaded(tiny_question_encoder):
    retriever = HotSwapRetriever(tiny_question_encoder)
    assert retriever.version is None
    with pytest.raises(NotReady):
        retriever.retrieve_with_provenance(["anything"], 3)


def test_swap_changes_answers_and_releases_the_old_version(local_store, two_versions, tiny_question_encoder):
    a, b = two_versions
    retriever = HotSwapRetriever(tiny_question_encoder)
    first = retriever.swap_to(local_store, a.version)
    assert first.ok and first.changed and first.previous is None
    result = retriever.retrieve_with_provenance(["paris tower", "jazz music"], 3)
    assert result.version == a.version
    assert all(h.page_id in a.page_ids and h.version == a.version for row in result.hits for h in row)
    old = weakref.ref(retriever.current)

    with retriever.pinned() as pinned:  # an in-flight request holding version A
        swap = retriever.swap_to(local_store, b.version)
        assert swap.ok and swap.previous == a.version and retriever.version == b.version
        gc.collect()
        assert old() is not None  # still in use: not released
        assert retriever.retrieve_with_provenance(["paris"], 2).version == a.version  # pinned thread: A
        assert pinned.version == a.version
    del pinned
    gc.collect()
    assert old() is None  # the last request ended: A is gone
    result = retriever.retrieve_with_provenance(["paris"], 3)
    assert result.version == b.version and all(h.page_id in b.page_ids for h in result.hits[0])
    assert retriever.swap_to(local_store, b.version).changed is False  # already serving: no reload


def test_no_failed_or_mixed_answers_while_swapping(local_store, two_versions, tiny_question_encoder):
    a, b = two_versions
    pages = {a.version: a.page_ids, b.version: b.page_ids}
    retriever = HotSwapRetriever(tiny_question_encoder, warmup_rounds=1)
    retriever.swap_to(local_store, a.version)
    stop = threading.Event()
    errors: list[BaseException] = []
    mixed: list[str] = []
    seen: set[str] = set()

    def client() -> None:
        while not stop.is_set():
            try:
                result = retriever.retrieve_with_provenance(["paris tower", "capital city", "moon"], 4)
            except BaseException as exc:  # noqa: BLE001 - every failure counts
                errors.append(exc)
                continue
            seen.add(result.version)
            if any(h.version != result.version or h.page_id not in pages[result.version]
                   for row in result.hits for h in row):
                mixed.append(result.version)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(20):
        target = (b if i % 2 == 0 else a).version
        assert retriever.swap_to(local_store, target).ok
        if i < 2:  # on a loaded machine the clients may not answer between two swaps: see each version once
            deadline = time.monotonic() + 30
            while target not in seen and time.monotonic() < deadline:
                time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join()
    assert errors == [] and mixed == []
    assert seen == {a.version, b.version}


def test_fingerprint_or_dim_mismatch_is_refused_and_old_keeps_serving(
    local_store, two_versions, tiny_question_encoder
):
    from tests.fixtures.versions import fingerprint_for

    a, _ = two_versions
    other_encoder = fingerprint_for(tiny_question_encoder.dim).model_copy(update={"weights_sha256": "f" * 64})
    alien = build_version(local_store, tiny_question_encoder, TOPICS_B, 3000, 7000, fingerprint=other_encoder)
    swaps = []
    retriever = HotSwapRetriever(tiny_question_encoder)
    retriever.swap_listeners.append(swaps.append)
    assert retriever.swap_to(local_store, a.version).ok
    assert retriever.expected_fingerprint_key == local_store.manifest(a.version).encoder.key

    refused = retriever.swap_to(local_store, alien.version)
    assert not refused.ok and "fingerprint" in refused.error
    assert retriever.version == a.version and retriever.last_failure is refused
    assert retriever.retrieve_with_provenance(["paris"], 2).version == a.version
    assert [s.ok for s in swaps] == [True, False]

    # a version whose vectors have another dimension is refused even with no fingerprint to compare
    import numpy as np

    narrow = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    from tests.fixtures.rag import passages_for
    from tests.fixtures.versions import make_version

    small = make_version(local_store, passages_for(TOPICS_B[:3], 4000, 8000), narrow, fingerprint_for(16))
    fresh = HotSwapRetriever(tiny_question_encoder)
    result = fresh.swap_to(local_store, small)
    assert not result.ok and "16-dimensional" in result.error and fresh.version is None


def test_watcher_follows_promotes_and_rollbacks(local_store, two_versions, tiny_question_encoder):
    a, b = two_versions
    retriever = HotSwapRetriever(tiny_question_encoder, warmup_rounds=1)
    watcher = CurrentWatcher(local_store, retriever, poll_seconds=0.05)
    assert watcher.check().version == a.version
    assert watcher.check() is None  # nothing changed
    local_store.promote(b.version)
    assert watcher.check().version == b.version
    local_store.rollback()
    assert watcher.check().version == a.version and retriever.version == a.version

    # the polling thread sees the store move on its own
    watcher.start()
    try:
        local_store.promote(b.version)
        for _ in range(200):
            if retriever.version == b.version:
                break
            threading.Event().wait(0.02)
        assert retriever.version == b.version
    finally:
        watcher.stop()


def test_watcher_does_not_retry_a_broken_version_every_poll(local_store, two_versions, tiny_question_encoder,
                                                            tmp_path):
    a, b = two_versions
    retriever = HotSwapRetriever(tiny_question_encoder, warmup_rounds=0)
    watcher = CurrentWatcher(local_store, retriever, poll_seconds=1)
    watcher.check()
    arrow = tmp_path / "store" / "versions" / b.version / "passages.arrow"
    good = arrow.read_bytes()
    local_store.promote(b.version)  # promote verifies the files: break it after
    arrow.write_bytes(b"broken")
    failed = watcher.check()
    assert failed is not None and not failed.ok and retriever.version == a.version
    assert watcher.check() is None  # same generation, same version: not reloaded again
    arrow.write_bytes(good)
    assert watcher.check(retry=True).ok and retriever.version == b.version
