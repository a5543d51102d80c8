"""`ragindex build / versions / promote / rollback / gc / pin / unpin`, run in-process through main()."""

from __future__ import annotations

import json

import pytest

from cli.main import main
from flows.settings import load_settings
from storage.store import IndexStore
from tests.fixtures.versions import (
    clustered_vectors,
    commit_delta,
    fingerprint_for,
    random_passages,
    write_version_inputs,
)

DIM = 16


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGINDEX_STORE_URL", str(tmp_path / "store"))
    load_settings.cache_clear()
    yield tmp_path
    load_settings.cache_clear()


def inputs(tmp_path, n: int, seed: int = 0) -> tuple[str, str]:
    scratch = IndexStore(str(tmp_path / f"scratch{seed}"))
    vid = scratch.begin_version("enwiki", "20240101")
    write_version_inputs(scratch, vid, random_passages(n, seed=seed), clustered_vectors(n, DIM, seed=seed),
                         fingerprint_for(DIM))
    return scratch.version_path(vid, "passages"), scratch.version_path(vid, "embeddings")


def build_two(cli_env, capsys) -> list[str]:
    """Two ready versions built through `ragindex build --json`, oldest first."""
    ids = []
    for seed in (0, 1):
        passages, embeddings = inputs(cli_env, 200 + seed * 20, seed)
        code, out, err = run(["build", "--passages", passages, "--embeddings", embeddings, "--index-spec", "flat",
                              "--json"], capsys)
        assert code == 0, err
        manifest = json.loads(out)  # --json: one JSON document on stdout, nothing else
        assert manifest["status"] == "ready"
        ids.append(manifest["version"])
    return ids


def test_build_versions_promote_rollback_gc(cli_env, capsys):
    ids = build_two(cli_env, capsys)
    code, out, _ = run(["versions", "--json"], capsys)
    report = json.loads(out)
    assert [v["version"] for v in report["versions"]] == ids[::-1] and report["current"] is None
    assert report["versions"][0]["passages"] == 220 and report["versions"][0]["bytes"] > 0

    assert run(["promote", ids[0]], capsys)[0] == 0
    assert run(["promote", ids[1], "--reason", "nightly"], capsys)[0] == 0
    assert run(["pin", ids[0]], capsys)[0] == 0
    code, out, _ = run(["versions"], capsys)
    assert code == 0 and "CURRENT" in out and "previous" in out and "pinned" in out
    code, out, _ = run(["rollback"], capsys)
    assert code == 0 and ids[0] in out
    report = json.loads(run(["versions", "--json"], capsys)[1])
    marks = {v["version"]: (v["current"], v["previous"], v["pinned"]) for v in report["versions"]}
    assert marks == {ids[0]: (True, False, True), ids[1]: (False, True, False)}
    code, out, _ = run(["gc", "--keep", "1", "--dry-run", "--json"], capsys)
    assert json.loads(out)["deleted_versions"] == [] and json.loads(out)["dry_run"] is True
    assert run(["unpin", ids[0]], capsys)[0] == 0


