"""Signed manifests: a build worker with a key signs every version it commits (full and delta alike), and
a reader configured with trusted keys (promote, rollback, `ragindex query`, a serving process) refuses an
unsigned version, a manifest edited after signing, a signature by a key it does not trust, and a delta
whose ancestor is one of those, in one line; without trusted keys, unsigned versions are served as before.
On local disk and on the moto S3 server."""

from __future__ import annotations

import json
import os
import stat

import httpx
import numpy as np
import pytest

from flows.settings import SettingsError, load_settings, open_store
from rag_model.encoders import EncoderSpec
from rag_model.index import VersionIndex
from rag_model.query import query_store
from rag_model.server import create_app
from storage.catalog import read_catalog
from storage.errors import RagindexError, Untrusted
from storage.signing import Signer, TrustedKeys, generate_key_pair, signer_of
from storage.store import IndexStore
from tasks.delta_version import build_delta_version
from tests.fixtures.history import HistPage
from tests.fixtures.rag import TOPICS_A, TOPICS_B, build_version
from tests.fixtures.versions import commit_delta, make_version, random_passages
from tests.test_cli_store import run
from tests.test_delta_version import _day, _words
from tests.test_server import ServerThread, wait_for
from tests.test_store import commit_stub

TOKEN = "signing-token"


@pytest.fixture
def keys(tmp_path):
    """Two key pairs: `trusted` (the build workers') and `other` (a key nobody configured as trusted)."""
    made = {name: generate_key_pair(str(tmp_path / f"keys-{name}")) for name in ("trusted", "other")}
    return {name: {"id": kid, "private": private, "public": public} for name, (kid, private, public) in made.items()}


def opened_as(store: IndexStore, keys, *, signs: str | None = None, trusts: str | None = None) -> IndexStore:
    """The same store root as another party sees it: a worker signing with `signs`, a reader trusting `trusts`."""
    return IndexStore(store.url, s3_endpoint_url=store.s3_endpoint_url,
                      signer=Signer.load(keys[signs]["private"]) if signs else None,
                      trusted_keys=TrustedKeys.load([keys[trusts]["public"]]) if trusts else None)


def assert_untrusted(excinfo: pytest.ExceptionInfo, *words: str) -> None:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, Untrusted), message
    assert "\n" not in message.strip() and all(w in message for w in words), message


# -- keygen ----------------------------------------------------------------------------------------


def test_keygen_writes_a_private_key_only_its_owner_reads_and_names_it_in_one_line(tmp_path, capsys):
    code, out, err = run(["keygen", "--out", str(tmp_path / "keys")], capsys)
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1
    kid = out.split()[1].rstrip(":")
    private, public = tmp_path / "keys" / f"ragindex-{kid}.key.pem", tmp_path / "keys" / f"ragindex-{kid}.pub.pem"
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600 and str(private) in out and str(public) in out
    assert Signer.load(str(private)).key_id == kid and list(TrustedKeys.load([str(public)]).keys) == [kid]
    code, _, err = run(["keygen", "--out", str(tmp_path / "keys")], capsys)  # a second pair beside it: rotation
    assert code == 0 and len(list((tmp_path / "keys").iterdir())) == 4


# -- workers sign what they commit ------------------------------------------------------------------


def test_a_worker_with_a_key_signs_full_and_delta_versions_and_a_trusting_reader_serves_them(
        tmp_path, keys, tiny_ctx_fingerprint, tiny_dpr):
    worker = opened_as(IndexStore(str(tmp_path / "store")), keys, signs="trusted")
    passages = random_passages(120, pages=40)
    vectors = np.random.default_rng(0).standard_normal((120, tiny_ctx_fingerprint.dim)).astype(np.float32)
    full = make_version(worker, passages, vectors, tiny_ctx_fingerprint, spec="IVF4,Flat", wiki="enwiki",
                        promote=True)
    day, path = _day(tmp_path, "20240102", [HistPage(3, "Article 3", [(5000, _words("edited"))])])
    delta = build_delta_version(worker, full, [day], [path], spec=EncoderSpec(str(tiny_dpr.ctx_dir), "dpr"),
                                progress=False)
    assert delta.status == "ready" and delta.is_delta
    for version in (full, delta.version):
        signature = worker.fs.cat_file(worker.version_path(version, "manifest.sig"))
        assert signer_of(worker.manifest_bytes(version), signature) == keys["trusted"]["id"]
        assert json.loads(signature)["algorithm"] == "ed25519"
        assert "manifest.sig" not in worker.manifest(version).files  # beside the manifest, never inside it

    reader = opened_as(worker, keys, trusts="trusted")
    reader.promote(delta.version)
    assert VersionIndex.open(reader, delta.version, cache_dir=str(tmp_path / "cache")).size == delta.live_passages
    listed = {v.version: v for v in read_catalog(reader).versions}
    assert {listed[full].signed_by, listed[delta.version].signed_by} == {keys["trusted"]["id"]}
    assert listed[full].trusted and listed[delta.version].trusted


