"""The validation gate: a version is `ready` (promotable) only if every check passes.

Checks, in order: file checksums re-verified from the store (and against the sha256 the writers
recorded); passages == embeddings == index.ntotal == passages.arrow rows; no page taken down is
served (`storage.denylist`); passage count within a tolerance of the previous ready version (unless
explicitly allowed); self-retrieval on a sample; recall@10 of the index against exact search (both
skipped for a delta with no rows of its own; a delta measures the index it built and searches a fixed
number of probes through its whole lineage, so that its cost follows the change, not the corpus);
optional canary questions through the question encoder.
Failures become one readable line in `manifest.validation.reason` and status `rejected`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rag_model.segments import SegmentSearch
from rag_model.vectors import GT_K, exact_search_blocks, recall_at_k
from storage import layout
from storage.denylist import denied_page_ids
from storage.errors import RagindexError
from storage.fs import resolve
from storage.manifest import Manifest, Validation
from storage.records import EmbeddingSidecar, EmbeddingsSummary, PassagesSummary
from storage.timing import timed
from tasks.lineage_rows import LineageRows
from tasks.validation_floors import DEFAULT_COUNT_TOLERANCE, DEFAULT_MIN_RECALL, DEFAULT_MIN_SELF_RETRIEVAL

MIN_LINEAGE_PROBE_HITS = 0.5  # of a delta's probes searched through its whole lineage (see _retrieval_checks)


@dataclass(frozen=True)
class ValidationFloors:
    # passages may change by at most this fraction vs the previous ready version
    count_tolerance: float = DEFAULT_COUNT_TOLERANCE
    allow_count_change: bool = False  # the explicit override of count_tolerance
    self_retrieval: float = DEFAULT_MIN_SELF_RETRIEVAL
    recall_at_10: float = DEFAULT_MIN_RECALL
    canary_hit: float = 0.8
    canary_k: int = 10
    sample: int = 1000
    seed: int = 0


def read_summaries(store, version_id: str) -> tuple[PassagesSummary, EmbeddingsSummary]:
    """The passages and embeddings summaries of a (staged) version, validated."""
    path = store.version_path
    return (PassagesSummary.read(store.fs, path(version_id, layout.PASSAGES_DIR, layout.PASSAGES_SUMMARY)),
            EmbeddingsSummary.read(store.fs, path(version_id, layout.EMBEDDINGS_DIR, layout.EMBEDDINGS_SUMMARY)))


def validate_version(store, manifest: Manifest, floors: ValidationFloors, *, canaries: str | None = None,
                     question_encoder=None, verified_files: dict[str, str] | None = None) -> Validation:
    """Run every check; `verified_files` lets finalize pass checksums it just computed from the store."""
    checks: dict[str, Any] = {"floors": asdict(floors)}
    with timed(checks, "validate_s"):
        reason = _failure(store, manifest, floors, checks, canaries, question_encoder, verified_files)
    return Validation(passed=reason is None, reason=reason, checks=checks)


def _failure(store, manifest: Manifest, floors: ValidationFloors, checks: dict[str, Any], canaries: str | None,
             question_encoder, verified_files: dict[str, str] | None) -> str | None:
    """Why the version fails validation (one line), or None when it passes; fills `checks`."""
    failures: list[str] = []
    vid = manifest.version

    actual = verified_files if verified_files is not None else store.checksums(vid)
    file_problems = _file_problems(store, manifest, actual)
    checks["files"] = {"count": len(actual), "problems": file_problems[:20]}
    if file_problems:
        return (f"file check failed: {file_problems[0]}"
                + (f" (+{len(file_problems) - 1} more)" if len(file_problems) > 1 else ""))

    try:
        lineage = LineageRows(store, manifest)
    except RagindexError as exc:
        return f"segment check failed: {exc}"
    own = lineage.own
    counts = {
        "manifest_passages": manifest.counts.get("passages"),
        "passage_rows": _parquet_rows(store, vid),
        "embeddings": own.embeddings.total,
        "index_ntotal": int(own.index.ntotal),
        "table_rows": _table_rows(store, vid),
    }
    checks["counts"] = counts
    if len(set(counts.values())) != 1:
        failures.append("counts disagree: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    n = lineage.live
    failures += _denied_problems(store, manifest, lineage, checks)
    if manifest.is_delta:
        failures += _lineage_problems(manifest, lineage, checks)
    if own.index.d != manifest.index.dim or own.embeddings.dim != manifest.encoder.dim:
        failures.append(f"dimensions disagree: index {own.index.d}, info {manifest.index.dim}, "
                        f"embeddings {own.embeddings.dim}, encoder {manifest.encoder.dim}")
    if own.embeddings.fingerprint.key != manifest.encoder.key:
        failures.append("embeddings were made by a different encoder than the manifest names")

    previous = store.latest_ready(exclude=vid)
    if previous is not None:
        prev_n = previous.live_passages
        change = (n - prev_n) / prev_n if prev_n else float("inf")
        checks["count_change"] = {"previous": previous.version, "previous_passages": prev_n,
                                  "change": round(change, 4), "allowed": floors.allow_count_change}
        if abs(change) > floors.count_tolerance and not floors.allow_count_change:
            failures.append(f"passage count changed {change:+.1%} vs {previous.version} ({prev_n} -> {n}), "
                            f"beyond ±{floors.count_tolerance:.0%} (pass --allow-count-change to accept)")

    if failures or n == 0:
        if n == 0:
            failures.append("the version has no passages")
        return "; ".join(failures)

    if manifest.is_delta and own.rows == 0:
        # Only tombstones (a takedown, days that only remove pages): every live row is in an index its own
        # version's validation measured, and search skips dropped rows until k live ones come back. An
        # exact-search sample costs O(corpus) here, and a takedown must take seconds.
        checks["self_retrieval"] = checks["recall_at_10"] = {"skipped": "no rows of its own, only tombstones"}
    else:
        self_rate, recall, probes = _retrieval_checks(lineage, floors, checks)
        if self_rate < floors.self_retrieval:
            failures.append(f"self-retrieval {self_rate:.3f} < floor {floors.self_retrieval}")
        if recall < floors.recall_at_10:
            failures.append(f"recall@10 {recall:.3f} < floor {floors.recall_at_10}")
        if probes < MIN_LINEAGE_PROBE_HITS:
            failures.append(f"a search through the whole lineage finds only {probes:.0%} of its probe rows")
    if canaries:
        hit = _canary_check(store, manifest, lineage, floors, canaries, question_encoder, checks)
        if hit < floors.canary_hit:
            failures.append(f"canary hit@{floors.canary_k} {hit:.3f} < floor {floors.canary_hit}")
    return "; ".join(failures) or None


# -- checks ----------------------------------------------------------------------------------------


def _file_problems(store, manifest: Manifest, actual: dict[str, str]) -> list[str]:
    problems = []
    for rel in layout.REQUIRED_FILES:
        if rel not in actual:
            problems.append(f"{rel} is missing")
    for rel, digest in sorted(manifest.files.items()):
        if rel not in actual:
            problems.append(f"{rel} is listed in the manifest but missing from the store")
        elif actual[rel] != digest:
            problems.append(f"{rel} sha256 {actual[rel][:12]}… does not match the manifest's {digest[:12]}…")
    for rel in sorted(set(actual) - set(manifest.files)):
        problems.append(f"{rel} is in the store but not in the manifest")
    if problems:
        return problems
    # The writers recorded sha256s as they wrote; the store must still hold those bytes.
    vid = manifest.version
    passages, embeddings = read_summaries(store, vid)
    for sub, summary in ((layout.PASSAGES_DIR, passages), (layout.EMBEDDINGS_DIR, embeddings)):
        for shard in summary.shards:
            rel = f"{sub}/{shard.name}"
            if actual.get(rel) != shard.sha256:
                problems.append(f"{rel} does not match the sha256 recorded when it was written")
    for shard in embeddings.shards:
        sidecar = EmbeddingSidecar.read(store.fs, store.version_path(vid, layout.EMBEDDINGS_DIR,
                                                                     layout.sidecar(shard.name)))
        passages_rel = f"{layout.PASSAGES_DIR}/{layout.passage_shard(shard.name)}"
        if actual.get(passages_rel) != sidecar.passages_sha256:
            problems.append(f"{layout.EMBEDDINGS_DIR}/{shard.name} was computed from other passages than "
                            f"{passages_rel}")
    return problems


def _parquet_rows(store, vid: str) -> int:
    total = 0
    for shard in layout.passage_shard_paths(store.fs, store.version_path(vid, layout.PASSAGES_DIR)):
        with store.fs.open(shard, "rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def _table_rows(store, vid: str) -> int:
    with store.fs.open(store.version_path(vid, layout.PASSAGE_TABLE), "rb") as f:
        reader = pa.ipc.open_file(f)
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))


def _denied_problems(store, manifest: Manifest, lineage: LineageRows, checks: dict[str, Any]) -> list[str]:
    """A version serving a page taken down (`storage.denylist`) is rejected, however it was made."""
    denied = denied_page_ids(store, manifest.source.wiki)
    if not denied:
        return []
    served = lineage.pages_among(denied)
    checks["denied"] = {"denied_pages": len(denied), "served": served[:20]}
    if not served:
        return []
    more = f" (+{len(served) - 1} more)" if len(served) > 1 else ""
    return [f"serves page {served[0]}{more}, taken down (`ragindex takedown --lift {served[0]}` lifts it)"]


def _lineage_problems(manifest: Manifest, lineage: LineageRows, checks: dict[str, Any]) -> list[str]:
    """A delta's own checks: its row ids come after its ancestors' (a compaction above the base skips those of
    the segments it merged: a row id is never reused in a lineage), and tombstones only drop ancestors' rows."""
    problems = []
    ancestors = lineage.segments[:-1]
    starts = np.array([s.first_row_id for s in ancestors], dtype=np.int64)
    ends = starts + np.array([s.rows for s in ancestors], dtype=np.int64)
    tombstones = lineage.tombstones
    checks["lineage"] = {"segments": len(lineage.segments), "tombstones": int(len(tombstones)),
                         "live_passages": lineage.live}
    if manifest.first_row_id < ends[-1]:
        problems.append(f"own rows start at row id {manifest.first_row_id}, inside its ancestors' (they end at "
                        f"{ends[-1]})")
    at = np.searchsorted(starts, tombstones, side="right") - 1
    if len(tombstones) and ((at < 0).any() or (tombstones >= ends[np.maximum(at, 0)]).any()):
        problems.append("tombstones name row ids outside the ancestors' rows")
    if manifest.counts.get("live_passages") != lineage.live:
        problems.append(f"live passages {lineage.live} != the manifest's {manifest.counts.get('live_passages')}")
    return problems


