"""Scale benchmark: every step of a version measured at growing corpus sizes, its growth exponent, and 21M.

For each size a synthetic corpus with real passage shapes (articles of ~300 words with titles and
page/rev ids, chunked into 100-word passages by tasks.chunk, written as work units and assembled by
tasks.passages.assemble) and seeded random 768-d vectors (a Gaussian mixture of low intrinsic
dimension, generated one shard at a time: 3M x 768 float32 is 9.2 GB and is never in memory) written
as the embed step writes them (.npy, sidecar, embeddings.json). Every step runs in its own spawned
child process, so each has its own peak RSS (ru_maxrss):

    passages      assemble the work units into passage shards (tasks.passages.assemble)
    index         build_index with `auto` under the default 16 GiB budget (train vs add time recorded)
    table         passages.arrow (tasks.passage_table.write_passage_table)
    hash_table    the reuse hash table (tasks.reuse_index.write_hash_index)
    validate      checksums + the validation gate + commit (tasks.assemble_version.finish_version)
    reuse         the reuse lookup of a second version with 2% changed passages against the first
                  (tasks.embed._reuse_vectors per shard, vectors read for every row found); the
                  fastest of REUSE_RUNS runs
    serve         VersionIndex.open, first query, a hot swap to another version, 200 queries, steady RSS

Then: the growth exponent of each step (log-log slope between successive sizes), a projection to
21M passages, disk use per version, the serving machine at 21M, and the PASS/FAIL checks.

    .venv/bin/python benchmarks/scale_bench.py --sizes 20k,60k                  # smoke run
    .venv/bin/python benchmarks/scale_bench.py --sizes 100k,300k,1M,3M          # the issue's run (~1 h)
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import math
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PAPER_PASSAGES = 21_015_324
DIM = 768
WORDS = 300  # words per synthetic article: three 100-word passages
UNIT_ARTICLES = 20_000  # articles per synthetic work unit
CHANGED = 0.02
REUSE_RUNS = 3
STEPS = ("passages", "index", "index_again", "table", "hash_table", "validate", "reuse", "serve")
PARALLEL = {"index", "index_again", "validate", "reuse"}  # faiss/BLAS threads, or one task per shard
MB = 2**20


def parse_size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise SystemExit(f"scale_bench: bad size {text!r} (use e.g. 100k, 1M, 3M)") from None


# -- the synthetic corpus -----------------------------------------------------------------------------


def _vocabulary() -> np.ndarray:
    from tests.fixtures.models import COMMON_WORDS

    return np.array(sorted(set(COMMON_WORDS)), dtype=object)


def _unit_rows(unit: int, articles: int, changed: bool) -> list[dict]:
    """The passages of one work unit: `articles` articles chunked by tasks.chunk (2% edited when `changed`)."""
    from tasks.chunk import chunk_article

    vocab = _vocabulary()
    rng = np.random.default_rng(unit)
    words = vocab[rng.integers(0, len(vocab), size=(articles, WORDS))]
    title_words = vocab[rng.integers(0, len(vocab), size=(articles, 2))]
    edit = np.random.default_rng(10_000 + unit).random((articles, WORDS // 100)) < CHANGED if changed else None
    rows = []
    for a in range(articles):
        page_id = unit * UNIT_ARTICLES + a + 1
        text = words[a]
        rev = 1
        if edit is not None and edit[a].any():
            text = text.copy()
            text[np.flatnonzero(edit[a]) * 100 + 7] = "edited"  # one word inside each edited passage
            rev = 2
        title = f"{title_words[a, 0].title()} {title_words[a, 1]} {page_id}"
        rows.extend(chunk_article(page_id, 1000 * page_id + rev, title, " ".join(text)))
    return rows


def write_units(out: Path, n: int, changed: bool) -> list[dict]:
    """Work-unit Parquet files + their records (what tasks.passages.run_unit leaves), about n passages."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage.layout import UNIT_SCHEMA
    from storage.records import UnitRecord

    out.mkdir(parents=True, exist_ok=True)
    articles = math.ceil(n / (WORDS // 100))
    records = []
    for unit, lo in enumerate(range(0, articles, UNIT_ARTICLES)):
        count = min(UNIT_ARTICLES, articles - lo)
        rows = _unit_rows(unit, count, changed)
        path = out / f"unit-{unit:06d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=UNIT_SCHEMA), path, compression="zstd")
        records.append(UnitRecord(unit={"ordinal": unit, "url": str(path)}, options="bench", ordinal=unit,
                                  path=str(path), seen=count, kept=count, passages=len(rows),
                                  words=count * WORDS, seconds=0.0).dump())
    return records


def _mixture() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(12345)
    centers = rng.normal(size=(1000, 64)).astype(np.float32) * 2.0
    proj = (rng.normal(size=(64, DIM)) / 8.0).astype(np.float32)
    return centers, proj


def shard_vectors(seed: int, rows: int, centers: np.ndarray, proj: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = centers[rng.integers(0, len(centers), size=rows)] + rng.normal(size=(rows, 64)).astype(np.float32)
    return low @ proj + 0.05 * rng.normal(size=(rows, DIM)).astype(np.float32)


def write_embeddings(store, vid: str) -> None:
    """One .npy + sidecar per passage shard and embeddings.json, the files and records embed writes."""
    import json

    from storage import layout
    from storage.fs import atomic_write, file_digest
    from storage.records import EmbeddingSidecar, EmbeddingsSummary, PassagesSummary, ShardEntry
    from tests.fixtures.versions import fingerprint_for

    fp = fingerprint_for(DIM)
    passages = PassagesSummary.read(store.fs, store.version_path(vid, layout.PASSAGES_SUMMARY_PATH))
    centers, proj = _mixture()
    shards = []
    for s, shard in enumerate(passages.shards):
        name = layout.embedding_shard(shard.name)
        path = store.version_path(vid, layout.EMBEDDINGS_DIR, name)
        with atomic_write(store.fs, path) as f:
            np.save(f, shard_vectors(s, shard.rows, centers, proj), allow_pickle=False)
        sha = file_digest(store.fs, path)
        sidecar = EmbeddingSidecar(passages_sha256=shard.sha256, fingerprint_key=fp.key, rows=shard.rows, dim=DIM,
                                   encoded=shard.rows, sha256=sha)
        with atomic_write(store.fs, store.version_path(vid, layout.EMBEDDINGS_DIR, layout.sidecar(name))) as f:
            f.write(json.dumps(sidecar.dump()).encode())
        shards.append(ShardEntry(name=name, rows=shard.rows, sha256=sha))
    summary = EmbeddingsSummary(fingerprint=fp, dim=DIM, rows=passages.passages, encoded=passages.passages,
                                shards=shards, timings={"embed_s": 0.0})
    with atomic_write(store.fs, store.version_path(vid, layout.EMBEDDINGS_SUMMARY_PATH)) as f:
        f.write(json.dumps(summary.dump()).encode())


# -- the steps, each run in a child process -----------------------------------------------------------


def _store(root: str):
    from storage.store import IndexStore

    return IndexStore(root)


def step_passages(root: str, vid: str, units: list[dict], shard_rows: int) -> dict:
    from storage import layout
    from storage.manifest import SourceDump
    from tasks.passages import assemble

    store = _store(root)
    summary = assemble(units, store.version_url(vid, layout.PASSAGES_DIR),
                       SourceDump(wiki="enwiki", dump_date="20260101", location="synthetic"), shard_rows=shard_rows)
    return {"rows": summary["passages"]}


def step_index(root: str, vid: str, index_url: str | None = None) -> dict:
    """auto, as build_version_files runs it (the store's trained/ kept and reused)."""
    from storage import layout
    from storage.location import Location
    from tasks.build_index import build_index

    store = _store(root)
    info = build_index(store.at(vid, layout.EMBEDDINGS_DIR),
                       Location(index_url) if index_url else store.at(vid, layout.INDEX_FILE), spec="auto",
                       progress=False, trained=store.location.child(layout.TRAINED_DIR))
    return {"info": info.model_dump(mode="json")}


def step_table(root: str, vid: str) -> dict:
    from storage import layout
    from tasks.passage_table import write_passage_table

    store = _store(root)
    return {"rows": write_passage_table(store.at(vid, layout.PASSAGES_DIR), store.at(vid, layout.PASSAGE_TABLE))}


def step_hash_table(root: str, vid: str) -> dict:
    from tasks.reuse_index import write_hash_index

    return {"rows": write_hash_index(_store(root).at(vid))}


def step_validate(root: str, vid: str, info: dict) -> dict:
    from storage.manifest import IndexInfo
    from tasks.assemble_version import finish_version
    from tasks.validate import ValidationFloors

    manifest = finish_version(_store(root), vid, IndexInfo.model_validate(info), ValidationFloors())
    v = manifest.validation
    return {"status": manifest.status, "reason": v.reason if v else None,
            "recall": (v.checks.get("recall_at_10") or {}).get("recall") if v else None}


def step_reuse(root: str, old: str, new: str) -> dict:
    import pyarrow.parquet as pq

    from storage import layout
    from storage.records import PassagesSummary
    from tasks.embed import _reuse_vectors
    from tests.fixtures.versions import fingerprint_for

    store = _store(root)
    key = fingerprint_for(DIM).key
    summary = PassagesSummary.read(store.fs, store.version_path(new, layout.PASSAGES_SUMMARY_PATH))
    found = rows = 0
    for shard in summary.shards:
        path = store.version_path(new, layout.PASSAGES_DIR, shard.name)
        hashes = pq.read_table(path, columns=["content_hash"]).column(0).combine_chunks()
        mask, vectors = _reuse_vectors(hashes, [store.at(old)], key, DIM)
        found += int(mask.sum())
        rows += len(mask)
        del vectors
    return {"found": found, "rows": rows}


def _rss_now() -> int:
    return _status("VmRSS")


def step_serve(root: str, first: str, second: str) -> dict:
    from rag_model.index import VersionIndex

    store = _store(root)
    centers, proj = _mixture()
    queries = shard_vectors(777, 201, centers, proj)
    out: dict[str, Any] = {"rss_before_open": _rss_now()}
    t = time.perf_counter()
    current = VersionIndex.open(store, first)
    out["open_s"] = time.perf_counter() - t
    t = time.perf_counter()
    current.search(queries[:1], 10)
    out["first_query_s"] = time.perf_counter() - t
    t = time.perf_counter()
    incoming = VersionIndex.open(store, second)
    incoming.warm_up()
    current = incoming  # the swap: rebinding the reference; the old version is dropped with it
    out["swap_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(1, 201):
        current.search(queries[i: i + 1], 10)
    out["query_ms"] = (time.perf_counter() - t) / 200 * 1000
    out["steady_rss"] = _rss_now()
    # File-backed (mapped index/table pages) vs anonymous (heap) share of it.
    out["steady_rss_file"], out["steady_rss_anon"] = _status("RssFile"), _status("RssAnon")
    return out


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _child(fn, args) -> tuple[float, int, dict]:
    # What every step's process imports anyway (torch, transformers, faiss) is loaded before the
    # clock starts: the steps' own work is measured, not Python's import time.
    import rag_model.index  # noqa: F401
    import tasks.assemble_version  # noqa: F401
    import tasks.embed  # noqa: F401
    import tasks.passages  # noqa: F401

    t = time.perf_counter()
    result = fn(*args)
    seconds = time.perf_counter() - t
    # VmHWM: this process's own high-water mark (ru_maxrss can carry the parent's across exec).
    return seconds, _status("VmHWM"), result


def run_step(fn, *args) -> tuple[float, int, dict]:
    """(seconds, peak RSS bytes, result) of fn(*args) in a fresh spawned process of its own."""
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_child, fn, args).result()


def link_copy(store, vid: str) -> str:
    """Another ready version with the same files (hard links), to swap to without building twice."""
    from storage import layout

    other = store.begin_version("enwiki", "20260102")
    src, dst = Path(store.version_path(vid)), Path(store.version_path(other))
    for path in src.rglob("*"):
        if path.is_file() and path.name not in (layout.MANIFEST, layout.STAGING_MARKER):
            (dst / path.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            os.link(path, dst / path.relative_to(src))
    store.commit_version(store.manifest(vid).model_copy(update={"version": other}))
    return other


# -- one size ---------------------------------------------------------------------------------------------


def measure(n: int, data_dir: Path, shard_rows: int, train_once: bool, log) -> dict:
    from storage import layout

    base = data_dir / f"n{n}"
    shutil.rmtree(base, ignore_errors=True)
    store = _store(str(base / "store"))
    t = time.perf_counter()
    units_v1 = write_units(base / "units-v1", n, changed=False)
    units_v2 = write_units(base / "units-v2", n, changed=True)
    gen_s = time.perf_counter() - t
    v1 = store.begin_version("enwiki", "20260101")
    res: dict[str, Any] = {"n": n, "steps": {}, "gen_s": gen_s}

    def record(name: str, out: tuple[float, int, dict]) -> dict:
        seconds, peak, result = out
        res["steps"][name] = {"s": seconds, "rss": peak}
        log(f"  {n:>9,} {name:<11} {seconds:9.1f} s  peak RSS {peak / MB:8.0f} MB  load {os.getloadavg()[0]:4.1f}  "
            f"{_brief(result)}")
        return result

    record("passages", run_step(step_passages, str(store.url), v1, units_v1, shard_rows))
    t = time.perf_counter()
    write_embeddings(store, v1)
    res["gen_s"] += time.perf_counter() - t
    info = record("index", run_step(step_index, store.url, v1))["info"]
    res["index"] = info
    if train_once:
        # The next version of the same encoder: its build starts from what this one trained.
        again = record("index_again", run_step(step_index, store.url, v1, (base / "again.faiss").as_uri()))["info"]
        res["index_again"] = again
    record("table", run_step(step_table, store.url, v1))
    record("hash_table", run_step(step_hash_table, store.url, v1))
    validation = record("validate", run_step(step_validate, store.url, v1, info))
    res["validation"] = validation
    res["disk"] = _disk(Path(store.version_path(v1)), layout)
    v2 = store.begin_version("enwiki", "20260102")
    run_step(step_passages, store.url, v2, units_v2, shard_rows)
    # Reuse is timed REUSE_RUNS times, each in a fresh process, and the fastest counts (as timeit does):
    # one run's time varies by ~10% here with what else the page cache and the 2 cores hold, and the
    # 3M-vs-1M check compares two single numbers.
    runs = [run_step(step_reuse, store.url, v1, v2) for _ in range(REUSE_RUNS)]
    reuse = record("reuse", min(runs, key=lambda r: r[0]))
    reuse["runs_s"] = [round(r[0], 1) for r in runs]
    log(f"  {n:>9,} reuse runs  {', '.join(f'{r[0]:.1f}' for r in runs)} s (the fastest counts)")
    res["reuse"] = reuse
    if validation["status"] == "ready":
        serve = record("serve", run_step(step_serve, store.url, v1, link_copy(store, v1)))
        res["serve"] = serve
    shutil.rmtree(base, ignore_errors=True)
    return res


def _brief(result: dict) -> str:
    if "info" in result:
        p = result["info"]["params"]
        return (f"{result['info']['factory']} train {p.get('train_s', 0):.1f}s add {p.get('add_s', 0):.1f}s "
                f"quantizer {'reused' if p.get('quantizer_reused') else 'trained'}")
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())


def _disk(version: Path, layout) -> dict[str, int]:
    parts = {"passages": 0, "embeddings": 0, "hash_table": 0, "index": 0, "table": 0}
    for p in version.rglob("*"):
        if not p.is_file():
            continue
        rel = p.relative_to(version).as_posix()
        size = p.stat().st_size
        if rel in (f"{layout.EMBEDDINGS_DIR}/{layout.HASH_KEYS}", f"{layout.EMBEDDINGS_DIR}/{layout.HASH_ROWS}"):
            parts["hash_table"] += size
        elif rel.startswith(layout.PASSAGES_DIR + "/"):
            parts["passages"] += size
        elif rel.startswith(layout.EMBEDDINGS_DIR + "/"):
            parts["embeddings"] += size
        elif rel == layout.INDEX_FILE:
            parts["index"] += size
        elif rel == layout.PASSAGE_TABLE:
            parts["table"] += size
    parts["total"] = sum(parts.values())
    return parts


# -- report -----------------------------------------------------------------------------------------------


def slope(a: float, b: float, na: int, nb: int) -> float:
    return math.log(max(b, 1e-6) / max(a, 1e-6)) / math.log(nb / na)


def report(results: list[dict], cores: int, big_cores: int) -> bool:
    sizes = [r["n"] for r in results]
    print("\n== time (s) and peak RSS (MB) per step, each in its own process ==")
    print(f"{'step':<11}" + "".join(f"{n:>22,}" for n in sizes))
    for step in STEPS:
        cells = [r["steps"].get(step) for r in results]
        print(f"{step:<11}" + "".join(f"{c['s']:>11.1f}{c['rss'] / MB:>11.0f}" if c else f"{'-':>22}" for c in cells))
    print(f"{'(generate)':<11}" + "".join(f"{r['gen_s']:>11.1f}{'':>11}" for r in results))

    print("\n== index: auto under the default 16 GiB budget (index_again: the next build of the same encoder) ==")
    for r, key in [(r, key) for r in results for key in ("index", "index_again") if key in r]:
        p = r[key]["params"]
        print(f"{r['n']:>10,}  {key:<11} {r[key]['factory']:<16} train {p.get('train_s', 0):7.1f} s  "
              f"({'reused' if p.get('quantizer_reused') else 'trained'})  "
              f"add {p.get('add_s', 0):7.1f} s  tune {p.get('tune_s', 0):6.1f} s  "
              f"ground truth {p.get('ground_truth_s', 0):6.1f} s  {r[key]['bytes'] / MB:8.0f} MB  "
              f"{p.get('bytes_per_vector', 0):.0f} B/vector  search {r[key]['search_params']}  "
              f"validation {r['validation']['status']} recall@10 {r['validation']['recall']}")

    print("\n== growth exponents (log-log slope of time between sizes) ==")
    pairs = list(zip(results, results[1:], strict=False))
    labels = [f"{a['n'] // 1000}k->{b['n'] // 1000}k" for a, b in pairs]
    print(f"{'step':<11}" + "".join(f"{label:>16}" for label in labels) + f"{'300k->max':>14}")
    exps: dict[str, float] = {}
    lo = next((r for r in results if r["n"] >= 300_000), results[0])
    hi = results[-1]
    for step in STEPS:
        row = []
        for a, b in pairs:
            if step in a["steps"] and step in b["steps"]:
                row.append(f"{slope(a['steps'][step]['s'], b['steps'][step]['s'], a['n'], b['n']):>16.2f}")
            else:
                row.append(f"{'-':>16}")
        if hi is not lo and step in lo["steps"] and step in hi["steps"]:
            exps[step] = slope(lo["steps"][step]["s"], hi["steps"][step]["s"], lo["n"], hi["n"])
        print(f"{step:<11}" + "".join(row) + (f"{exps[step]:>14.2f}" if step in exps else f"{'-':>14}"))

    print(f"\n== projection to {PAPER_PASSAGES:,} passages ==")
    print(f"from {hi['n']:,} with the exponent measured between {lo['n']:,} and {hi['n']:,} (1.0 where only one "
          f"size), time x (21M/n)^exponent; peak RSS x (21M/n)^(RSS exponent). 16-core/128 GB: the parallel "
          f"steps ({', '.join(sorted(PARALLEL))}) divided by {big_cores}/{cores} (perfect scaling, an upper bound "
          f"on the gain), the others unchanged. Each step's line above gives the load average it ran under.")
    factor = PAPER_PASSAGES / hi["n"]
    total_here = total_big = 0.0
    for step in STEPS:
        if step not in hi["steps"]:
            continue
        e = exps.get(step, 1.0)
        here = hi["steps"][step]["s"] * factor ** e
        big = here / (big_cores / cores) if step in PARALLEL else here
        e_rss = (slope(lo["steps"][step]["rss"], hi["steps"][step]["rss"], lo["n"], hi["n"])
                 if hi is not lo and step in lo["steps"] else 1.0)
        rss = hi["steps"][step]["rss"] * factor ** max(0.0, e_rss)
        total_here += here
        total_big += big
        print(f"  {step:<11} this machine {here / 60:8.1f} min   16-core {big / 60:8.1f} min   "
              f"peak RSS {rss / 2**30:6.1f} GB")
    print(f"  {'all':<11} this machine {total_here / 3600:8.1f} h     16-core {total_big / 3600:8.1f} h")

    print("\n== disk per version (bytes; x 21M/n linear) ==")
    for r in results:
        d = r["disk"]
        print(f"{r['n']:>10,}  " + "  ".join(f"{k} {v / MB:,.0f} MB" for k, v in d.items()))
    d = hi["disk"]
    print(f"{'21M':>10}  " + "  ".join(f"{k} {v * factor / 2**30:,.1f} GB" for k, v in d.items()))

    if "serve" in hi:
        s = hi["serve"]
        idx_bpv = hi["disk"]["index"] / hi["n"]
        table_bpr = hi["disk"]["table"] / hi["n"]
        print("\n== serving ==")
        for r in results:
            if "serve" in r:
                v = r["serve"]
                print(f"{r['n']:>10,}  open {v['open_s']:.2f} s  first query {v['first_query_s'] * 1000:.0f} ms  "
                      f"swap {v['swap_s']:.2f} s  query {v['query_ms']:.1f} ms  steady RSS "
                      f"{v['steady_rss'] / MB:.0f} MB = file {v.get('steady_rss_file', 0) / MB:.0f} + anon "
                      f"{v.get('steady_rss_anon', 0) / MB:.0f} MB  (index {r['disk']['index'] / MB:.0f} MB, "
                      f"table {r['disk']['table'] / MB:.0f} MB mapped)")
        print(f"  21M machine: index {idx_bpv * PAPER_PASSAGES / 2**30:.1f} GB ({hi['index']['factory'].split(',')[-1]}"
              f" at {idx_bpv:.0f} B/vector; auto under 16 GiB may pick SQ4..SQ8 = 392..776 B/vector = "
              f"{392 * PAPER_PASSAGES / 2**30:.1f}..{776 * PAPER_PASSAGES / 2**30:.1f} GB by recall), "
              f"passages.arrow {table_bpr * PAPER_PASSAGES / 2**30:.1f} GB, steady RSS at {hi['n']:,}: "
              f"{s['steady_rss'] / MB:.0f} MB (pages touched, file-backed). A 21M server wants RAM >= index + hot "
              f"part of the table to keep searches off disk: "
              f"{(idx_bpv + 0.1 * table_bpr) * PAPER_PASSAGES / 2**30 + 2:.0f} GB "
              f"(index + 10% of the table + 2 GB process).")

    print("\n== checks ==")
    ok = True
    for step, e in exps.items():
        good = e <= 1.15
        ok &= good
        print(f"{'PASS' if good else 'FAIL'}  {step} exponent {lo['n']:,}->{hi['n']:,} = {e:.2f} <= 1.15")
    if not exps:
        print("FAIL  exponents need at least two sizes from 300k up")
        ok = False
    peak = max(c["rss"] for c in hi["steps"].values())
    good = peak <= 8 * 2**30
    ok &= good
    print(f"{'PASS' if good else 'FAIL'}  peak RSS of any step at {hi['n']:,} = {peak / 2**30:.2f} GB <= 8 GB")
    by_n = {r["n"]: r for r in results}
    if 1_000_000 in by_n and 3_000_000 in by_n:
        a, b = by_n[1_000_000]["steps"]["reuse"]["s"], by_n[3_000_000]["steps"]["reuse"]["s"]
        good = b <= 3 * a
        ok &= good
        print(f"{'PASS' if good else 'FAIL'}  reuse at 3M {b:.1f} s <= 3 x at 1M ({a:.1f} s)")
    else:
        print("----  reuse 3M vs 1M: not measured (needs both sizes)")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100k,300k,1M,3M", help="corpus sizes in passages, e.g. 20k,60k or 1M,10M")
    ap.add_argument("--data-dir", default="/work/scale-data", help="where each size's store is written, then removed")
    ap.add_argument("--shard-rows", type=int, default=100_000)
    ap.add_argument("--big-cores", type=int, default=16)
    ap.add_argument("--train-once", action="store_true",
                    help="also time a second build of the same fingerprint (index_again: reuses the trained index)")
    args = ap.parse_args()
    sizes = sorted(parse_size(s) for s in args.sizes.split(",") if s.strip())
    if not sizes or sizes[0] < 1000:
        print("scale_bench: sizes must be at least 1k passages", file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, flush=True)

    cores = os.cpu_count() or 1
    log(f"scale_bench: sizes {', '.join(f'{n:,}' for n in sizes)}; {cores} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GB; load {os.getloadavg()}")
    results = []
    try:
        for n in sizes:
            t = time.perf_counter()
            results.append(measure(n, data_dir, args.shard_rows, args.train_once, log))
            load = tuple(round(x, 1) for x in os.getloadavg())
            log(f"  {n:>9,} done in {time.perf_counter() - t:.0f} s; load {load}")
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0 if report(results, cores, args.big_cores) else 1


if __name__ == "__main__":
    sys.exit(main())