def test_workers_and_readers_take_their_keys_from_the_settings(tmp_path, keys, monkeypatch):
    monkeypatch.setenv("RAGINDEX_SIGNING_KEY", keys["trusted"]["private"])
    trusted = f"{keys['other']['public']}, {os.path.dirname(keys['trusted']['public'])}"
    monkeypatch.setenv("RAGINDEX_TRUSTED_KEYS", trusted)
    load_settings.cache_clear()
    try:
        store = open_store(str(tmp_path / "store"))
        assert store.signer.key_id == keys["trusted"]["id"]
        assert set(store.trusted_keys.keys) == {keys["trusted"]["id"], keys["other"]["id"]}
        monkeypatch.setenv("RAGINDEX_SIGNING_KEY", str(tmp_path / "nowhere.pem"))
        load_settings.cache_clear()
        with pytest.raises(SettingsError, match="^RAGINDEX_SIGNING_KEY: .*nowhere.pem"):
            open_store(str(tmp_path / "store"))
    finally:
        load_settings.cache_clear()


# -- promote and rollback ---------------------------------------------------------------------------


def _edit_after_signing(store: IndexStore, version: str) -> None:
    """What a writer without the key can do: change the manifest (a count), keep its signature."""
    data = json.loads(store.manifest_bytes(version))
    data["counts"]["passages"] += 1
    store.fs.pipe_file(store.version_path(version, "manifest.json"), json.dumps(data).encode())


@pytest.mark.parametrize("case", ["unsigned", "edited", "untrusted-key", "untrusted-ancestor"])
def test_a_trusting_promote_and_rollback_refuse_what_a_trusted_key_did_not_sign(store, keys, case):
    worker, other = opened_as(store, keys, signs="trusted"), opened_as(store, keys, signs="other")
    good = commit_stub(worker)
    worker.promote(good)
    if case == "untrusted-ancestor":
        ancestor = commit_stub(other)
        bad = commit_delta(worker, ancestor, ["20240102"])  # itself signed by the trusted key
        words = ["segment", ancestor, keys["other"]["id"], "not a trusted key"]
    else:
        bad = commit_stub({"unsigned": store, "edited": worker, "untrusted-key": other}[case])
        if case == "edited":
            _edit_after_signing(store, bad)
        words = {"unsigned": ["unsigned"], "edited": ["does not match"],
                 "untrusted-key": [keys["other"]["id"], "not a trusted key"]}[case]
    reader = opened_as(store, keys, trusts="trusted")
    with pytest.raises(Untrusted) as refused:
        reader.promote(bad)
    assert_untrusted(refused, bad, *words)
    assert reader.current().version == good
    store.promote(bad)  # a store with no trusted key configured: as before, whatever signed it
    assert reader.rollback(good).version == good  # back to the signed one
    with pytest.raises(Untrusted) as refused:
        reader.rollback(bad)
    assert_untrusted(refused, bad, *words)
    assert reader.current().version == good


def test_the_promote_command_refuses_an_unsigned_version_in_one_line(store, keys, monkeypatch, capsys):
    unsigned = commit_stub(store)
    monkeypatch.setenv("RAGINDEX_TRUSTED_KEYS", keys["trusted"]["public"])
    if store.s3_endpoint_url:
        monkeypatch.setenv("RAGINDEX_S3_ENDPOINT_URL", store.s3_endpoint_url)
    load_settings.cache_clear()
    try:
        code, out, err = run(["promote", unsigned, "--store", store.url], capsys)
        assert code != 0 and out == "" and len(err.strip().splitlines()) == 1, err
        assert unsigned in err and "unsigned" in err and "Traceback" not in err
        assert store.current() is None
    finally:
        load_settings.cache_clear()


def test_without_trusted_keys_unsigned_versions_are_promoted_as_before(store):
    version = commit_stub(store)
    assert not store.fs.exists(store.version_path(version, "manifest.sig"))
    assert store.promote(version).version == version
    assert read_catalog(store).versions[0].signed_by == "unsigned" and read_catalog(store).versions[0].trusted is None


# -- ragindex versions ------------------------------------------------------------------------------


