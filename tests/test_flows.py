"""End-to-end: the refresh-index and rollback-index flows on a real temporary Prefect server,
reading dumps from a loopback HTTP mirror, embedding with a tiny real DPR encoder."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from flows.refresh import StepFailed, refresh_index
from flows.rollback import rollback_index
from flows.settings import load_settings
from storage.errors import NotFound, Rejected
from storage.store import IndexStore
from tasks.chunk import chunk_article
from tests.fixtures.mirror import Page, sample_pages


def _common(tmp_path: Path, tiny_dpr) -> dict:
    return dict(store_url=str(tmp_path / "store"), encoder=str(tiny_dpr.ctx_dir), encoder_kind="dpr",
                index_spec="flat", shard_rows=40, allow_count_change=True)


def _assert_version_agrees(store: IndexStore, version: str) -> int:
    """Passages, embeddings, index, passage table and manifest of a version all tell one story."""
    m = store.manifest(version)
    assert m.status == "ready" and m.validation and m.validation.passed
    base = Path(store.version_path(version))
    shards = sorted((base / "passages").glob("part-*.parquet"))
    rows = [pq.read_metadata(s).num_rows for s in shards]
    vectors = [np.load(base / "embeddings" / (s.stem + ".npy"), mmap_mode="r") for s in shards]
    assert [v.shape[0] for v in vectors] == rows
    assert {v.shape[1] for v in vectors} == {m.encoder.dim}
    index = faiss.read_index(str(base / "index.faiss"))
    table = ipc.open_file(str(base / "passages.arrow")).read_all()
    n = sum(rows)
    assert n == m.counts["passages"] == m.counts["embeddings"] == index.ntotal == table.num_rows
    assert table.column("row_id").to_pylist() == list(range(n))
    assert set(m.files) == set(store.version_files(version))
    return n


def test_refresh_promotes_then_is_up_to_date_then_reuses_then_rolls_back(prefect_api, mirror, tiny_dpr, tmp_path):
    common = _common(tmp_path, tiny_dpr)
    store = IndexStore(common["store_url"])
    pages = sample_pages(12)
    mirror.add_run("enwiki", "20240101", pages, parts=2)

    first = refresh_index(wiki="enwiki", dump_date="latest", mirror=mirror.url, **common)
    assert first["status"] == "promoted"
    assert store.current().version == first["version"]
    n = _assert_version_agrees(store, first["version"])
    assert first["counts"]["encoded"] == n and first["counts"]["reused"] == 0
    assert store.manifest(first["version"]).source.dump_date == "20240101"

    # Nothing changed: the nightly run ends early, builds and encodes nothing.
    again = refresh_index(wiki="enwiki", dump_date="latest", mirror=mirror.url, **common)
    assert again["status"] == "up-to-date" and again["version"] == first["version"]
    assert [m.version for m in store.list_versions()] == [first["version"]]
    assert store.current().generation == 1

    # A newer dump with one article rewritten: only that article's passages are encoded.
    edited = list(pages)
    old = pages[5]
    edited[5] = Page(old.page_id, old.title, " ".join(f"fresh{j}" for j in range(230)), rev_id=old.revision + 1)
    mirror.add_run("enwiki", "20240201", edited, parts=2)
    third = refresh_index(wiki="enwiki", dump_date="latest", mirror=mirror.url, **common)
    changed = len(chunk_article(old.page_id, old.revision + 1, old.title, edited[5].text,
                                chunker=load_settings().chunker))
    assert third["status"] == "promoted"
    assert third["counts"]["encoded"] == changed
    assert third["counts"]["reused"] == third["counts"]["passages"] - changed
    assert store.current().version == third["version"]
    assert store.manifest(third["version"]).parent == first["version"]
    _assert_version_agrees(store, third["version"])

    back = rollback_index(store_url=common["store_url"])
    assert back["version"] == first["version"]
    pointer = store.current()
    assert pointer.version == first["version"] and pointer.previous == third["version"]
    assert [h.action for h in store.history()] == ["promote", "promote", "rollback"]

    # The latest dump is already built, and the operator rolled back from it: it is held, not re-promoted.
    after = refresh_index(wiki="enwiki", dump_date="latest", mirror=mirror.url, **common)
    assert after["status"] == "held" and after["version"] == third["version"]
    assert store.current().version == first["version"] and store.current().generation == 3


def test_rollback_to_a_missing_version_leaves_current(prefect_api, tmp_path):
    from tests.fixtures.versions import fingerprint_for, make_version, random_passages

    store = IndexStore(str(tmp_path / "store"))
    vectors = np.random.default_rng(0).standard_normal((30, 8)).astype("float32")
    good = make_version(store, random_passages(30), vectors, fingerprint_for(8), promote=True)
    with pytest.raises(NotFound):
        rollback_index(store_url=store.url, version="enwiki-20240101-20240101t000000z")
    with pytest.raises(NotFound):
        rollback_index(store_url=store.url)  # CURRENT has no previous version yet
    with pytest.raises(Rejected):
        rollback_index(store_url=store.url, version=good)  # already CURRENT
    assert store.current().version == good and store.current().generation == 1


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"memory_budget": "-5GiB"}, "size"),
        ({"index_spec": "nonsense"}, "unknown index spec"),
        ({"store_url": "ftp://example.org/store"}, "unsupported URL scheme"),
        ({"min_recall": 1.5}, "min_recall"),
        ({"encoder_kind": "bert"}, "encoder_kind"),
        ({"compile": True, "task_runner": "ray"}, "compile is for the threads task runner"),
    ],
)
def test_bad_parameters_fail_before_any_work(prefect_api, tmp_path, tiny_dpr, gensim_excerpt, override, fragment):
    params = {**_common(tmp_path, tiny_dpr), "source": str(gensim_excerpt), **override}
    with pytest.raises(Exception) as info:
        refresh_index(**params)
    assert fragment in str(info.value)
    assert not (tmp_path / "store").exists()  # nothing was started


def test_failed_step_leaves_current_untouched(prefect_api, mirror, tiny_dpr, tmp_path):
    common = _common(tmp_path, tiny_dpr)
    store = IndexStore(common["store_url"])
    mirror.add_run("frwiki", "20240101", sample_pages(6))
    first = refresh_index(wiki="frwiki", dump_date="latest", mirror=mirror.url, **common)
    # The next dump's data file is corrupt on the mirror: its sha1 no longer matches dumpstatus.json.
    run = mirror.add_run("frwiki", "20240301", sample_pages(7))
    data = next(run.glob("*multistream.xml.bz2"))
    data.write_bytes(data.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(StepFailed) as info:
        refresh_index(wiki="frwiki", dump_date="latest", mirror=mirror.url, **common)
    assert "failed in step 'download'" in str(info.value) and "sha1 mismatch" in str(info.value)
    assert store.current().version == first["version"] and store.current().generation == 1
    assert [m.version for m in store.list_versions()] == [first["version"]]


def test_report_and_progress_are_left(prefect_api, tmp_path, tiny_dpr, mirror, monkeypatch, request):
    """The run's report artifact, and embedding progress reported within each shard (not once per shard): log
    lines with the rate and the time left, and the embedding progress artifact moved by them."""
    import httpx

    monkeypatch.setenv("RAGINDEX_PROGRESS_SECONDS", "0.001")  # report every batch
    load_settings.cache_clear()  # settings are read once at the edge: this run's must see the variable
    request.addfinalizer(load_settings.cache_clear)
    started = datetime.now(UTC).isoformat()
    common = _common(tmp_path, tiny_dpr)
    mirror.add_run("dewiki", "20240101", sample_pages(5))
    refresh_index(wiki="dewiki", dump_date="latest", mirror=mirror.url, batch_size=4, **common)
    response = httpx.post(f"{prefect_api}/artifacts/filter", json={"limit": 200, "sort": "CREATED_DESC"})
    response.raise_for_status()
    artifacts = response.json()
    reports = [a for a in artifacts if a["key"] == "refresh-index-report"]
    assert reports, "no refresh-index-report artifact"
    text = reports[0]["data"]
    for expected in ("## Counts", "encoded", "reused", "## Validation: passed", "## Timings", "promoted"):
        assert expected in text
    embedding = [a for a in artifacts if a["type"] == "progress" and a["description"].startswith("embedding")]
    assert embedding and embedding[0]["data"] == 100.0

    passages = pq.read_metadata(next((tmp_path / "store" / "versions").glob("*/passages/part-00000.parquet"))).num_rows
    wanted = {"logs": {"timestamp": {"after_": started}}, "limit": 200, "sort": "TIMESTAMP_ASC"}
    lines: list[str] = []
    deadline = time.monotonic() + 60  # run logs reach the API in batches, a few seconds after the run
    while time.monotonic() < deadline and not any(f"{passages}/{passages}" in line for line in lines):
        time.sleep(1)
        logs = httpx.post(f"{prefect_api}/logs/filter", json=wanted).json()
        lines = [log["message"] for log in logs if log["message"].startswith("embedding part-00000")]
    assert len(lines) == -(-passages // 4) > 1  # one report per batch of 4
    assert re.search(r"embedding part-00000\.parquet: 4/\d+ passages \(\d+%\), [\d,]+ passages/s, \S+ left", lines[0])
    assert lines[-1].startswith(f"embedding part-00000.parquet: {passages}/{passages} passages (100%)")


def _data_files(store: IndexStore, version: str) -> dict[str, bytes]:
    base = Path(store.version_path(version))
    files = sorted(base.glob("passages/part-*.parquet")) + [base / "index.faiss", base / "passages.arrow"]
    return {str(f.relative_to(base)): f.read_bytes() for f in files}


def test_crashed_run_resumes_only_unfinished_shards(prefect_api, mirror, tiny_dpr, tmp_path, monkeypatch):
    import tasks.embed
    from rag_model.encoders import EncoderSpec, load_document_encoder

    pages = sample_pages(14)
    mirror.add_run("eswiki", "20240101", pages, parts=2)
    crash = {**_common(tmp_path / "a", tiny_dpr), "shard_rows": 6}
    clean = {**_common(tmp_path / "b", tiny_dpr), "shard_rows": 6}
    # The flow's cached one: the same spec, its chunker (part of the fingerprint) included.
    encoder = load_document_encoder(EncoderSpec(model=crash["encoder"], kind="dpr", chunker=load_settings().chunker))

    real_embed_shard = tasks.embed.embed_shard

    def dies_in_third_shard(shard_url, *args, **kwargs):
        if str(shard_url).endswith("part-00002.parquet"):  # every attempt, retries included
            raise RuntimeError("worker lost in the third shard")
        return real_embed_shard(shard_url, *args, **kwargs)

    monkeypatch.setattr(tasks.embed, "embed_shard", dies_in_third_shard)
    with pytest.raises(StepFailed, match="failed in step 'embed': worker lost in the third shard"):
        refresh_index(wiki="eswiki", dump_date="latest", mirror=mirror.url, **crash)
    monkeypatch.setattr(tasks.embed, "embed_shard", real_embed_shard)
    store = IndexStore(crash["store_url"])
    assert store.current() is None and store.list_versions() == []
    staged = Path(store.path("versions"))
    finished = sorted(p.name for p in staged.glob("*/embeddings/part-*.npy"))
    assert finished == ["part-00000.npy", "part-00001.npy"]

    before = encoder.passages_encoded
    resumed = refresh_index(wiki="eswiki", dump_date="latest", mirror=mirror.url, **crash)
    encoded_on_resume = encoder.passages_encoded - before
    assert resumed["status"] == "promoted"
    shards = resumed["counts"]["shards"]
    assert shards >= 4 and resumed["counts"]["shards_resumed"] == 2
    rows = [pq.read_metadata(p).num_rows for p in sorted(
        Path(store.version_path(resumed["version"])).glob("passages/part-*.parquet"))]
    assert encoded_on_resume == sum(rows[2:])  # the two finished shards were not encoded again

    reference = refresh_index(wiki="eswiki", dump_date="latest", mirror=mirror.url, **clean)
    other = IndexStore(clean["store_url"])
    assert _data_files(store, resumed["version"]) == _data_files(other, reference["version"])
    a = np.concatenate([np.load(p) for p in sorted(
        Path(store.version_path(resumed["version"])).glob("embeddings/part-*.npy"))])
    b = np.concatenate([np.load(p) for p in sorted(
        Path(other.version_path(reference["version"])).glob("embeddings/part-*.npy"))])
    assert np.array_equal(a, b)


def test_second_build_on_the_same_store_is_refused_while_one_runs(prefect_api, mirror, tiny_dpr, tmp_path):
    common = _common(tmp_path, tiny_dpr)
    store = IndexStore(common["store_url"])
    mirror.add_run("itwiki", "20240101", sample_pages(4))
    with store.build_lock(owner="another refresh-index run"), pytest.raises(
        StepFailed, match="failed in step 'lock': another build holds the lock"
    ):
            refresh_index(wiki="itwiki", dump_date="latest", mirror=mirror.url, **common)
    assert store.current() is None and store.list_versions() == []


@pytest.mark.slow
def test_ray_task_runner_builds_the_same_version(prefect_api, mirror, tiny_dpr, tmp_path):
    pytest.importorskip("prefect_ray")
    pytest.importorskip("ray.data", reason="the embed step is a Ray Data job: needs ray[data] (pandas)")
    mirror.add_run("nlwiki", "20240101", sample_pages(6))
    # One precision for both: `auto` chooses by measured speed, which a loaded machine can tip either way
    # between two runs; the runner, not the precision choice, is what must not change a byte.
    threads = refresh_index(wiki="nlwiki", dump_date="latest", mirror=mirror.url, precision="fp32",
                            **_common(tmp_path / "t", tiny_dpr))
    ray = refresh_index(wiki="nlwiki", dump_date="latest", mirror=mirror.url, task_runner="ray", precision="fp32",
                        **_common(tmp_path / "r", tiny_dpr))
    assert ray["status"] == "promoted"
    a, b = IndexStore(str(tmp_path / "t" / "store")), IndexStore(str(tmp_path / "r" / "store"))
    assert _data_files(a, threads["version"]) == _data_files(b, ray["version"])
    # The Ray Data job wrote the very bytes the shard tasks did; nothing to reuse in a new store, so all encoded.
    vectors = [{p.name: p.read_bytes() for p in Path(s.version_path(v)).glob("embeddings/part-*")}
               for s, v in ((a, threads["version"]), (b, ray["version"]))]
    assert vectors[0] == vectors[1] and vectors[0]
    assert ray["counts"]["shards_resumed"] == 0 and ray["counts"]["encoded_this_run"] == ray["counts"]["passages"]
