"""Index benchmark: build time, bytes/vector, recall@10 vs exact and queries/s for flat, hnsw (M=32),
HF's IndexHNSWFlat(768, 128) and auto, on clustered synthetic vectors and on real embeddings of the gensim
enwiki excerpt; then auto alone at a larger N. Checks the floors: auto recall@10 >= 0.95 with >= 5x flat's
queries/s at <= 1/4 of its memory. Prints the extrapolation to 21M passages under the default budget.

    .venv/bin/python benchmarks/index_bench.py --n 200000 --big-n 1000000
    .venv/bin/python benchmarks/index_bench.py --n 20000 --skip-real          # quick smoke run
"""

from __future__ import annotations

import argparse
import bz2
import os
import re
import sys
import tempfile
import time

import faiss
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rag_model.vector_search import read_index, search  # noqa: E402
from storage.store import IndexStore  # noqa: E402
from tasks.build_index import build_index  # noqa: E402
from tests.fixtures.versions import fingerprint_for, write_version_inputs  # noqa: E402

PAPER_PASSAGES = 21_015_324
DEFAULT_BUDGET = 16 * 2**30
SPECS = [("flat", "flat"), ("hnsw M=32 (DPR trick)", "hnsw:M=32"), ("HF IndexHNSWFlat(d,128)", "HNSW128"),
         ("auto", "auto")]