def test_versions_shows_who_signed_what_within_80_columns(tmp_path, keys, monkeypatch, capsys):
    from rich.cells import cell_len

    store = IndexStore(str(tmp_path / "store"))
    unsigned, signed = commit_stub(store), commit_stub(opened_as(store, keys, signs="trusted"))
    foreign = commit_stub(opened_as(store, keys, signs="other"))
    edited = commit_stub(opened_as(store, keys, signs="trusted"))
    _edit_after_signing(store, edited)
    delta = commit_delta(opened_as(store, keys, signs="trusted"), signed, ["20240102"])
    store.promote(delta)
    monkeypatch.setenv("RAGINDEX_STORE_URL", store.url)
    monkeypatch.setenv("RAGINDEX_TRUSTED_KEYS", keys["trusted"]["public"])
    monkeypatch.setenv("COLUMNS", "80")
    load_settings.cache_clear()
    try:
        code, out, err = run(["versions"], capsys)
        assert code == 0, err
        lines = out.splitlines()
        assert max(cell_len(line) for line in lines) <= 80, out
        assert "signer" not in out  # no room for the column: the refused versions are named below the table
        refused = ((unsigned, "unsigned"), (edited, "invalid signature"), (foreign, f"signed by {keys['other']['id']}"))
        for version, why in refused:
            assert f"{version}: {why}: not trusted here" in lines
        assert not [line for line in lines if line.startswith((signed, delta))]
        monkeypatch.setenv("COLUMNS", "160")
        code, out, err = run(["versions"], capsys)
        lines = out.splitlines()
        assert max(cell_len(line) for line in lines) <= 160, out
        assert "signer" in next(line for line in lines if "version" in line.split()).split()

        def row(version: str) -> list[str]:
            return next(line for line in lines if version in line.split()).split()

        assert row(unsigned)[-1] == "unsigned" and row(edited)[-1] == "invalid"
        assert row(signed)[-1] == keys["trusted"]["id"] and row(foreign)[-1] == keys["other"]["id"]
        code, out, _ = run(["versions", "--json"], capsys)
        by_id = {v["version"]: v for v in json.loads(out)["versions"]}
        assert (by_id[signed]["signed_by"], by_id[signed]["trusted"]) == (keys["trusted"]["id"], True)
        assert (by_id[foreign]["signed_by"], by_id[foreign]["trusted"]) == (keys["other"]["id"], False)
        assert (by_id[unsigned]["signed_by"], by_id[unsigned]["trusted"]) == ("unsigned", False)
    finally:
        load_settings.cache_clear()


# -- ragindex query and a serving process -----------------------------------------------------------


def test_query_and_a_server_trusting_a_key_refuse_an_unsigned_version(tmp_path, keys, tiny_question_encoder,
                                                                      tiny_dpr):
    root = IndexStore(str(tmp_path / "store"))
    signed = build_version(opened_as(root, keys, signs="trusted"), tiny_question_encoder, TOPICS_A, 1000, 5000,
                           promote=True)
    unsigned = build_version(root, tiny_question_encoder, TOPICS_B, 2000, 6000)
    reader = opened_as(root, keys, trusts="trusted")
    ask = dict(question_encoder=str(tiny_dpr.question_dir), question_encoder_kind="dpr",
               cache_dir=str(tmp_path / "cache"))
    title, text = TOPICS_A[1]
    assert query_store(reader, f"{title} {text}", 2, **ask).hits[0].title == title
    with pytest.raises(RagindexError) as refused:
        query_store(reader, title, 2, version=unsigned.version, **ask)
    assert "unsigned" in str(refused.value) and "\n" not in str(refused.value).strip()

    app = create_app(reader, question_encoder=str(tiny_dpr.question_dir), question_encoder_kind="dpr",
                     admin_token=TOKEN, poll_seconds=3600, cache_dir=str(tmp_path / "cache"))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200)
        root.promote(unsigned.version)  # a writer without the key (and without trusted keys) moves CURRENT
        swap = c.post("/v1/admin/reload", headers=auth).json()["swap"]
        assert swap["ok"] is False and "unsigned" in swap["error"] and unsigned.version in swap["error"]
        answer = c.post("/v1/retrieve", json={"query": f"{title} {text}", "k": 2}).json()
        assert answer["version"] == signed.version
        assert "unsigned" in c.get("/v1/index").json()["last_error"]


# -- a signing worker that trusts keys launders nothing ---------------------------------------------


def test_a_worker_that_trusts_keys_reuses_no_vectors_of_an_unsigned_version(tmp_path, keys):
    from tasks.embed import find_reuse_sources
    from tests.fixtures.versions import fingerprint_for

    store = IndexStore(str(tmp_path / "store"))
    signed = commit_stub(opened_as(store, keys, signs="trusted"))
    planted, foreign = commit_stub(store), commit_stub(opened_as(store, keys, signs="other"))
    on_foreign = commit_delta(opened_as(store, keys, signs="trusted"), foreign, ["20240102"])
    everything = {s.url.rstrip("/").rsplit("/", 1)[-1] for s in find_reuse_sources(store, fingerprint_for(4), 9)}
    assert {signed, planted, foreign, on_foreign} <= everything  # no trusted key: every version, as before
    worker = opened_as(store, keys, signs="trusted")
    worker.trusted_keys = TrustedKeys.load([keys["trusted"]["public"]])
    sources = [s.url.rstrip("/").rsplit("/", 1)[-1] for s in find_reuse_sources(worker, fingerprint_for(4), 9)]
    assert sources == [signed]
    with pytest.raises(Untrusted) as refused:  # nor builds a delta on an unsigned parent
        build_delta_version(worker, planted, [], [], spec=EncoderSpec("never-loaded", "mean"), progress=False)
    assert_untrusted(refused, planted, "unsigned")
    assert len(store.version_ids()) == 4  # nothing staged
