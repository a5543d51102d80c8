"""Embedding reuse through the per-version hash table: same answers as the old scan, with or without a table."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from rag_model.vectors import read_rows
from storage import layout
from storage.fs import resolve
from storage.location import Location
from storage.manifest import EncoderFingerprint, IndexInfo, Manifest, SourceDump
from storage.records import EmbeddingSidecar, EmbeddingsSummary, PassagesSummary, ShardEntry
from tasks import reuse_index
from tasks.embed import _reuse_vectors, _source_shards
from tasks.reuse_index import hash_keys, open_source, write_hash_index

DIM = 8
FINGERPRINT = EncoderFingerprint(model_id="synthetic", weights_sha256="0" * 64, dim=DIM, pooling="cls",
                                 max_length=16, kind="dpr")
KEY = FINGERPRINT.key


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_version(root: Path, shards: Sequence[Sequence[str]], seed: int) -> None:
    """Passage shards holding these content hashes, random vectors, sidecars and embeddings.json."""
    rng = np.random.default_rng(seed)
    (root / layout.PASSAGES_DIR).mkdir(parents=True)
    (root / layout.EMBEDDINGS_DIR).mkdir()
    entries, passage_entries, start = [], [], 0
    for n, hashes in enumerate(shards):
        rows = len(hashes)
        name = layout.passage_part(n)
        table = pa.table({"row_id": range(start, start + rows), "passage_id": [f"p{start + i}" for i in range(rows)],
                          "page_id": [1] * rows, "rev_id": [1] * rows, "title": ["t"] * rows,
                          "text": ["x"] * rows, "content_hash": list(hashes)}, schema=layout.PASSAGE_SCHEMA)
        pq.write_table(table, root / layout.PASSAGES_DIR / name)
        npy = root / layout.EMBEDDINGS_DIR / layout.embedding_shard(name)
        np.save(npy, rng.standard_normal((rows, DIM)).astype(np.float32))
        sidecar = EmbeddingSidecar(passages_sha256=_sha(root / layout.PASSAGES_DIR / name), fingerprint_key=KEY,
                                   rows=rows, dim=DIM, encoded=rows, sha256=_sha(npy))
        (root / layout.EMBEDDINGS_DIR / layout.sidecar(name)).write_text(json.dumps(sidecar.dump()))
        entries.append(ShardEntry(name=npy.name, rows=rows, sha256=sidecar.sha256))
        passage_entries.append(ShardEntry(name=name, rows=rows, sha256=sidecar.passages_sha256))
        start += rows
    summary = EmbeddingsSummary(fingerprint=FINGERPRINT, dim=DIM, rows=start, encoded=start, shards=entries)
    (root / layout.EMBEDDINGS_SUMMARY_PATH).write_text(json.dumps(summary.dump()))
    # Reuse copies vectors only from shards whose bytes their summaries (or manifest) name.
    passages = PassagesSummary(source=SourceDump(wiki="enwiki", dump_date="20240101"), passages=start,
                               shards=passage_entries)
    (root / layout.PASSAGES_SUMMARY_PATH).write_text(json.dumps(passages.dump()))


def scan_reuse(hashes: pa.Array, reuse_from: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The reuse lookup as it was before the hash table: scan every earlier shard's content_hash column."""
    unique = pc.unique(hashes)
    row_to_unique = pc.index_in(hashes, value_set=unique).to_numpy(zero_copy_only=False)
    src_shard = np.full(len(unique), -1, dtype=np.int64)
    src_row = np.zeros(len(unique), dtype=np.int64)
    sources = []
    for url in reuse_from:
        fs, root = resolve(url)
        for passages_path, npy_path in _source_shards(fs, root, KEY) or ():
            column = pq.read_table(passages_path, columns=["content_hash"], filesystem=fs).column(0)
            hit = pc.fill_null(pc.index_in(column, value_set=unique), -1).to_numpy(zero_copy_only=False)
            found_rows = np.flatnonzero(hit >= 0)
            targets = hit[found_rows].astype(np.int64)
            fresh = src_shard[targets] == -1
            found_rows, targets = found_rows[fresh], targets[fresh]
            targets, first = np.unique(targets, return_index=True)
            if len(targets):
                src_shard[targets] = len(sources)
                src_row[targets] = found_rows[first]
                sources.append((fs, npy_path))
    vectors = np.zeros((len(unique), DIM), dtype=np.float32)
    for i, (fs, npy_path) in enumerate(sources):
        which = np.flatnonzero(src_shard == i)
        which = which[np.argsort(src_row[which])]
        vectors[which] = read_rows(fs, npy_path, src_row[which], DIM)
    return (src_shard >= 0)[row_to_unique], vectors[row_to_unique]


