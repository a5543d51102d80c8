"""The Ray Data embedding path (tasks.embed_ray): the local path's bytes, resumable per shard.

The job's steps (plan on the driver, keep the rows to encode, ShardEncoder per shard) are first run in this
process, which needs no Ray; then the whole job runs on a local Ray instance the test starts.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from rag_model.encoders import EncoderSpec
from storage.errors import RagindexError
from storage.layout import PASSAGE_SCHEMA, RAY_STAGING_DIR
from storage.location import Location
from tasks.chunk import content_hash
from tasks.embed import embed_passages, embed_shard, list_passage_shards
from tasks.embed_ray import ShardEncoder, ShardPlan, embed_passages_ray, keep_todo, plan_shards
from tests.fixtures.models import write_passages
from tests.test_embed import make_articles


@pytest.fixture
def spec(tiny_dpr) -> EncoderSpec:
    return EncoderSpec(str(tiny_dpr.ctx_dir))


def shard_files(directory: Path) -> dict[str, bytes]:
    """Every embedding shard and sidecar, byte for byte (not embeddings.json: it holds timings)."""
    return {p.name: p.read_bytes() for p in sorted(directory.glob("part-*")) if p.suffix in (".npy", ".json")}


def sidecars(directory: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(directory.glob("part-*.json"))}


def refreshed_corpus(tmp_path: Path, spec: EncoderSpec) -> tuple[Path, Path]:
    """An earlier version (v1) and the passages of a new one: some shards unchanged, one with an edited
    article, new articles at the end. Returns (v1 root, v2 passages)."""
    articles = make_articles(16, seed=5)
    v1 = tmp_path / "v1"
    write_passages(v1 / "passages", articles[:12])
    embed_passages(Location(v1 / "passages"), Location(v1 / "embeddings"), spec, progress=False, precision="fp32")
    changed = [dict(a) for a in articles]
    changed[10]["text"] += " fishing boat"
    write_passages(tmp_path / "v2" / "passages", changed)
    return v1, tmp_path / "v2" / "passages"


def run_job_in_process(planned: list, todo_rows: dict, spec: EncoderSpec, out: Path) -> list[dict]:
    """What the Ray Data job does, without Ray: read each planned shard (with the `path` column
    read_parquet adds), keep the rows to encode, one ShardEncoder call per shard."""
    plans = [p for p in planned if isinstance(p, ShardPlan)]
    first_row_id = {p.name: p.first_row_id for p in plans}
    tables = []
    for plan in plans:
        table = pq.read_table(plan.path, columns=["row_id", "title", "text"])
        tables.append(table.append_column("path", pa.array([plan.path] * table.num_rows)))
    # Ray's batches do not follow files: hand keep_todo rows of every shard at once.
    kept = keep_todo(pa.concat_tables(tables), first_row_id, todo_rows)
    encoder = ShardEncoder(spec, {p.name: p for p in plans}, Location(out), batch_size=64, device="cpu",
                           precision="fp32", threads=None)
    done = {}
    for plan in plans:
        group = kept.filter(pc.equal(kept.column("shard"), plan.name))
        record = json.loads(encoder(group.take(np.arange(group.num_rows)[::-1])).column("record")[0].as_py())
        done[record["name"]] = record
    return [done[p.name.replace(".parquet", ".npy")] if isinstance(p, ShardPlan) else p for p in planned]


def test_job_steps_give_the_local_bytes_and_skip_finished_shards(tmp_path, spec):
    v1, passages = refreshed_corpus(tmp_path, spec)
    local = embed_passages(Location(passages), Location(tmp_path / "local"), spec, reuse_from=[Location(v1)],
                           progress=False, precision="fp32")
    shards = list_passage_shards(Location(passages))
    out = tmp_path / "ray"
    # A finished shard from an earlier, interrupted run: skipped, not planned, not encoded again.
    embed_shard(shards[0], Location(out), spec, reuse_from=[Location(v1)], progress=False, precision="fp32")
    before = (out / "part-00000.npy").stat().st_mtime_ns

    planned, todo_rows = plan_shards(shards, Location(out), spec, [Location(v1)])
    plans = [p for p in planned if isinstance(p, ShardPlan)]
    assert planned[0]["skipped"] is True and planned[0]["encoded"] == 0
    # Every kind of shard is here: fully reused (written by the driver), partly reused (vectors staged,
    # only its changed rows to encode) and new (every row to encode, nothing staged).
    fully_reused = [p for p in planned if isinstance(p, dict) and not p["skipped"]]
    assert fully_reused and all(r["encoded"] == 0 and r["reused"] == r["rows"] for r in fully_reused)
    partly = [p for p in plans if p.staged]
    assert partly and all(0 < p.encode < p.rows for p in partly)
    assert set(todo_rows) == {p.name for p in partly}
    assert all((out / RAY_STAGING_DIR / p.name.replace(".parquet", ".npy")).is_file() for p in partly)
    new = [p for p in plans if not p.staged]
    assert new and all(p.encode == p.rows for p in new)

    records = run_job_in_process(planned, todo_rows, spec, out)
    assert (out / "part-00000.npy").stat().st_mtime_ns == before
    assert shard_files(out) == shard_files(tmp_path / "local")
    assert [r["name"] for r in records] == [s["name"] for s in local["shards"]]
    assert sum(r["encoded"] for r in records) + sidecars(out)["part-00000.json"]["encoded"] == local["encoded"]


def _partly_reused_plan(tmp_path: Path, spec: EncoderSpec) -> tuple[list, dict, ShardPlan, Path]:
    v1, passages = refreshed_corpus(tmp_path, spec)
    out = tmp_path / "ray"
    planned, todo_rows = plan_shards(list_passage_shards(Location(passages)), Location(out), spec, [Location(v1)])
    partly = next(p for p in planned if isinstance(p, ShardPlan) and p.staged)
    return planned, todo_rows, partly, out


def test_staged_vectors_changed_after_staging_fail_the_job_naming_the_file(tmp_path, spec):
    planned, todo_rows, partly, out = _partly_reused_plan(tmp_path, spec)
    staged = out / RAY_STAGING_DIR / partly.name.replace(".parquet", ".npy")
    data = bytearray(staged.read_bytes())
    data[-3] ^= 0x40  # one bit of one reused vector, same size: still a loadable .npy
    staged.write_bytes(bytes(data))

    with pytest.raises(RagindexError) as failed:
        run_job_in_process(planned, todo_rows, spec, out)
    message = str(failed.value)
    assert "\n" not in message and message.startswith(f"staged vectors {staged} changed after it was written")
    assert not (out / partly.name.replace(".parquet", ".json")).exists()  # nothing sealed


def test_a_passage_shard_changed_after_planning_is_not_encoded(tmp_path, spec):
    planned, todo_rows, partly, out = _partly_reused_plan(tmp_path, spec)
    shard = Path(partly.path)
    table = pq.read_table(shard)
    texts = table.column("text").to_pylist()
    texts[0] = "planted sentence " + texts[0]
    hashes = table.column("content_hash").to_pylist()
    hashes[0] = content_hash(table.column("title")[0].as_py(), texts[0])  # consistent: only the digest tells
    table = table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts))
    pq.write_table(table.set_column(table.schema.get_field_index("content_hash"), "content_hash", pa.array(hashes)),
                   shard)

    with pytest.raises(RagindexError, match=rf"^passage shard {shard} changed after it was planned: sha256 "):
        run_job_in_process(planned, todo_rows, spec, out)
    assert not (out / partly.name.replace(".parquet", ".json")).exists()


def test_an_actor_whose_encoder_differs_from_the_planned_one_refuses(tmp_path, spec):
    write_passages(tmp_path / "p", make_articles(2, seed=3), shard_rows=100)
    planned, _ = plan_shards(list_passage_shards(Location(tmp_path / "p")), Location(tmp_path / "out"), spec, [])
    (plan,) = planned
    other = replace(plan, key="0" * 64)  # what an actor on a node with other weights under the same name sees
    with pytest.raises(RagindexError, match=r"^encoder .* loaded here has fingerprint .*, the shards were planned "
                                            r"with 0000000000000000…"):
        ShardEncoder(spec, {other.name: other}, Location(tmp_path / "out"), batch_size=8, device="cpu",
                     precision="fp32", threads=None)


def test_a_shard_split_across_calls_is_refused(tmp_path, spec):
    write_passages(tmp_path / "p", make_articles(3, seed=2), shard_rows=100)
    shards = list_passage_shards(Location(tmp_path / "p"))
    planned, todo_rows = plan_shards(shards, Location(tmp_path / "out"), spec, [])
    (plan,) = planned
    table = pq.read_table(plan.path, columns=["row_id", "title", "text"])
    table = table.append_column("path", pa.array([plan.path] * table.num_rows))
    half = keep_todo(table.slice(0, table.num_rows // 2), {plan.name: plan.first_row_id}, todo_rows)
    encoder = ShardEncoder(spec, {plan.name: plan}, Location(tmp_path / "out"), batch_size=8, device="cpu",
                           precision="fp32", threads=None)
    with pytest.raises(RagindexError, match=rf"^shard part-00000.parquet: got {half.num_rows} rows to encode in "
                                            rf"one call, expected {table.num_rows}$"):
        encoder(half)
    assert not (tmp_path / "out" / "part-00000.npy").exists()


def test_a_shard_whose_row_ids_have_gaps_is_refused_before_any_work(tmp_path, spec):
    rows = write_passages(tmp_path / "p", make_articles(3, seed=2), shard_rows=100)
    table = pa.Table.from_pylist([{**r, "row_id": r["row_id"] + (5 if i else 0)} for i, r in enumerate(rows)],
                                 schema=PASSAGE_SCHEMA)
    pq.write_table(table, tmp_path / "p" / "part-00000.parquet")
    with pytest.raises(RagindexError, match=r"^passage shard part-00000.parquet: row_id does not run on from 0 "
                                            r"without gaps, so its rows cannot be matched back to their order$"):
        plan_shards([Location(tmp_path / "p" / "part-00000.parquet")], Location(tmp_path / "out"), spec, [])
    assert not (tmp_path / "out").exists()


def test_without_ray_data_ray_address_says_what_to_install(tmp_path, tiny_dpr, monkeypatch, capsys):
    from cli.main import main

    write_passages(tmp_path / "p", make_articles(2, seed=1))
    monkeypatch.setitem(sys.modules, "ray.data", None)  # what a Ray without its data extra looks like
    with pytest.raises(SystemExit) as exc:
        main(["embed", "--passages", str(tmp_path / "p"), "--out", str(tmp_path / "out"), "--encoder",
              str(tiny_dpr.ctx_dir), "--ray-address", "local"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --ray-address needs Ray Data, which is not installed")
    assert err[0].endswith("install ragindex[ray]")
    assert not (tmp_path / "out").exists()


# -- the job on a local Ray instance -----------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    pytest.importorskip("ray.data", reason="Ray Data (ray[data]: pandas) is not installed")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_data_job_gives_the_local_bytes(tmp_path, spec, local_ray):
    v1, passages = refreshed_corpus(tmp_path, spec)
    local = embed_passages(Location(passages), Location(tmp_path / "local"), spec, reuse_from=[Location(v1)],
                           progress=False, precision="fp32")
    remote = embed_passages_ray(Location(passages), Location(tmp_path / "ray"), spec, reuse_from=[Location(v1)],
                                progress=False, precision="fp32", ray_address="local")
    assert shard_files(tmp_path / "ray") == shard_files(tmp_path / "local")
    assert 0 < remote["encoded"] == local["encoded"] < remote["rows"]
    assert remote["shards"] == local["shards"]
    assert not (tmp_path / "ray" / RAY_STAGING_DIR).exists()

    # A failure inside the job still reaches the caller as one clear line.
    (tmp_path / "bad").mkdir()
    pq.write_table(PASSAGE_SCHEMA.empty_table(), tmp_path / "bad" / "part-00000.parquet")
    with pytest.raises(RagindexError, match=r"^passage shard .*part-00000.parquet is empty$"):
        embed_passages_ray(Location(tmp_path / "bad"), Location(tmp_path / "bad-out"), spec, ray_address="local")


def test_ray_data_job_resumes_per_shard(tmp_path, tiny_dpr, local_ray, capsys):
    from cli.main import main

    spec = EncoderSpec(str(tiny_dpr.ctx_dir))
    write_passages(tmp_path / "p", make_articles(8, seed=9))
    shards = list_passage_shards(Location(tmp_path / "p"))
    assert len(shards) >= 3
    out = tmp_path / "out"
    first = embed_shard(shards[0], Location(out), spec, progress=False, precision="fp32")
    finished = (out / "part-00000.json").read_bytes()
    main(["embed", "--passages", str(tmp_path / "p"), "--out", str(out), "--encoder", spec.model,
          "--precision", "fp32", "--chunker", "dpr", "--ray-address", "local", "--json"])  # as embed_shard(spec)
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped_shards"] == 1
    assert (out / "part-00000.json").read_bytes() == finished  # not written again
    records = sidecars(out)
    names = sorted(records)[1:]
    assert len(names) == len(shards) - 1 and all(records[n]["encoded"] == records[n]["rows"] for n in names)
    assert summary["encoded"] == summary["rows"] - first["rows"]


@pytest.mark.slow
def test_a_ray_refresh_whose_staged_vectors_change_fails_and_commits_nothing(prefect_api, mirror, tiny_dpr, tmp_path,
                                                                             monkeypatch):
    pytest.importorskip("prefect_ray")
    pytest.importorskip("ray.data", reason="the embed step is a Ray Data job: needs ray[data] (pandas)")
    from flows.refresh import StepFailed, refresh_index
    from storage.store import IndexStore
    from tasks import embed_ray
    from tests.fixtures.mirror import Page, sample_pages

    common = dict(wiki="enwiki", dump_date="latest", mirror=mirror.url, store_url=str(tmp_path / "store"),
                  encoder=str(tiny_dpr.ctx_dir), encoder_kind="dpr", index_spec="flat", shard_rows=8,
                  precision="fp32", allow_count_change=True)
    pages = sample_pages(6)
    mirror.add_run("enwiki", "20240101", pages)
    first = refresh_index(**common)
    assert first["status"] == "promoted"
    last = pages[-1]
    mirror.add_run("enwiki", "20240201", [*pages[:-1], Page(last.page_id, last.title, last.text + " edited",
                                                              rev_id=last.revision + 1)])
    staged: list[Path] = []
    run_job = embed_ray._run_job

    def change_staged_vectors_then_run(plans, *args, **kwargs):
        # The seam between the driver staging the reused vectors and the actors reading them.
        for plan in plans:
            if plan.staged:
                path = Path(embed_ray.staged_path(args[3].path, plan.name))
                data = bytearray(path.read_bytes())
                data[-3] ^= 0x40
                path.write_bytes(bytes(data))
                staged.append(path)
        return run_job(plans, *args, **kwargs)

    monkeypatch.setattr(embed_ray, "_run_job", change_staged_vectors_then_run)
    with pytest.raises(StepFailed) as failed:
        refresh_index(**common, task_runner="ray")
    message = str(failed.value)
    assert staged and "\n" not in message
    assert f"staged vectors {staged[0]} changed after it was written" in message
    store = IndexStore(common["store_url"])
    assert [m.version for m in store.list_versions()] == [first["version"]]
    assert store.current().version == first["version"]
