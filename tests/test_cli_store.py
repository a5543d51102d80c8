"""`ragindex build / versions / promote / rollback / gc / pin / unpin`, run in-process through main()."""

from __future__ import annotations

import json

import pytest

from cli.main import main
from flows.settings import load_settings
from storage.store import IndexStore
from tests.fixtures.versions import clustered_vectors, fingerprint_for, random_passages, write_version_inputs

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


def test_build_versions_promote_rollback_gc(cli_env, capsys):
    ids = []
    for seed in (0, 1):
        passages, embeddings = inputs(cli_env, 200 + seed * 20, seed)
        code, out, err = run(["build", "--passages", passages, "--embeddings", embeddings, "--index-spec", "flat",
                              "--json"], capsys)
        assert code == 0, err
        manifest = json.loads(out)  # --json: one JSON document on stdout, nothing else
        assert manifest["status"] == "ready"
        ids.append(manifest["version"])
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
