"""The validation gate: real versions built through the real build / validate / commit path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from storage.errors import Rejected
from storage.store import IndexStore
from tasks.assemble_version import build_version
from tasks.promote import promote_version, rollback_version
from tasks.validate import ValidationFloors, validate_version
from tests.fixtures.versions import (
    clustered_vectors,
    fingerprint_for,
    make_version,
    random_passages,
    write_version_inputs,
)

DIM = 16


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_a_good_version_is_ready_checksummed_and_promotable(store):
    vid = make_version(store, random_passages(300), clustered_vectors(300, DIM), fingerprint_for(DIM), spec="hnsw")
    m = store.manifest(vid)
    assert m.status == "ready" and m.validation.passed and m.validation.reason is None
    assert set(m.files) >= {"index.faiss", "passages.arrow", "passages/part-00000.parquet",
                            "embeddings/part-00000.npy", "passages/passages.json", "embeddings/embeddings.json"}
    assert m.files == store.checksums(vid)
    checks = m.validation.checks
    assert checks["counts"]["index_ntotal"] == checks["counts"]["table_rows"] == 300
    assert checks["self_retrieval"]["hit_rate"] >= 0.98 and checks["recall_at_10"]["recall"] >= 0.9
    assert m.index.phi is not None and m.index.bytes == store.fs.size(store.version_path(vid, "index.faiss"))
    assert promote_version(store, vid, actor="t").version == vid


def test_a_corrupted_file_fails_the_checksum_check(tmp_path):
    store = IndexStore(str(tmp_path / "store"))
    vid = make_version(store, random_passages(200), clustered_vectors(200, DIM), fingerprint_for(DIM))
    m = store.manifest(vid)
    path = store.version_path(vid, "embeddings", "part-00001.npy")
    data = bytearray(store.fs.cat_file(path))
    data[-1] ^= 0xFF
    store.fs.pipe_file(path, bytes(data))
    result = validate_version(store, m, ValidationFloors())
    assert not result.passed and "embeddings/part-00001.npy sha256" in result.reason and "\n" not in result.reason


def test_count_change_beyond_tolerance_is_rejected_unless_allowed(store):
    strict = ValidationFloors(sample=100)
    first = make_version(store, random_passages(200), clustered_vectors(200, DIM), fingerprint_for(DIM),
                         promote=True, floors=strict)
    shrunk = make_version(store, random_passages(120, seed=1), clustered_vectors(120, DIM, seed=1),
                          fingerprint_for(DIM), floors=strict)
    m = store.manifest(shrunk)
    assert m.status == "rejected" and "-40.0%" in m.validation.reason and "--allow-count-change" in m.validation.reason
    assert m.parent == first
    with pytest.raises(Rejected, match="rejected and cannot be promoted"):
        promote_version(store, shrunk)
    with pytest.raises(Rejected):
        rollback_version(store, shrunk)
    grown = make_version(store, random_passages(230, seed=2), clustered_vectors(230, DIM, seed=2),
                         fingerprint_for(DIM), floors=strict)  # +15%: within tolerance
    assert store.manifest(grown).status == "ready"
    allowed = make_version(store, random_passages(100, seed=3), clustered_vectors(100, DIM, seed=3),
                           fingerprint_for(DIM), floors=ValidationFloors(sample=100, allow_count_change=True))
    assert store.manifest(allowed).status == "ready"
    assert store.current().version == first


def test_a_poor_index_is_rejected_with_one_readable_line(tmp_path):
    store = IndexStore(str(tmp_path / "store"))
    # 4-byte PQ codes on 600 vectors cannot retrieve well: the gate must notice.
    vid = make_version(store, random_passages(600), clustered_vectors(600, 32), fingerprint_for(32),
                       spec="ivfpq:m=4,nbits=4")
    m = store.manifest(vid)
    assert m.status == "rejected" and "recall@10" in m.validation.reason and "\n" not in m.validation.reason
    assert store.list_versions()[0].version == vid  # visible, never promotable
    with pytest.raises(Rejected):
        promote_version(store, vid)


def test_exact_duplicate_passages_count_as_self_retrieval_hits(tmp_path):
    store = IndexStore(str(tmp_path / "store"))
    passages = random_passages(200)
    vectors = clustered_vectors(200, DIM)
    for i in range(0, 200, 2):  # every passage has an identical twin (same title, text and vector)
        passages[i + 1] = {**passages[i], "page_id": passages[i]["page_id"] + 10_000}
        vectors[i + 1] = vectors[i]
    vid = make_version(store, passages, unit(vectors), fingerprint_for(DIM), floors=ValidationFloors(sample=200))
    m = store.manifest(vid)
    assert m.status == "ready", m.validation.reason
    assert m.validation.checks["self_retrieval"]["hit_rate"] == 1.0


def test_a_failed_build_leaves_no_version_behind(tmp_path, monkeypatch):
    scratch = IndexStore(str(tmp_path / "scratch"))
    src = scratch.begin_version("enwiki", "20240101")
    write_version_inputs(scratch, src, random_passages(150), clustered_vectors(150, DIM), fingerprint_for(DIM))
    store = IndexStore(str(tmp_path / "store"))

    def explode(manifest):
        raise RuntimeError("injected failure just before the manifest is written")

    monkeypatch.setattr(store, "commit_version", explode)
    with pytest.raises(RuntimeError, match="injected"):
        build_version(store, scratch.at(src, "passages"), scratch.at(src, "embeddings"), spec="flat", progress=False)
    assert store.list_versions() == [] and store.version_ids() == []
    monkeypatch.undo()
    m = build_version(store, scratch.at(src, "passages"), scratch.at(src, "embeddings"), spec="flat", progress=False)
    assert m.status == "ready" and store.list_versions()[0].version == m.version
    assert store.current() is None  # build never promotes


TOPICS = {
    "Volcano": "A volcano is a rupture in the crust of a planet where hot lava, ash and gases escape.",
    "Violin": "The violin is a wooden string instrument played with a bow, the smallest of its family.",
    "Photosynthesis": "Photosynthesis is the process plants use to turn sunlight, water and carbon dioxide into sugar.",
    "Chess": "Chess is a board game for two players who move kings, queens, rooks, bishops, knights and pawns.",
    "Pyramid": "The Egyptian pyramids are ancient stone tombs built for pharaohs along the Nile.",
    "Penguin": "Penguins are flightless seabirds that live in the Southern Hemisphere, mostly Antarctica.",
}


def test_canary_questions_through_the_question_encoder(tmp_path, minilm_dir):
    from rag_model.encoders import EncoderSpec, load_document_encoder, load_question_encoder

    doc = load_document_encoder(EncoderSpec(model=str(minilm_dir), kind="mean"))
    passages = [{"page_id": i + 1, "rev_id": 1, "title": t, "text": x} for i, (t, x) in enumerate(TOPICS.items())]
    vectors = doc.encode([p["title"] for p in passages], [p["text"] for p in passages])
    question_encoder = load_question_encoder(str(minilm_dir), "mean")
    canaries = tmp_path / "canaries.jsonl"
    canaries.write_text("\n".join(json.dumps(c) for c in [
        {"question": "which bird cannot fly and lives near the south pole?", "title": "Penguin"},
        {"question": "how do plants make food from light?", "title": "Photosynthesis"},
        {"question": "what mountain erupts with lava?", "title": "Volcano"},
    ]))
    store = IndexStore(str(tmp_path / "store"))
    floors = ValidationFloors(canary_k=1, canary_hit=1.0, sample=6)
    vid = make_version(store, passages, vectors, doc.fingerprint, floors=floors, canaries=str(canaries),
                       question_encoder=question_encoder)
    m = store.manifest(vid)
    assert m.status == "ready", m.validation.reason
    assert m.validation.checks["canaries"] == {"questions": 3, "k": 1, "hit_rate": 1.0, "misses": []}
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "which bird cannot fly?", "title": "Chess"}) + "\n")
    result = validate_version(store, m, floors, canaries=str(wrong), question_encoder=question_encoder)
    assert not result.passed and "canary hit@1 0.000 < floor 1.0" in result.reason


@pytest.mark.parametrize(("first_row_id", "tombstones", "problem"), [
    (130, [5, 99, 119], None),  # a compaction above the base: its ids skip the merged segments' (100..129)
    (110, [5], "own rows start at row id 110, inside its ancestors' (they end at 120)"),
    (130, [5, 125], "tombstones name row ids outside the ancestors' rows"),  # 125: no segment holds it
    (130, [-1], "tombstones name row ids outside the ancestors' rows"),
])
def test_a_delta_s_row_ids_come_after_its_ancestors_and_its_tombstones_name_their_rows(first_row_id, tombstones,
                                                                                       problem):
    from types import SimpleNamespace

    import faiss

    from rag_model.segments import Segment
    from storage.manifest import IndexInfo
    from tasks.validate import _lineage_problems

    info = IndexInfo(spec="flat", factory="Flat", dim=4)
    tombstones = np.array(tombstones, dtype=np.int64)
    segments = [Segment("base", 0, 100, faiss.IndexFlatIP(4), info),
                Segment("night", 100, 20, faiss.IndexFlatIP(4), info),
                Segment("own", first_row_id, 10, faiss.IndexFlatIP(4), info)]
    live = 130 - int(((tombstones >= 0) & (tombstones < 120)).sum())
    manifest = SimpleNamespace(first_row_id=first_row_id, counts={"live_passages": live})
    lineage = SimpleNamespace(segments=segments, tombstones=tombstones, live=live)
    problems = _lineage_problems(manifest, lineage, {})
    assert problems == ([problem] if problem else [])
