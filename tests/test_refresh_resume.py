"""A refresh killed at any moment resumes: SIGKILL a real refresh process at each step, run it again,
and the store ends up holding the version an uninterrupted run builds, promoted, with nothing left over.

The refresh runs in a child python process against the session's Prefect server (forked by a launcher
that did the imports once); the parent watches the store for the first sign of each step (a file
appearing or going) and SIGKILLs the child's process group the moment it sees it. The re-run
happens in this process. Versions are compared by what they hold: the sha256 of every data file and
the summaries without their timings and run counters (what a run did, not what the version is).

The killed child leaves the store's build lock behind; the re-run takes it because the store breaks
a lock whose holder is a dead process on this host (the child is reaped before the re-run starts).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from flows.refresh import refresh_index
from storage import layout
from storage.store import IndexStore
from tasks.promote import promote_unfinished
from tests.fixtures.mirror import serve_mirror

WIKI, DATE = "enwiki", "20240101"
REPO = Path(__file__).resolve().parent.parent
SUMMARIES = (layout.PASSAGES_SUMMARY_PATH, layout.EMBEDDINGS_SUMMARY_PATH)
RUN_COUNTERS = ("timings", "encoded", "reused", "skipped_shards")  # what a run did, not what it built


def _pages():
    from tests.fixtures.mirror import sample_pages

    return sample_pages(10)


def _versions(root: Path, pattern: str) -> list[Path]:
    return list(root.glob(f"versions/*/{pattern}"))


def _work_gone_before_manifest(root: Path) -> bool:
    return bool(_versions(root, layout.INDEX_FILE)) and not _versions(root, layout.WORK_DIR) \
        and not _versions(root, layout.MANIFEST)


# The first sign of each step, as the parent can see it in the store.
KILL_POINTS: dict[str, Callable[[Path], bool]] = {
    # a dump file half-way through its transfer (the mirror holds it there)
    "download": lambda root: bool(list(root.glob("downloads/*/*/.*.part"))),
    "parse": lambda root: bool(_versions(root, f"{layout.WORK_DIR}/unit-*.json")),
    "embed": lambda root: bool(_versions(root, f"{layout.EMBEDDINGS_DIR}/part-*.npy")),
    "build": lambda root: bool(_versions(root, layout.INDEX_FILE) or _versions(root, layout.PASSAGE_TABLE)),
    # the unit outputs are removed, the manifest is not written yet: validation is running
    "validate": _work_gone_before_manifest,
    "promote": lambda root: bool(_versions(root, layout.MANIFEST)) and not (root / "CURRENT").exists(),
}


def _params(store: Path, mirror_url: str, tiny_dpr) -> dict:
    return dict(wiki=WIKI, dump_date="latest", mirror=mirror_url, store_url=str(store),
                encoder=str(tiny_dpr.ctx_dir), encoder_kind="dpr", index_spec="flat", shard_rows=6,
                # fp32, not auto: auto measures speed per process, and a byte comparison needs one precision.
                precision="fp32",
                allow_count_change=True)


def _content(store: IndexStore, version: str) -> dict:
    """What a version holds, without what legitimately differs between runs."""
    m = store.manifest(version)
    summaries = {}
    for rel in SUMMARIES:
        data = json.loads(Path(store.version_path(version, rel)).read_text())
        summaries[rel] = {k: v for k, v in data.items() if k not in RUN_COUNTERS}
    return {"files": {rel: sha for rel, sha in m.files.items() if rel not in SUMMARIES}, **summaries,
            "passages": m.counts["passages"], "status": m.status}


def _leftovers(root: Path) -> list[str]:
    """Anything a finished refresh should not leave behind: temp and part files, staging areas, the lock."""
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if rel.parts[0] == "prefect-results":
            continue
        if path.name.endswith((".tmp", ".part")) or path.name in (layout.STAGING_MARKER, layout.WORK_DIR):
            found.append(str(rel))
    if (root / "locks" / "build.json").exists():
        found.append("locks/build.json")
    return found


class Launcher:
    """A python process that imports the refresh flow once, then forks one refresh process per run.

    Each forked run is a real, separate process in its own session (so a kill of its group also
    reaches the page cleaner it starts) that imported nothing after the fork: every kill point pays
    the imports once instead of once each. The launcher reaps each run and reports how it ended.
    Protocol: a JSON line {"params", "log"} in; the run's pid, then its wait status, out.
    """

    SCRIPT = """
