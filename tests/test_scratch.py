"""Local scratch is private (0700, in a directory of this user's alone) and a killed run's scratch is
removed by the next run: the parse units of an S3 build, and the temp files of uploads to S3."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import textwrap

import pytest

from storage import scratch
from storage.errors import RagindexError
from storage.fs import atomic_write, resolve, staged_local_file
from tests.fixtures.mirror import make_dump, sample_pages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KILLED_PARSE = textwrap.dedent("""
    import os, signal, sys
    import tasks.passages as passages
    from storage.location import Location
    from storage.manifest import SourceDump

    def killed(units, work, *args, **kwargs):  # the run dies (SIGKILL) with its unit scratch half written
        with open(os.path.join(work.path, "unit-00000.parquet"), "wb") as f:
            f.write(b"half a unit")
        print(work.path, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    if sys.argv[4] == "kill":
        passages.run_units = killed
    passages.write_passages([Location(p) for p in sys.argv[1].split(",")], Location(sys.argv[2], sys.argv[3]),
                            SourceDump(wiki="enwiki", dump_date="20240101"), workers=1, progress=False)
""")


def _mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _parse_run(dump: str, out: str, endpoint: str, how: str, tmpdir: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLED_PARSE, dump, out, endpoint, how], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT, "TMPDIR": tmpdir})


def test_a_killed_s3_parse_leaves_private_scratch_that_the_next_run_removes(tmp_path, s3_bucket, moto_server):
    run = make_dump(tmp_path / "m", "enwiki", "20240101", sample_pages(6, words=60))
    dump = ",".join(str(p) for p in sorted(run.glob("*.bz2")))
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    out = f"s3://{s3_bucket}/passages"

    killed = _parse_run(dump, out, moto_server, "kill", str(tmpdir))
    assert killed.returncode == -9, killed.stderr
    left = killed.stdout.strip()
    assert os.path.isfile(os.path.join(left, "unit-00000.parquet"))  # what a kill leaves behind
    assert _mode(left) == 0o700 and os.lstat(left).st_uid == os.getuid()
    private = tmpdir / f"ragindex-{os.getuid()}"
    assert left.startswith(str(private) + os.sep) and _mode(str(private)) == 0o700

    nxt = _parse_run(dump, out, moto_server, "finish", str(tmpdir))
    assert nxt.returncode == 0, nxt.stderr
    assert not os.path.exists(left)
    assert os.listdir(private) == []  # the next run swept the dead one's and removed its own on exit


def test_upload_temp_files_live_in_a_private_directory(s3_bucket, moto_server):
    fs, _ = resolve(f"s3://{s3_bucket}", moto_server)
    with atomic_write(fs, f"{s3_bucket}/a.json") as f:
        directory = os.path.dirname(f.name)
        assert _mode(directory) == 0o700 and os.lstat(directory).st_uid == os.getuid()
        assert directory != tempfile.gettempdir()
        f.write(b"{}")
    with staged_local_file(fs, f"{s3_bucket}/index.faiss") as local:
        assert _mode(os.path.dirname(local)) == 0o700 and not os.path.exists(local)
        with open(local, "wb") as f:
            f.write(b"index")
    assert fs.cat_file(f"{s3_bucket}/a.json") == b"{}" and fs.cat_file(f"{s3_bucket}/index.faiss") == b"index"


@pytest.fixture
def own_tmp(tmp_path, monkeypatch) -> str:
    """A temp directory of the test's own, and no run directory made yet in this process."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(scratch, "_runs", {})
    return str(tmp_path)


def test_a_planted_scratch_root_is_refused(own_tmp, tmp_path):
    elsewhere = tmp_path / "attacker"
    elsewhere.mkdir(mode=0o777)
    os.symlink(elsewhere, os.path.join(own_tmp, f"ragindex-{os.getuid()}"))
    with pytest.raises(RagindexError, match="not a plain directory"):
        scratch.scratch_dir("units-")
    assert list(elsewhere.iterdir()) == []


def test_scratch_dirs_are_private_and_distinct(own_tmp):
    first, second = scratch.scratch_dir("units-"), scratch.scratch_dir("units-")
    assert first != second and os.path.dirname(first) == os.path.dirname(second) == scratch.run_dir()
    for path in (first, second, scratch.run_dir(), scratch.scratch_root()):
        assert _mode(path) == 0o700 and not os.path.islink(path)