def h(i: int) -> str:
    return hashlib.sha1(str(i).encode()).hexdigest()


@pytest.fixture
def corpus(tmp_path) -> tuple[list[str], list[pa.Array]]:
    """Two earlier versions (newer first) that overlap, repeat hashes within and across shards, and
    new shards with hashes found in one, both or neither."""
    rng = np.random.default_rng(0)
    newer = [[h(i) for i in rng.integers(0, 300, 70)] for _ in range(4)]
    older = [[h(i) for i in rng.integers(150, 500, 90)] for _ in range(3)]
    write_version(tmp_path / "v2", newer, seed=2)
    write_version(tmp_path / "v1", older, seed=1)
    new_shards = [pa.array([h(i) for i in rng.integers(0, 700, 120)]) for _ in range(3)]
    return [str(tmp_path / "v2"), str(tmp_path / "v1")], new_shards


@pytest.fixture(autouse=True)
def fresh_cache():
    reuse_index._open.clear()
    yield
    reuse_index._open.clear()


def test_table_lookup_is_byte_identical_to_the_scan(corpus):
    roots, new_shards = corpus
    for root in roots:
        assert write_hash_index(Location(root)) > 0
    assert all(open_source(Location(r), KEY, _source_shards).stored for r in roots)
    total_found = 0
    for hashes in new_shards:
        found, vectors = _reuse_vectors(hashes, [Location(r) for r in roots], KEY, DIM)
        ref_found, ref_vectors = scan_reuse(hashes, roots)
        np.testing.assert_array_equal(found, ref_found)
        assert vectors[found].tobytes() == ref_vectors[ref_found].tobytes()
        total_found += int(found.sum())
    assert 0 < total_found < sum(len(s) for s in new_shards)  # some found, some new: both paths exercised


def test_a_version_without_a_table_still_reuses_and_builds_it_once(corpus, monkeypatch):
    roots, new_shards = corpus  # no write_hash_index: versions from before the table existed
    built = []
    real_build = reuse_index.build_table
    monkeypatch.setattr(reuse_index, "build_table", lambda fs, paths: built.append(len(paths)) or real_build(fs, paths))
    for hashes in new_shards:
        found, vectors = _reuse_vectors(hashes, [Location(r) for r in roots], KEY, DIM)
        ref_found, ref_vectors = scan_reuse(hashes, roots)
        np.testing.assert_array_equal(found, ref_found)
        assert found.any() and vectors[found].tobytes() == ref_vectors[ref_found].tobytes()
    assert built == [4, 3]  # once per earlier version for the whole refresh, not once per new shard
    assert not open_source(Location(roots[0]), KEY, _source_shards).stored


def test_a_table_that_does_not_match_its_manifest_is_rebuilt_not_trusted(corpus):
    roots, new_shards = corpus
    root = Path(roots[0])
    write_hash_index(Location(roots[0]))
    files = {f"{layout.EMBEDDINGS_DIR}/{n}": _sha(root / layout.EMBEDDINGS_DIR / n)
             for n in (layout.HASH_KEYS, layout.HASH_ROWS)}
    manifest = Manifest(version="v2", status="ready", source=SourceDump(wiki="enwiki", dump_date="20260101"),
                        encoder=FINGERPRINT, index=IndexInfo(spec="flat", factory="Flat", dim=DIM), files=files)
    (root / layout.MANIFEST).write_text(manifest.to_json())
    assert open_source(Location(roots[0]), KEY, _source_shards).stored
    reuse_index._open.clear()
    # Point every key at the wrong row: only the manifest's sha256 can tell.
    rows_path = root / layout.EMBEDDINGS_DIR / layout.HASH_ROWS
    locations = np.load(rows_path)
    np.save(rows_path, np.roll(locations, 1, axis=0))
    assert not open_source(Location(roots[0]), KEY, _source_shards).stored
    for hashes in new_shards:
        found, vectors = _reuse_vectors(hashes, [Location(roots[0])], KEY, DIM)
        ref_found, ref_vectors = scan_reuse(hashes, roots[:1])
        np.testing.assert_array_equal(found, ref_found)
        assert vectors[found].tobytes() == ref_vectors[ref_found].tobytes()


