"""Dump -> clean passages throughput: ragindex vs wikiextractor, 1 and 2 workers, in one run.

    .venv/bin/python benchmarks/parse_bench.py [DUMP] [--repeat N] [--workers 1 2]

DUMP defaults to the enwiki excerpt shipped with gensim (206 pages, 5.8 MB of wikitext). That is
too small to measure, so the pages are repeated `--repeat` times (default 8, about 46 MB of
wikitext) with fresh page ids into a multistream `.bz2` with its `-index.txt.bz2`, like the real
dumps: both tools read that same file. For each worker count it prints wikitext MB/s (all page
text in the dump / wall time, process start included), articles/s, peak RSS of the whole process
tree (sampled, summed over children), and markup left in the output per MB of text, then the
ratio ours / wikiextractor. Floors (issue 2, 2 workers): >= 3 MB/s, ratio >= 1.0, RSS < 1 GiB.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MARKUP = re.compile(r"\[\[|\]\]|\{\{|\}\}|<ref|</ref|\{\||\|\}|'''|&[a-z]+;|<!--|__[A-Z]+__")
PAGES_PER_STREAM = 100  # as in Wikimedia's multistream dumps
GIB = 2**30


def default_dump() -> Path:
    from flows.demo import gensim_excerpt

    return gensim_excerpt()


def _header(dump: Path) -> str:
    with bz2.open(dump) if dump.suffix == ".bz2" else open(dump, "rb") as f:
        head = f.read(1 << 16).decode("utf-8", "replace")
    end = head.find("</siteinfo>")
    if end < 0:
        raise SystemExit(f"{dump}: no <siteinfo> in its first 64 KiB")
    return head[: end + len("</siteinfo>")] + "\n"


def _page_xml(page, page_id: int) -> str:
    redirect = f"    <redirect title={quoteattr(page.title)} />\n" if page.redirect else ""
    return (f"  <page>\n    <title>{escape(page.title)}</title>\n    <ns>{page.ns}</ns>\n    <id>{page_id}</id>\n"
            f"{redirect}    <revision>\n      <id>{page.rev_id}</id>\n      <model>{page.model}</model>\n"
            f"      <format>text/x-wiki</format>\n"
            f'      <text xml:space="preserve">{escape(page.text)}</text>\n    </revision>\n  </page>\n')


def build_input(dump: Path, repeat: int, directory: Path) -> tuple[Path, dict]:
    """The bench dump: `dump`'s pages `repeat` times (new ids), multistream + index. Returns (file, stats)."""
    from storage.location import Location
    from tasks.parse import iter_pages

    pages = list(iter_pages(Location(dump)))
    top = max(p.page_id for p in pages) + 1
    name = f"enwiki-20000101-pages-articles-multistream1.xml-p1p{top * repeat}.bz2"
    data = directory / name
    index_lines = []
    stats = {"pages": 0, "articles": 0, "wikitext_bytes": 0}
    with open(data, "wb") as out:
        out.write(bz2.compress(_header(dump).encode()))
        batch, batch_ids = [], []
        for k in range(repeat):
            for page in pages:
                page_id = page.page_id + k * top
                batch.append(_page_xml(page, page_id))
                batch_ids.append((page_id, page.title))
                stats["pages"] += 1
                stats["articles"] += page.ns == 0 and not page.redirect
                stats["wikitext_bytes"] += len(page.text.encode())
                if len(batch) == PAGES_PER_STREAM:
                    offset = out.tell()
                    out.write(bz2.compress("".join(batch).encode()))
                    index_lines += [f"{offset}:{i}:{t}" for i, t in batch_ids]
                    batch, batch_ids = [], []
        if batch:
            offset = out.tell()
            out.write(bz2.compress("".join(batch).encode()))
            index_lines += [f"{offset}:{i}:{t}" for i, t in batch_ids]
        out.write(bz2.compress(b"</mediawiki>\n"))
    index = directory / name.replace("-multistream1", "-multistream-index1").replace(".xml", ".txt")
    index.write_bytes(bz2.compress(("\n".join(index_lines) + "\n").encode()))
    return data, stats


