"""Whole refresh-index flow on the gensim enwiki excerpt, then the nightly case.

Prints the wall time of a full build and each step's share, then rebuilds after editing 2% of the
articles and prints that run's wall time as a fraction of the full build (floor: <= 0.25) and how
many passages it encoded. Runs the real flow against a real temporary Prefect server.

    .venv/bin/python benchmarks/refresh_bench.py [--edit-fraction 0.02] [--encoder PATH --encoder-kind mean]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from flows.demo import edited_copy, gensim_excerpt, minilm_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dump", type=Path, default=None, help="dump file (default: the gensim excerpt)")
    ap.add_argument("--encoder", default=None, help="document encoder (default: packaged all-MiniLM-L6-v2)")
    ap.add_argument("--encoder-kind", default="mean")
    ap.add_argument("--edit-fraction", type=float, default=0.02)
    ap.add_argument("--index-spec", default="auto")
    args = ap.parse_args()

    from flows.prefect_server import temporary_prefect_server
    from flows.refresh import refresh_index

    dump = args.dump or gensim_excerpt()
    encoder = args.encoder or str(minilm_dir())
    work = Path(tempfile.mkdtemp(prefix="refresh-bench-"))
    store_url = str(work / "store")
    common = dict(store_url=store_url, encoder=encoder, encoder_kind=args.encoder_kind,
                  normalize=args.encoder_kind == "mean", index_spec=args.index_spec, shard_rows=1000)
    print(f"dump {dump} ({dump.stat().st_size / 1e6:.1f} MB), encoder {encoder}, cpus {os.cpu_count()}")
    with temporary_prefect_server(work / "prefect"):
        t0 = time.monotonic()
        full = refresh_index(source=str(dump), **common)
        full_s = time.monotonic() - t0
        print(f"\nfull build: {full_s:.1f}s wall, {full['counts'].get('passages', 0)} passages, "
              f"encoded {full['counts'].get('encoded', 0)}")
        steps = {k: v for k, v in full["timings"].items() if k != "total_s"}
        for name, secs in steps.items():
            print(f"  {name:<10} {secs:8.2f}s  {100 * secs / full_s:5.1f}%")

        titles = _article_titles(dump)
        n_edit = max(1, round(args.edit_fraction * len(titles)))
        step_ = max(1, len(titles) // n_edit)
        chosen = titles[::step_][:n_edit]
        edited = edited_copy(dump, work / "edited", chosen,
                             sentence="This sentence was added by the nightly benchmark edit. ")
        t0 = time.monotonic()
        nightly = refresh_index(source=str(edited), **common)
        nightly_s = time.monotonic() - t0
    c = nightly["counts"]
    ratio = nightly_s / full_s
    print(f"\nnightly after editing {n_edit}/{len(titles)} articles ({100 * n_edit / len(titles):.1f}%): "
          f"{nightly_s:.1f}s wall, encoded {c.get('encoded', 0)} of {c.get('passages', 0)} passages, "
          f"reused {c.get('reused', 0)}")
    print(f"ratio nightly/full wall time = {ratio:.3f}  (floor <= 0.25: {'PASS' if ratio <= 0.25 else 'FAIL'})")


def _article_titles(dump: Path) -> list[str]:
    """Titles of main-namespace, non-redirect pages, the ones the pipeline keeps."""
    import bz2

    xml = bz2.decompress(dump.read_bytes()).decode("utf-8")
    titles = []
    for page in re.finditer(r"<page>(.*?)</page>", xml, re.S):
        body = page.group(1)
        if "<ns>0</ns>" in body and "<redirect" not in body:
            titles.append(re.search(r"<title>(.*?)</title>", body).group(1))
    return titles


if __name__ == "__main__":
    main()
