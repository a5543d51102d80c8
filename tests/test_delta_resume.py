"""A delta refresh killed part way resumes like a full build: SIGKILL a real `ragindex refresh --incremental`
process (its own session, its own temp directory) while it writes passages, again while it embeds, then run
it once more: the same version id throughout, the shards the killed runs embedded are kept (fewer passages
encoded), the version holds what an uninterrupted delta of the same days holds, and nothing is left in the
temp directory or the store.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from flows.refresh import refresh_index
from storage import layout
from storage.store import IndexStore
from tests.fixtures.history import HistPage, history_xml
from tests.fixtures.incr_mirror import make_incr_day
from tests.fixtures.mirror import sample_pages
from tests.test_refresh_resume import _content, _leftovers

WIKI = "enwiki"
RUN_COUNTERS = ("encoded", "reused", "embed_s")  # what a run did, not what the version is


def _staging(root: Path) -> list[Path]:
    return [p for p in (root / "versions").glob("*")
            if (p / layout.STAGING_MARKER).exists() and not (p / layout.MANIFEST).exists()]


def _writing_passages(root: Path) -> bool:
    return any(list((p / layout.PASSAGES_DIR).glob("part-*.parquet")) for p in _staging(root))


def _embedded_a_shard(root: Path) -> bool:
    return any(list((p / layout.EMBEDDINGS_DIR).glob("part-*.json")) for p in _staging(root))


def _day_pages(rev: int) -> list[HistPage]:
    """New articles of fresh words (every passage needs the encoder), and one edit of a base page."""
    fresh = [HistPage(900 + i, f"New article {i}", [(rev + i, " ".join(f"n{i}y{j}" for j in range(260)))])
             for i in range(10)]
    edited = sample_pages(1)[0]
    return [*fresh, HistPage(edited.page_id, edited.title, [(rev + 50, edited.text + " and one more sentence")])]


def _kill_when(seen: Callable[[Path], bool], args: list[str], env: dict, root: Path, log: Path,
               timeout: float = 240.0) -> None:
    """Run `ragindex refresh ...` in its own session and SIGKILL its group the moment `seen(root)`."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not seen(root):
            assert proc.poll() is None, f"the refresh ended ({proc.returncode}) first:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the refresh did not get there in time"
            time.sleep(0.003)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()  # reaped: the build lock it leaves names a dead process, which the re-run breaks
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]


@pytest.mark.slow
def test_a_killed_delta_resumes_the_same_version(mirror, tiny_dpr, prefect_api, tmp_path, monkeypatch):
    base_pages = sample_pages(6)
    mirror.add_run(WIKI, "20240101", base_pages)
    common = dict(wiki=WIKI, mirror=mirror.url, encoder=str(tiny_dpr.ctx_dir), encoder_kind="dpr",
                  index_spec="flat", shard_rows=4, precision="fp32", allow_count_change=True)
    root = tmp_path / "store"
    base = refresh_index(store_url=str(root), **common)
    assert base["status"] == "promoted"
    make_incr_day(mirror.root, WIKI, "20240102", history_xml(WIKI, _day_pages(max(p.revision for p in base_pages) + 1)),
                  maxrevid=max(p.revision for p in base_pages) + 60)
    reference_root = tmp_path / "reference"
    shutil.copytree(root, reference_root)
    uninterrupted = refresh_index(store_url=str(reference_root), mode="incremental", **common)
    assert uninterrupted["status"] == "promoted" and uninterrupted["mode"] == "delta"

    scratch = tmp_path / "tmp"  # the killed runs' system temp directory
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    args = [str(Path(sys.executable).parent / "ragindex"), "refresh", "--incremental", "--store", str(root),
            "--wiki", WIKI, "--mirror", mirror.url, "--encoder", str(tiny_dpr.ctx_dir), "--encoder-kind", "dpr",
            "--index-spec", "flat", "--shard-rows", "4", "--precision", "fp32", "--allow-count-change"]
    _kill_when(_writing_passages, args, env, root, tmp_path / "killed-passages.log")
    assert [p.name for p in scratch.glob("ragindex-delta-*")] == []  # its scratch stayed in its staging area
    [first] = _staging(root)
    _kill_when(_embedded_a_shard, args, env, root, tmp_path / "killed-embed.log")
    assert [p.name for p in _staging(root)] == [first.name]  # resumed, not begun again under a new id
    kept = len(list((first / layout.EMBEDDINGS_DIR).glob("part-*.json")))
    assert kept >= 1

    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    outcome = refresh_index(store_url=str(root), mode="incremental", **common)

    assert outcome["status"] == "promoted" and outcome["mode"] == "delta", outcome
    assert outcome["version"] == first.name
    assert 0 < outcome["counts"]["encoded_this_run"] < uninterrupted["counts"]["encoded_this_run"]
    store, reference = IndexStore(str(root)), IndexStore(str(reference_root))
    assert _content(store, outcome["version"]) == _content(reference, uninterrupted["version"])
    mine, theirs = store.manifest(outcome["version"]), reference.manifest(uninterrupted["version"])
    assert {k: v for k, v in mine.counts.items() if k not in RUN_COUNTERS} == \
        {k: v for k, v in theirs.counts.items() if k not in RUN_COUNTERS}
    assert (mine.lineage, mine.segments, mine.changes) == (theirs.lineage, theirs.segments, theirs.changes)
    assert set(mine.files) == set(store.version_files(mine.version))
    assert _leftovers(root) == []
    assert [p.name for p in scratch.iterdir() if p.name.startswith("ragindex-")] == []