def measure(cmd: list[str]) -> tuple[float, int, subprocess.CompletedProcess]:
    """(wall seconds, peak RSS of the process tree summed over its live processes, result)."""
    started = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        total = 0
        with contextlib.suppress(psutil.Error):
            for p in [proc, *proc.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a child may exit between listing and reading
                    total += p.memory_info().rss
        peak = max(peak, total)
        time.sleep(0.05)
    wall = time.perf_counter() - started
    out, err = proc.communicate()
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return wall, peak, result


def markup_per_mb(texts) -> tuple[float, int]:
    chars = hits = 0
    for text in texts:
        chars += len(text)
        hits += len(MARKUP.findall(text))
    return hits / max(chars / 1e6, 1e-9), chars


def run_ours(data: Path, index: Path, workers: int, work: Path) -> dict:
    out = work / f"ours-{workers}"
    wall, peak, result = measure([sys.executable, __file__, "--child", str(data), str(index), str(out),
                                  str(workers)])
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    import pyarrow.parquet as pq

    texts = (t for s in summary["shards"] for t in pq.read_table(out / s["name"], columns=["text"])["text"]
             .to_pylist())
    residue, chars = markup_per_mb(texts)
    return {"wall": wall, "rss": peak, "articles": summary["articles"]["kept"], "residue": residue,
            "out_mb": chars / 1e6}


def run_wikiextractor(data: Path, workers: int, work: Path) -> dict | None:
    if importlib.util.find_spec("wikiextractor") is None:
        return None
    out = work / f"wikiextractor-{workers}"
    wall, peak, _ = measure([sys.executable, "-m", "wikiextractor.WikiExtractor", "--processes", str(workers),
                             "-q", "-o", str(out), str(data)])
    docs = 0
    texts = []
    for path in sorted(out.rglob("wiki_*")):
        body = path.read_text(encoding="utf-8", errors="replace")
        docs += body.count("<doc ")
        texts.append(re.sub(r"</?doc[^>]*>", "", body))
    residue, chars = markup_per_mb(texts)
    return {"wall": wall, "rss": peak, "articles": docs, "residue": residue, "out_mb": chars / 1e6}


def child(data: str, index: str, out: str, workers: int) -> None:
    from storage.location import Location
    from storage.manifest import SourceDump
    from tasks.passages import write_passages

    summary = write_passages([Location(data), Location(index)], Location(out),
                             SourceDump(wiki="enwiki", dump_date="20000101"), workers=workers, progress=False)
    print(json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dump", nargs="?", type=Path, help="a dump file (.xml or .bz2); default: gensim excerpt")
    parser.add_argument("--repeat", type=int, default=8, help="repeat the dump's pages N times (default 8)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--child", nargs=4, metavar=("DATA", "INDEX", "OUT", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        data, index, out, workers = args.child
        child(data, index, out, int(workers))
        return

    dump = args.dump or default_dump()
    with tempfile.TemporaryDirectory(prefix="parse-bench-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        data, stats = build_input(dump, args.repeat, work)
        index = next(work.glob("*-index*.bz2"))
        mb = stats["wikitext_bytes"] / 1e6
        print(f"input: {dump.name} x{args.repeat} -> {data.name}: {stats['pages']} pages, "
              f"{stats['articles']} ns-0 non-redirect pages, {mb:.1f} MB wikitext, "
              f"{data.stat().st_size / 1e6:.1f} MB bz2 (built in {time.perf_counter() - t:.1f}s); "
              f"{os.cpu_count()} cores")
        print(f"{'tool':<16}{'workers':>8}{'wall s':>9}{'MB/s':>8}{'art/s':>9}{'articles':>10}"
              f"{'peak RSS MiB':>14}{'markup/MB':>11}")
        rows = {}
        for n in args.workers:
            for tool, fn in (("ragindex", lambda n=n: run_ours(data, index, n, work)),
                             ("wikiextractor", lambda n=n: run_wikiextractor(data, n, work))):
                r = fn()
                if r is None:
                    print(f"{tool:<16}{n:>8}  (not installed)")
                    continue
                r["mbps"] = mb / r["wall"]
                rows[tool, n] = r
                print(f"{tool:<16}{n:>8}{r['wall']:>9.2f}{r['mbps']:>8.2f}{r['articles'] / r['wall']:>9.1f}"
                      f"{r['articles']:>10}{r['rss'] / 2**20:>14.0f}{r['residue']:>11.1f}")
        for n in args.workers:
            if ("wikiextractor", n) in rows:
                ratio = rows["ragindex", n]["mbps"] / rows["wikiextractor", n]["mbps"]
                print(f"ratio ragindex / wikiextractor, {n} worker(s): {ratio:.2f}x")
        if ("ragindex", 2) in rows:
            ours = rows["ragindex", 2]
            checks = [("wikitext MB/s >= 3 (2 workers)", ours["mbps"] >= 3.0),
                      ("peak RSS < 1 GiB (2 workers)", ours["rss"] < GIB)]
            if ("wikiextractor", 2) in rows:
                theirs = rows["wikiextractor", 2]
                checks.append(("ratio >= 1.0 vs wikiextractor (2 workers)", ours["mbps"] >= theirs["mbps"]))
                checks.append(("less markup left than wikiextractor", ours["residue"] <= theirs["residue"]))
            for label, ok in checks:
                print(f"{'PASS' if ok else 'FAIL'}  {label}")


if __name__ == "__main__":
    main()
