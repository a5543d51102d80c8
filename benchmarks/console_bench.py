"""Console benchmark: the overview page with 1,000 versions in the store, and serving's query latency
with the console on and off.

1. A local store with one real full version (the real build/validate code, random vectors) and 999
   delta-shaped versions on top of it in chains of ten (`tests.fixtures.versions.commit_delta`: real
   manifests with segments, lineage and own files, written through the store's API), every 50th
   promoted. Times `GET /ui` in-process over the whole app (the first render reads every manifest
   and draws nothing; later ones reuse the catalogue while the store's listing is unchanged) and the
   two charts' first and cached draws. Floor: overview p95 <= 300 ms.
2. A real version searched by the tiny DPR question encoder over loopback HTTP: /v1/retrieve p50/p95
   from an app without the console, with it idle, and with it while another client renders /ui in a
   loop.

    .venv/bin/python benchmarks/console_bench.py [--versions 1000] [--renders 50] [--queries 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from datetime import date, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from rag_model.server import create_app  # noqa: E402
from storage.store import IndexStore  # noqa: E402
from tests.fixtures.versions import commit_delta, fingerprint_for, make_version, random_passages  # noqa: E402

FLOOR_MS = 300.0


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def many_versions(root: Path, count: int) -> IndexStore:
    store = IndexStore(str(root / "store"))
    passages = random_passages(60, pages=20)
    vectors = np.random.default_rng(0).standard_normal((60, 16)).astype(np.float32)
    base = make_version(store, passages, vectors, fingerprint_for(16), promote=True)
    parent, day = base, date(2024, 1, 2)
    for i in range(1, count):
        parent = commit_delta(store, base if i % 10 == 0 else parent, [day.strftime("%Y%m%d")])
        day += timedelta(days=1)
        if i % 50 == 0:
            store.promote(parent, actor="console_bench", reason="every 50th")
    return store


def overview_figures(store: IndexStore, renders: int) -> float:
    client = TestClient(create_app(store))  # no lifespan: nothing is served, the console reads the store
    start = time.perf_counter()
    first = client.get("/ui")
    cold = (time.perf_counter() - start) * 1000
    assert first.status_code == 200 and f"{len(store.version_ids())} version(s)" in first.text
    samples = []
    for _ in range(renders):
        start = time.perf_counter()
        r = client.get("/ui")
        samples.append((time.perf_counter() - start) * 1000)
        assert r.status_code == 200
    p50, p95 = percentiles(samples)
    print(f"overview /ui, {len(store.version_ids())} versions: first render {cold:.0f} ms (reads every manifest); "
          f"then p50 {p50:.1f} ms, p95 {p95:.1f} ms over {renders} renders; p95 / {FLOOR_MS:.0f} ms floor = "
          f"{p95 / FLOOR_MS:.2f}")
    for name in ("bytes", "quality"):
        start = time.perf_counter()
        assert client.get(f"/ui/charts/{name}.svg").status_code == 200
        drawn = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        client.get(f"/ui/charts/{name}.svg")
        print(f"chart {name}.svg: drawn in {drawn:.0f} ms, cached {(time.perf_counter() - start) * 1000:.1f} ms")
    return p95


def latency_figures(root: Path, queries: int) -> None:
    from rag_model.encoders import EncoderSpec, fingerprint_of, load_question_encoder
    from tests.fixtures.models import build_tiny_dpr
    from tests.fixtures.rag import TOPICS_A, PairedQuestionEncoder, build_version
    from tests.test_server import ServerThread, ready_version, wait_for

    dpr = build_tiny_dpr(root / "dpr")
    encoder = PairedQuestionEncoder(load_question_encoder(str(dpr.question_dir), "dpr"),
                                    fingerprint_of(EncoderSpec(str(dpr.ctx_dir), "dpr")))
    store = IndexStore(str(root / "served"))
    version = build_version(store, encoder, TOPICS_A, 1000, 5000, promote=True).version
    questions = [f"{title} {text}" for title, text in TOPICS_A]
    for label, console, busy in (("console off", False, False), ("console on, idle", True, False),
                                 ("console on, /ui rendered in a loop", True, True)):
        with ServerThread(create_app(store, poll_seconds=5, console=console)) as server, \
                httpx.Client(base_url=server.url, timeout=30) as client:
            wait_for(lambda c=client: ready_version(c) == version, timeout=60)
            stop = threading.Event()

            def render(url: str = server.url, stop: threading.Event = stop) -> None:
                with httpx.Client(base_url=url, timeout=30) as other:
                    while not stop.is_set():
                        other.get("/ui")

            loop = threading.Thread(target=render, daemon=True)
            if busy:
                loop.start()
            for q in questions * 3:  # warm-up
                client.post("/v1/retrieve", json={"query": q, "k": 5})
            samples = []
            for i in range(queries):
                start = time.perf_counter()
                r = client.post("/v1/retrieve", json={"query": questions[i % len(questions)], "k": 5})
                samples.append((time.perf_counter() - start) * 1000)
                assert r.status_code == 200
            stop.set()
            if busy:
                loop.join(10)
            p50, p95 = percentiles(samples)
            print(f"/v1/retrieve, {label}: p50 {p50:.2f} ms, p95 {p95:.2f} ms over {queries} queries")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--versions", type=int, default=1000)
    parser.add_argument("--renders", type=int, default=50)
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="console-bench-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        store = many_versions(root, args.versions)
        print(f"store with {args.versions} versions written in {time.perf_counter() - start:.0f} s")
        p95 = overview_figures(store, args.renders)
        latency_figures(root, args.queries)
    if p95 > FLOOR_MS:
        sys.exit(f"overview p95 {p95:.0f} ms is above the {FLOOR_MS:.0f} ms floor")


if __name__ == "__main__":
    main()