def _retrieval_checks(lineage: LineageRows, floors: ValidationFloors,
                      checks: dict[str, Any]) -> tuple[float, float, float]:
    """(self-retrieval rate, recall@10, share of lineage probes found): the index the version built (its own
    segment; a full version has no other), queried by a sample of its rows, against exact search over them.
    A delta also searches `LINEAGE_PROBES` rows through its whole lineage: each ancestor's index was measured
    when it was validated and a merged search finds what each segment's search finds, so exact search over
    every served row (O(corpus) per micro-delta) would re-measure what is already known. The probes only
    have to show the merge answering (an approximate ancestor may miss one; wrong row ids or a broken
    tombstone filter miss most)."""
    own = lineage.own
    ids = lineage.own_sample(floors.sample, floors.seed)
    queries = lineage.gather(ids)
    # [own] alone: the index file this version built is what is measured (one segment is never packed)
    _, found = SegmentSearch([own]).search(queries, 10)
    gt_s, gt_i = exact_search_blocks(queries, lineage.blocks([own]), min(GT_K, own.live))
    recall = recall_at_k(found, gt_i, gt_s, 10)
    self_rate = _self_hits(lineage, ids, queries, found) / len(ids)
    scope = "own rows" if lineage.manifest.is_delta else "every live row"
    checks["self_retrieval"] = {"sample": len(ids), "scope": scope, "hit_rate": round(self_rate, 4)}
    checks["recall_at_10"] = {"sample": len(ids), "scope": scope, "recall": round(recall, 4),
                              "search_params": lineage.manifest.index.search_params}
    if not lineage.manifest.is_delta:
        return self_rate, recall, 1.0
    probes = lineage.lineage_probes(ids, floors.seed + 1)
    probe_queries = lineage.gather(probes)
    _, probe_found = lineage.segment_search.search(probe_queries, 10)
    probe_rate = _self_hits(lineage, probes, probe_queries, probe_found) / len(probes) if len(probes) else 1.0
    checks["lineage_probes"] = {"probes": len(probes), "found": round(probe_rate, 4)}
    return self_rate, recall, probe_rate