import json, os, sys, traceback
from flows.refresh import refresh_index
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        code = 0
        try:
            refresh_index(**job["params"])
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
"""

    def __init__(self, logs: Path) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "PREFECT_HOME": str(logs / "prefect-home")}
        assert env.get("PREFECT_API_URL"), "the prefect_api fixture exports the server's URL for children"
        self._err = open(logs / "launcher.err", "wb")  # noqa: SIM115 (closed in close())
        # Unbuffered: select() on the pipe must see every line the launcher wrote.
        self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, bufsize=0)

    def _line(self) -> int:
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the launcher died ({self.proc.wait()})")
        return int(line)

    def run_until(self, point: str, params: dict, root: Path, log: Path, timeout: float = 240.0) -> None:
        """Start a refresh and SIGKILL it the moment `point`'s sign appears in the store at `root`."""
        self.proc.stdin.write((json.dumps({"params": params, "log": str(log)}) + "\n").encode())
        pid = self._line()
        seen, deadline = KILL_POINTS[point], time.monotonic() + timeout
        while not seen(root):
            if select.select([self.proc.stdout], [], [], 0)[0]:  # it ended on its own
                raise AssertionError(f"the refresh ended (wait status {self._line()}) before reaching "
                                     f"'{point}':\n" + log.read_text(errors="replace")[-3000:])
            if time.monotonic() > deadline:
                os.killpg(pid, signal.SIGKILL)
                self._line()
                raise AssertionError(f"the refresh did not reach '{point}' within {timeout:.0f}s")
            time.sleep(0.003)
        os.killpg(pid, signal.SIGKILL)
        status = self._line()  # reaped: its pid is dead now, so the build lock it left is breakable
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._err.close()


@pytest.fixture(scope="module")
def launcher(tmp_path_factory, prefect_api):
    started = Launcher(tmp_path_factory.mktemp("launcher"))
    try:
        yield started
    finally:
        started.close()


@pytest.fixture(scope="module")
def dump(tmp_path_factory, tiny_dpr, prefect_api, launcher):
    """A mirror with one small dump, and the content of the version an uninterrupted refresh makes of it.
    (The launcher, started first, does its imports meanwhile.)"""
    mirror, server = serve_mirror(tmp_path_factory.mktemp("mirror"))
    try:
        mirror.add_run(WIKI, DATE, _pages(), parts=2)
        store_dir = tmp_path_factory.mktemp("reference") / "store"
        outcome = refresh_index(**_params(store_dir, mirror.url, tiny_dpr))
        assert outcome["status"] == "promoted"
        yield mirror, _content(IndexStore(str(store_dir)), outcome["version"])
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_refresh_killed_at_any_step_resumes_to_the_same_version(point, dump, launcher, tiny_dpr, tmp_path,
                                                                  caplog):
    mirror, reference = dump
    root = tmp_path / "store"
    params = _params(root, mirror.url, tiny_dpr)
    if point == "download":
        mirror.hold_next(f"{WIKI}-{DATE}-pages-articles-multistream1.xml-p10p14.bz2", after_bytes=100)
    try:
        launcher.run_until(point, params, root, tmp_path / "killed-run.log")
    finally:
        mirror.release()
    store = IndexStore(str(root))
    assert store.current() is None  # killed before anything was promoted
    committed = store.list_versions()
    assert bool(committed) == (point == "promote")  # killed where it was meant to be
    # A kill inside commit_version can leave the marker beside a written manifest: that version is committed,
    # nothing writes into it any more, so it is not a staging area.
    staged = [p for p in (root / "versions").glob("*")
              if (p / layout.STAGING_MARKER).exists() and not (p / layout.MANIFEST).exists()]
    if staged:
        # What a writer killed inside an atomic write leaves (this kill may or may not have landed in one).
        (staged[0] / layout.EMBEDDINGS_DIR).mkdir(exist_ok=True)
        (staged[0] / layout.EMBEDDINGS_DIR / f".part-00000.npy.{'0' * 32}.tmp").write_bytes(b"\x93NUMPY half")

    outcome = refresh_index(**params)

    assert outcome["status"] == "promoted", outcome
    version = outcome["version"]
    assert store.current().version == version and store.current().generation == 1
    assert [m.version for m in store.list_versions()] == [version]
    if committed:
        assert committed[0].version == version  # the committed version is the one promoted, not a rebuild
    if point in ("build", "validate"):
        # every shard was embedded before the kill: the re-run trusts those results and encodes nothing
        assert outcome["counts"]["shards_resumed"] == outcome["counts"]["shards"]
        assert outcome["counts"]["encoded_this_run"] == 0
    assert _content(store, version) == reference
    assert set(store.manifest(version).files) == set(store.version_files(version))
    assert [p.name for p in (root / "versions").iterdir()] == [version]
    assert _leftovers(root) == []
    if point == "validate":  # the case that used to fail every later refresh of the dump
        # the cached unit records named the removed work directory: recomputed, not trusted
        assert "names files that are gone or changed; computing it again" in caplog.text
        again = refresh_index(**params)
        assert again["status"] == "up-to-date" and again["version"] == version


def test_only_a_version_never_promoted_is_owed_its_promote(tmp_path):
    from tests.fixtures.versions import clustered_vectors, fingerprint_for, make_version, random_passages

    store = IndexStore(str(tmp_path / "store"))
    fp = fingerprint_for(8)

    def version(seed: int, promote: bool) -> str:
        return make_version(store, random_passages(30, seed=seed), clustered_vectors(30, 8, seed=seed), fp,
                            promote=promote)

    first, second = version(0, promote=True), version(1, promote=True)
    committed = version(2, promote=False)  # as a run killed between commit and promote leaves it
    store.rollback(first)  # the operator goes back
    current, history = store.current(), store.history()
    assert current.version == first
    assert not promote_unfinished(current, history, first)  # CURRENT: up to date
    assert not promote_unfinished(current, history, second)  # rolled back from: left alone
    assert promote_unfinished(current, history, committed)  # never promoted: finish it
    assert promote_unfinished(None, history, second)  # no CURRENT at all: nothing to respect
