"""`ragindex download` and `ragindex passages` as a user runs them: a real process, real mirror."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from tests.fixtures.mirror import sample_pages

RAGINDEX = [sys.executable, "-m", "cli"]  # the same main() as the console script, without reinstalling


def _run(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RAGINDEX_")}
    environ.update({"RAGINDEX_STORE_URL": str(tmp_path / "default-store"), **env})
    return subprocess.run([*RAGINDEX, *args], capture_output=True, text=True, env=environ, timeout=120)


def test_download_then_passages(mirror, tmp_path):
    mirror.add_run("enwiki", "20240101", sample_pages(3))
    mirror.add_run("enwiki", "20240201", sample_pages(8), parts=2)
    store = tmp_path / "store"

    done = _run("download", "--wiki", "enwiki", "--date", "latest", "--store", str(store), tmp_path=tmp_path,
                RAGINDEX_MIRROR=mirror.url)  # the mirror from settings, the store from the option

    assert done.returncode == 0, done.stderr
    assert "enwiki 20240201: 4 files" in done.stdout
    downloads = store / "downloads" / "enwiki" / "20240201"
    assert len(list(downloads.glob("*.bz2"))) == 4
    assert {r["user_agent"] for r in mirror.requests} == {"ragindex/0.1 (https://github.com/ragindex/ragindex; "
                                                          "index refresh bot)"}

    out = tmp_path / "passages"
    made = _run("passages", "--source", f"file://{downloads}", "--out", str(out), "--workers", "2",
                "--shard-rows", "5", tmp_path=tmp_path)

    assert made.returncode == 0, made.stderr
    summary = json.loads((out / "passages.json").read_text())
    assert summary["articles"]["kept"] == 8 and summary["source"]["dump_date"] == "20240201"
    assert all(s["rows"] <= 5 for s in summary["shards"])
    assert sum(pq.read_metadata(out / s["name"]).num_rows for s in summary["shards"]) == summary["passages"]
    assert "articles kept" in made.stdout and str(summary["passages"]) in made.stdout


def test_bad_input_is_one_line_and_nonzero(mirror, tmp_path):
    mirror.add_run("enwiki", "20240101", sample_pages(2))
    cases = [
        (["download", "--wiki", "enwiki", "--date", "20990101", "--mirror", mirror.url], "no dump enwiki 20990101"),
        (["download", "--wiki", "Bad Wiki", "--date", "latest", "--mirror", mirror.url], "invalid wiki name"),
        (["download", "--wiki", "enwiki", "--date", "latest", "--mirror", mirror.url, "--job", "nope"],
         "unknown dump job 'nope'"),
        (["passages", "--source", str(tmp_path / "missing.xml.bz2"), "--out", str(tmp_path / "o")],
         "dump source not found"),
    ]
    broken = tmp_path / "enwiki-20240101-pages-articles.xml.bz2"
    broken.write_bytes(b"BZh91AY&SY" + b"\x00" * 200)
    cases.append((["passages", "--source", str(broken), "--out", str(tmp_path / "o2"), "--workers", "1"],
                  f"bz2 data in {broken.name} near byte"))
    for args, message in cases:
        result = _run(*args, tmp_path=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "o2" / "passages.json").exists()