def clustered(n: int, dim: int, seed: int, clusters: int = 1000, intrinsic: int = 64) -> np.ndarray:
    """Seeded 64-d Gaussian mixture projected to `dim` plus small noise: low intrinsic dimension."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, intrinsic)).astype(np.float32) * 2.0
    proj = (rng.normal(size=(intrinsic, dim)) / np.sqrt(intrinsic)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, 50_000):
        m = min(50_000, n - lo)
        labels = rng.integers(0, clusters, size=m)
        low = centers[labels] + rng.normal(size=(m, intrinsic)).astype(np.float32)
        out[lo: lo + m] = low @ proj + 0.05 * rng.normal(size=(m, dim)).astype(np.float32)
    return out


def stage(root: str, vectors: np.ndarray, titles: list[str] | None = None) -> tuple[IndexStore, str]:
    store = IndexStore(root)
    vid = store.begin_version("enwiki", "20240101")
    n = len(vectors)
    passages = [{"page_id": i + 1, "rev_id": 1, "title": (titles[i] if titles else f"t{i}"), "text": str(i)}
                for i in range(n)]
    write_version_inputs(store, vid, passages, vectors, fingerprint_for(vectors.shape[1]), shard_rows=50_000)
    return store, vid


def measure(store: IndexStore, vid: str, spec: str, queries: np.ndarray, exact: np.ndarray) -> dict:
    at = store.at(vid, f"bench-{re.sub(r'[^a-z0-9]+', '-', spec.lower())}.faiss")
    t = time.perf_counter()
    info = build_index(store.at(vid, "embeddings"), at, spec=spec, progress=False)
    build_s = time.perf_counter() - t
    index = read_index(at)
    search(index, info, queries[:10], 10)  # warm up
    t = time.perf_counter()
    _, ids = search(index, info, queries, 10)
    qps = len(queries) / (time.perf_counter() - t)
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), exact.tolist(), strict=True)]))
    n = index.ntotal
    return {"spec": spec, "factory": info.factory, "params": info.search_params, "build_s": build_s,
            "bytes": info.bytes, "bpv": info.bytes / n, "recall": recall, "qps": qps, "n": n,
            "add_s": info.params.get("add_s", 0.0)}


def noisy_queries(vectors: np.ndarray, n: int) -> np.ndarray:
    """Database vectors moved off by noise, so that none is trivially its own neighbour."""
    picked = vectors[np.random.default_rng(5).choice(len(vectors), n, replace=False)]
    return picked + 0.05 * np.random.default_rng(6).normal(size=picked.shape).astype(np.float32)


def exact_top10(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    return flat.search(queries, 10)[1]


def report(title: str, rows: list[dict]) -> None:
    print(f"\n## {title}")
    print(f"{'index':<26}{'factory':<22}{'search':<18}{'build s':>9}{'bytes/vec':>11}{'recall@10':>11}{'q/s':>10}")
    for name, r in rows:
        print(f"{name:<26}{r['factory']:<22}{str(r['params']):<18}{r['build_s']:>9.1f}{r['bpv']:>11.1f}"
              f"{r['recall']:>11.4f}{r['qps']:>10.0f}")


def floors(rows: dict[str, dict]) -> bool:
    flat, auto = rows["flat"], rows["auto"]
    speed, memory = auto["qps"] / flat["qps"], auto["bytes"] / flat["bytes"]
    ok = auto["recall"] >= 0.95 and speed >= 5 and memory <= 0.25
    print(f"auto vs flat: recall@10 {auto['recall']:.4f} (floor 0.95), q/s x{speed:.1f} (floor 5x), "
          f"memory x{memory:.3f} (floor 0.25) -> {'PASS' if ok else 'FAIL'}")
    return ok


def extrapolate(auto: dict) -> None:
    mem = auto["bpv"] * PAPER_PASSAGES
    # Training and tuning work on bounded samples; adding vectors grows with N.
    fixed = max(auto["build_s"] - auto["add_s"], 0.0)
    build = fixed + auto["add_s"] / auto["n"] * PAPER_PASSAGES
    print(f"extrapolated to {PAPER_PASSAGES:,} passages with {auto['factory'].split(',', 1)[-1]} codes: "
          f"{mem / 2**30:.1f} GiB index (budget {DEFAULT_BUDGET / 2**30:.0f} GiB: "
          f"{'fits' if mem <= DEFAULT_BUDGET else 'does NOT fit'}), about {build / 3600:.1f} h build "
          f"(linear in N beyond the sample-bounded training; nlist grows with sqrt(N) in practice)")


def real_embeddings(max_passages: int) -> tuple[np.ndarray, list[str], np.ndarray] | None:
    try:
        from flows.demo import gensim_excerpt, minilm_dir
        from rag_model.encoders import EncoderSpec, load_document_encoder, load_question_encoder

        path = str(gensim_excerpt())
        model = str(minilm_dir())
    except Exception as exc:  # the benchmark runs without the demo extras; say why and move on
        print(f"\n(real embeddings skipped: {type(exc).__name__}: {exc})")
        return None
    # A crude wikitext strip is enough to get realistic text for a vector distribution.
    with bz2.open(path, "rt", encoding="utf-8") as f:
        xml = f.read()
    titles, texts = [], []
    for page in re.finditer(r"<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>", xml, re.S):
        words = re.sub(r"\{\{.*?\}\}|\[\[(?:[^|\]]*\|)?|\]\]|<[^>]+>|&\w+;|'{2,}|=+", " ", page.group(2)).split()
        for lo in range(0, len(words), 100):
            titles.append(page.group(1))
            texts.append(" ".join(words[lo: lo + 100]))
    titles, texts = titles[:max_passages], texts[:max_passages]
    print(f"\nembedding {len(texts)} gensim-excerpt passages with {os.path.basename(model)} ...", flush=True)
    doc = load_document_encoder(EncoderSpec(model=model, kind="mean"))
    vectors = doc.encode(titles, texts, batch_size=64)
    rng = np.random.default_rng(0)
    q_titles = [titles[i] for i in rng.choice(len(titles), size=min(500, len(titles)), replace=False)]
    queries = load_question_encoder(model, "mean").encode([f"what is {t}?" for t in q_titles])
    return vectors, titles, queries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="synthetic vectors (default 200k)")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--big-n", type=int, default=0, help="then auto alone at this N (e.g. 1000000); 0 = skip")
    ap.add_argument("--skip-real", action="store_true", help="skip the gensim-excerpt embeddings")
    ap.add_argument("--real-max", type=int, default=5000, help="cap on real passages to embed")
    ap.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0 = faiss default)")
    args = ap.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    ok = True
    with tempfile.TemporaryDirectory(prefix="index-bench-") as tmp:
        print(f"synthetic: {args.n:,} x {args.dim} (64-d Gaussian mixture, 1000 clusters, projected + noise)")
        vectors = clustered(args.n, args.dim, seed=0)
        queries = noisy_queries(vectors, args.queries)
        exact = exact_top10(vectors, queries)
        store, vid = stage(os.path.join(tmp, "synthetic"), vectors)
        del vectors
        rows = {}
        named = []
        for name, spec in SPECS:
            rows[spec] = measure(store, vid, spec, queries, exact)
            named.append((name, rows[spec]))
        report(f"synthetic {args.n:,} x {args.dim}", named)
        ok &= floors(rows)
        extrapolate(rows["auto"])

        if not args.skip_real:
            real = real_embeddings(args.real_max)
            if real is not None:
                rv, titles, rq = real
                rstore, rvid = stage(os.path.join(tmp, "real"), rv, titles)
                rexact = exact_top10(rv, rq)
                report(f"gensim enwiki excerpt, {len(rv):,} x {rv.shape[1]} (minilm)",
                       [(name, measure(rstore, rvid, spec, rq, rexact)) for name, spec in SPECS])

        if args.big_n:
            print(f"\nauto alone at {args.big_n:,} x {args.dim} ...", flush=True)
            big = clustered(args.big_n, args.dim, seed=0)
            bq = noisy_queries(big, args.queries)
            bexact = exact_top10(big, bq)
            bstore, bvid = stage(os.path.join(tmp, "big"), big)
            del big
            auto = measure(bstore, bvid, "auto", bq, bexact)
            report(f"auto at {args.big_n:,}", [("auto", auto)])
            extrapolate(auto)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