def _self_hits(lineage: LineageRows, ids: np.ndarray, queries: np.ndarray, found: np.ndarray) -> int:
    """How many rows come back first for their own vector: itself, an exact-duplicate passage, or a vector
    that truly scores at least as high under inner product (unnormalised DPR vectors need not be their
    own best match)."""
    top1 = found[:, 0]
    top1_vectors = lineage.gather(np.where(top1 >= 0, top1, ids))
    self_ip = np.einsum("ij,ij->i", queries, queries)
    top1_ip = np.einsum("ij,ij->i", queries, top1_vectors)
    hit = (top1 >= 0) & ((top1 == ids) | (top1_ip >= self_ip - 1e-4 * np.abs(self_ip)))
    rest = np.flatnonzero(~hit & (top1 >= 0))
    if len(rest):  # only these need their passages read (a column read costs a whole shard's column)
        hashes = lineage.column("content_hash", np.concatenate([ids[rest], top1[rest]]))
        hit[rest] = [hashes.get(int(got)) == hashes.get(int(row)) for row, got in zip(ids[rest], top1[rest],
                                                                                     strict=True)]
    return int(hit.sum())


def _canary_check(store, manifest: Manifest, lineage: LineageRows, floors: ValidationFloors, canaries: str,
                  question_encoder,
                  checks: dict[str, Any]) -> float:
    fs, path = resolve(canaries, store.s3_endpoint_url)
    items = []
    try:
        with fs.open(path, "rb") as f:
            for lineno, line in enumerate(f.read().decode("utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    items.append((str(obj["question"]), str(obj["title"])))
                except (ValueError, KeyError, TypeError):
                    raise RagindexError(
                        f"{canaries}:{lineno}: expected a JSON object with 'question' and 'title'"
                    ) from None
    except FileNotFoundError:
        raise RagindexError(f"canary file {canaries} does not exist") from None
    if not items:
        raise RagindexError(f"canary file {canaries} holds no questions")
    if question_encoder is None:
        if not manifest.question_encoder:
            raise RagindexError("canaries need a question encoder, and the manifest names none")
        from rag_model.encoders import question_encoder_for

        question_encoder = question_encoder_for(manifest.encoder, manifest.question_encoder)
    vectors = question_encoder.encode([q for q, _ in items])
    _, found = lineage.segment_search.search(vectors, floors.canary_k)
    titles = lineage.column("title", found.reshape(-1))
    misses, hits = [], 0
    for (question, title), row in zip(items, found, strict=True):
        got = {titles.get(r, "").casefold().strip() for r in row.tolist() if r >= 0}
        if title.casefold().strip() in got:
            hits += 1
        else:
            misses.append(question)
    rate = hits / len(items)
    checks["canaries"] = {"questions": len(items), "k": floors.canary_k, "hit_rate": round(rate, 4),
                          "misses": misses[:10]}
    return rate