def test_errors_are_one_line_and_nonzero(cli_env, capsys):
    (cli_env / "store").mkdir()  # an empty store: what each command says of one that does not exist is elsewhere
    passages, embeddings = inputs(cli_env, 150)
    cases = [
        (["promote", "no-such-version"], "no version"),
        (["promote", "../../etc/passwd"], "invalid version id"),
        (["rollback"], "nothing to roll back"),
        (["gc", "--keep", "0"], "at least 1"),
        (["unpin", "enwiki-20240101-20240101t000000z"], "not pinned"),
        (["build", "--passages", passages, "--embeddings", embeddings, "--index-spec", "flat",
          "--memory-budget", "1KiB"], "memory budget"),
        (["build", "--passages", passages, "--embeddings", embeddings, "--index-spec", "bogus"], "bogus"),
        (["build", "--passages", str(cli_env / "nowhere"), "--embeddings", embeddings], "missing"),
    ]
    for argv, needle in cases:
        code, out, err = run(argv, capsys)
        assert code == 2, (argv, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (argv, err)
    assert IndexStore(str(cli_env / "store")).list_versions() == []  # failed builds left nothing visible


def test_a_rejected_build_is_listed_but_exits_nonzero(cli_env, capsys):
    passages, embeddings = inputs(cli_env, 300)
    code, _, err = run(["build", "--passages", passages, "--embeddings", embeddings,
                        "--index-spec", "ivfpq:m=2,nbits=2"], capsys)
    assert code == 2 and "was rejected" in err and len(err.strip().splitlines()) == 1
    report = json.loads(run(["versions", "--json"], capsys)[1])
    assert [v["status"] for v in report["versions"]] == ["rejected"]
    vid = report["versions"][0]["version"]
    code, _, err = run(["promote", vid], capsys)
    assert code == 2 and "cannot be promoted" in err


def _own_bytes_on_disk(version_dir) -> int:
    """What a version stores itself: every file under its directory but the manifest."""
    total = 0
    for path in version_dir.rglob("*"):
        if path.is_file() and path.relative_to(version_dir).as_posix() not in ("manifest.json", "_staging.json"):
            total += path.stat().st_size
    return total


def test_versions_and_gc_show_delta_lineage_and_own_vs_shared_bytes(cli_env, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    ids = build_two(cli_env, capsys)
    store = IndexStore(str(cli_env / "store"))
    delta = commit_delta(store, ids[0], ["20240102", "20240103", "20240104"], passages=3)
    delta2 = commit_delta(store, delta, ["20240105"], passages=2,
                          files={"tombstones.npy": b"t" * 64, "passages/part-00000.parquet": b"q" * 1234})
    own = {v: _own_bytes_on_disk(cli_env / "store" / "versions" / v) for v in (*ids, delta, delta2)}
    assert own[delta2] == 64 + 1234 and own[ids[0]] > 10_000

    code, out, _ = run(["versions", "--json"], capsys)
    rows = {r["version"]: r for r in json.loads(out)["versions"]}
    assert code == 0 and list(rows) == [delta2, delta, ids[1], ids[0]]
    full = rows[ids[0]]
    assert (full["mode"], full["parent"], full["base_dump"], full["days"], full["segments"]) == (
        "full", None, "20240101", [], [])
    assert full["own_bytes"] == full["bytes"] == own[ids[0]] and full["shared_bytes"] == 0
    assert full["live_passages"] == 200
    assert rows[ids[1]]["mode"] == "full" and rows[ids[1]]["parent"] == ids[0]  # a full build's reuse parent
    d = rows[delta]
    assert (d["mode"], d["parent"], d["base_dump"], d["days"], d["segments"]) == (
        "delta", ids[0], "20240101", ["20240102", "20240103", "20240104"], [ids[0]])
    assert d["own_bytes"] == own[delta] and d["shared_bytes"] == own[ids[0]]
    assert d["passages"] == 3 and d["live_passages"] == 200 + 3 - 1 and d["missing_segments"] == []
    d2 = rows[delta2]
    assert (d2["parent"], d2["days"], d2["segments"]) == (delta, ["20240102", "20240103", "20240104", "20240105"],
                                                          [ids[0], delta])
    assert d2["own_bytes"] == 64 + 1234 and d2["shared_bytes"] == own[ids[0]] + own[delta]
    assert d2["live_passages"] == 202 + 2 - 1

    code, out, _ = run(["versions"], capsys)
    assert code == 0
    assert f"delta of {ids[0]} (base 20240101 + 3 days → 20240104)" in out
    assert f"delta of {delta} (base 20240101 + 4 days → 20240105)" in out
    assert "full (dump 20240101)" in out and "202 (3 own)" in out

    code, out, _ = run(["gc", "--keep", "1", "--dry-run", "--json"], capsys)
    dry = json.loads(out)
    assert code == 0 and dry["deleted_versions"] == [ids[1]] and dry["kept_as_segment"] == [ids[0], delta]
    assert dry["kept_in_doubt"] == []
    code, out, _ = run(["gc", "--keep", "1", "--stale-hours", "0"], capsys)
    assert code == 0 and f"deleted version {ids[1]}" in out
    assert f"kept version {ids[0]}: a segment of a kept delta version" in out
    assert "kept 3 version(s) (2 only as segment(s))" in out
    assert [m.version for m in store.list_versions()] == [ids[0], delta, delta2]