def test_hash_keys_pads_hashes_of_different_lengths_and_finds_them():
    hashes = pa.array(["b", "abc", "", "ab", "abcd"])
    keys = hash_keys(hashes)
    assert keys.dtype == np.dtype("S4") and keys.tolist() == [b"b", b"abc", b"", b"ab", b"abcd"]
    table = reuse_index.HashTable(np.sort(keys[:4]), np.arange(8, dtype=np.int32).reshape(4, 2))
    shard, _ = table.lookup(hash_keys(pa.array(["ab", "abcd", "zz", "abcde"])))
    assert shard[0] >= 0 and (shard[1:] == -1).all()  # "abcd" is not in the table, "abcde" is longer than any key


@pytest.mark.parametrize("n", [0, 1, 255, 257, 4096 + 3, 20_000])
def test_fenced_search_finds_what_a_binary_search_finds(n):
    """The fenced lookup answers like np.searchsorted (leftmost), duplicates and absent keys included."""
    rng = np.random.default_rng(n)
    keys = np.sort(rng.integers(0, max(1, n // 3) + 1, size=n).astype("S8"))  # many repeated keys
    table = reuse_index.HashTable(keys, np.stack([np.zeros(n), np.arange(n)], axis=1).astype(np.int32))
    needles = np.sort(np.concatenate([keys[rng.integers(0, n, size=min(n, 500))] if n else keys,
                                      rng.integers(0, n + 10, size=300).astype("S8"),
                                      np.array([b"", b"\xff" * 8], dtype="S8")]))
    np.testing.assert_array_equal(table._leftmost(needles), np.searchsorted(keys, needles, side="left"))
    shard, row = table.lookup(needles)
    present = np.isin(needles, keys)
    assert (shard[~present] == -1).all() and (shard[present] == 0).all()
    first = {k: i for i, k in reversed(list(enumerate(keys.tolist())))}
    assert row[present].tolist() == [first[k] for k in needles[present].tolist()]


def test_a_source_shard_is_hashed_once_across_runs_and_only_its_rows_are_read(corpus, tmp_path, monkeypatch,
                                                                              caplog):
    """Reuse verifies each source shard through the local file cache: hashed on first use, then (unchanged)
    never again, not by a later new shard nor by the next night's process; only the rows reused are read.
    A shard whose bytes change is hashed again and, no longer matching its manifest, not reused."""
    import storage.cache as cache
    import tasks.embed as embed

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the cache lives under ~/.cache/ragindex
    roots, new_shards = corpus
    hashed, reads = [], []
    monkeypatch.setattr(cache, "sha256_of_path", lambda path: hashed.append(path) or cache.file_digest(
        cache.LocalFileSystem(), path))
    monkeypatch.setattr(embed, "read_rows", lambda fs, path, rows, dim: reads.append(len(rows))
                        or read_rows(fs, path, rows, dim))
    for _night in range(2):  # a fresh FileCache per call, as in a new process
        for hashes in new_shards:
            found, vectors = _reuse_vectors(hashes, [Location(r) for r in roots], KEY, DIM)
            ref_found, ref_vectors = scan_reuse(hashes, roots)
            np.testing.assert_array_equal(found, ref_found)
            assert vectors[found].tobytes() == ref_vectors[ref_found].tobytes()
    assert hashed and len(hashed) == len(set(hashed))  # each source file hashed once over both nights
    assert all(n < 70 for n in reads)  # rows, never whole shards (70-90 rows each)

    before, _ = _reuse_vectors(new_shards[0], [Location(r) for r in roots], KEY, DIM)
    victim = sorted(Path(roots[0], layout.EMBEDDINGS_DIR).glob("part-*.npy"))[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    hashed.clear()
    with caplog.at_level(logging.WARNING):
        after, _ = _reuse_vectors(new_shards[0], [Location(r) for r in roots], KEY, DIM)
    assert str(victim) in hashed  # its stamp changed: hashed again, found corrupt, not reused
    assert "encoding its passages again" in caplog.text and after.sum() < before.sum()
