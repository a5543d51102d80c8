"""One query, one thread: single-query search through `vector_search.search` (one OpenMP thread) against
faiss's default thread count, on a quiet machine and beside one busy process.

faiss parallelises a search over its queries. With a single query, the rest of an OpenMP team has nothing
to do but meet the first thread at the region's barrier, and a teammate whose core is taken by another process
is waited for. `vector_search._threads_for` therefore runs single queries on one thread. This prints
single-query latency (p50 / p99, ms) both ways and the ratio default/one-thread, quiet and then with
`--busy` CPU burners (`python -c 'while True: pass'`), which the bench starts and stops itself.

    .venv/bin/python benchmarks/threads_bench.py                    # 20k and 100k flat rows, 1 burner
    .venv/bin/python benchmarks/threads_bench.py --rows 1000000 --queries 300
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rag_model import vector_search  # noqa: E402
from storage.manifest import IndexInfo  # noqa: E402


def timings(index: faiss.Index, info: IndexInfo, queries: np.ndarray, one_thread: bool) -> np.ndarray:
    """Milliseconds per single-query search: through `vector_search.search`, or straight to faiss."""
    out = np.empty(len(queries))
    for i, q in enumerate(queries):
        started = time.perf_counter()
        if one_thread:
            vector_search.search(index, info, q, 10)
        else:
            index.search(q[None, :], 10)
        out[i] = (time.perf_counter() - started) * 1e3
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[20_000, 100_000])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--busy", type=int, default=1, help="CPU burners beside the busy run")
    args = ap.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    print(f"cpu: {cpu}; faiss default threads {faiss.omp_get_max_threads()}; dim {args.dim}; "
          f"{args.queries} single queries, k=10")
    rng = np.random.default_rng(0)
    worst = 0.0
    for rows in args.rows:
        index = faiss.IndexFlatIP(args.dim)
        index.add(rng.standard_normal((rows, args.dim), dtype=np.float32))
        info = IndexInfo(spec="flat", factory="Flat", dim=args.dim)
        queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
        for busy in (0, args.busy):
            burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
            try:
                time.sleep(0.5 if busy else 0)
                default = timings(index, info, queries, one_thread=False)
                one = timings(index, info, queries, one_thread=True)
            finally:
                for p in burners:
                    p.kill()
                    p.wait()
            ratio = np.percentile(default, 99) / np.percentile(one, 99)
            worst = max(worst, 1 / ratio)
            print(f"{rows:>9,} rows, {busy} busy: default threads p50 {np.median(default):7.2f} p99 "
                  f"{np.percentile(default, 99):7.2f} | one thread p50 {np.median(one):7.2f} p99 "
                  f"{np.percentile(one, 99):7.2f} | p99 default/one {ratio:5.2f}x")
    ok = worst <= 1.1
    print(f"[{'PASS' if ok else 'FAIL'}] one thread's p99 is never above 1.1x the default's: worst one/default "
          f"{worst:.2f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
