"""Embedding shards: layout, resume, reuse by content hash, bad input, the CLI (Ray: test_embed_ray.py)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rag_model.encoders import EncoderSpec, fingerprint_of, load_document_encoder
from storage import layout
from storage.errors import RagindexError
from storage.layout import PASSAGE_SCHEMA, UNIT_SCHEMA
from storage.location import Location
from storage.manifest import IndexInfo, Manifest, SourceDump
from storage.records import UnitRecord
from storage.store import IndexStore
from tasks.chunk import content_hash
from tasks.embed import embed_passages, embed_shard, find_reuse_sources, write_embeddings_summary
from tasks.passages import assemble
from tests.fixtures.models import COMMON_WORDS, save_tiny_dpr_encoder, write_passages


def make_articles(n: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    return [{"page_id": 100 + i, "rev_id": 1000 + i, "title": f"{rng.choice(COMMON_WORDS)} {i}",
             "text": " ".join(rng.choice(COMMON_WORDS) for _ in range(rng.randint(20, 260)))} for i in range(n)]


def load_vectors(directory: Path) -> np.ndarray:
    names = sorted(p for p in os.listdir(directory) if p.endswith(".npy"))
    return np.concatenate([np.load(directory / n) for n in names])


class Counter:
    """The encoder_calls hook: counts passages that really went through the network."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.passages = 0
        self.fail_after = fail_after

    def __call__(self, n: int) -> None:
        self.passages += n
        if self.fail_after is not None and self.passages >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")


@pytest.fixture
def spec(tiny_dpr) -> EncoderSpec:
    return EncoderSpec(str(tiny_dpr.ctx_dir))


def test_shards_match_passages_row_for_row(tmp_path, spec):
    rows = write_passages(tmp_path / "passages", make_articles(12))
    counter = Counter()
    summary = embed_passages(Location(tmp_path / "passages"), Location(tmp_path / "emb"), spec, progress=False,
                             precision="fp32", encoder_calls=counter, batch_size=4)
    shard_names = sorted(p.name for p in (tmp_path / "passages").glob("part-*.parquet"))
    assert len(shard_names) >= 3
    vectors = load_vectors(tmp_path / "emb")
    assert vectors.shape == (len(rows), 32) and vectors.dtype == np.float32
    # Row i of the output is passage i, whatever order batches ran in.
    encoder = load_document_encoder(spec, precision="fp32")
    expected = encoder.encode([r["title"] for r in rows], [r["text"] for r in rows], batch_size=len(rows))
    np.testing.assert_allclose(vectors, expected, atol=2e-5)
    assert counter.passages == len(rows)
    assert summary["rows"] == summary["encoded"] == len(rows) and summary["reused"] == 0
    assert summary["fingerprint"] == fingerprint_of(spec).model_dump(mode="json")
    assert summary["question_encoder"] == str(Path(spec.model).parent / "question")
    assert [s["name"] for s in summary["shards"]] == [n.replace(".parquet", ".npy") for n in shard_names]
    sidecar = json.loads((tmp_path / "emb" / "part-00000.json").read_text())
    npy = tmp_path / "emb" / "part-00000.npy"
    assert sidecar["sha256"] == hashlib.sha256(npy.read_bytes()).hexdigest() == summary["shards"][0]["sha256"]
    shard_bytes = (tmp_path / "passages" / shard_names[0]).read_bytes()
    assert sidecar["passages_sha256"] == hashlib.sha256(shard_bytes).hexdigest()
    assert sidecar["fingerprint_key"] == fingerprint_of(spec).key and sidecar["dim"] == 32
    assert not [p for p in os.listdir(tmp_path / "emb") if p.endswith(".tmp")]


def test_resume_skips_finished_shards_and_redoes_damaged_ones(tmp_path, spec):
    rows = write_passages(tmp_path / "passages", make_articles(10))
    out = tmp_path / "emb"
    # An interruption in the middle of the run: earlier shards are complete, the current one absent.
    with pytest.raises(KeyboardInterrupt):
        embed_passages(Location(tmp_path / "passages"), Location(out), spec, progress=False, batch_size=4,
                       encoder_calls=Counter(fail_after=12))
    done = sorted(p.name for p in out.glob("*.npy"))
    assert done and len(done) < len(list((tmp_path / "passages").glob("*.parquet")))
    assert not (out / "embeddings.json").exists()
    before = {n: (out / n).stat().st_mtime_ns for n in done}

    counter = Counter()
    summary = embed_passages(Location(tmp_path / "passages"), Location(out), spec, progress=False, batch_size=4,
                             encoder_calls=counter)
    assert summary["skipped_shards"] == len(done)
    assert counter.passages == summary["encoded"] == len(rows) - sum(8 for _ in done)
    assert {n: (out / n).stat().st_mtime_ns for n in done} == before

    # Everything done: nothing is encoded. A damaged .npy is redone, and only that one.
    counter = Counter()
    again = embed_passages(Location(tmp_path / "passages"), Location(out), spec, progress=False, encoder_calls=counter)
    assert counter.passages == 0 and again["skipped_shards"] == len(again["shards"])
    good = np.load(out / "part-00001.npy")
    damaged = bytearray((out / "part-00001.npy").read_bytes())
    damaged[-1] ^= 0xFF
    (out / "part-00001.npy").write_bytes(bytes(damaged))
    counter = Counter()
    again = embed_passages(Location(tmp_path / "passages"), Location(out), spec, progress=False, encoder_calls=counter)
    assert counter.passages == 8 and again["skipped_shards"] == len(again["shards"]) - 1
    np.testing.assert_allclose(np.load(out / "part-00001.npy"), good, atol=1e-6)

    # Another encoder (same architecture, other weights) never counts as done.
    other = save_tiny_dpr_encoder(tmp_path / "other", "ctx", seed=99)
    counter = Counter()
    embed_passages(Location(tmp_path / "passages"), Location(out), EncoderSpec(str(other)), progress=False,
                   encoder_calls=counter)
    assert counter.passages == len(rows)


def _version_root(root: Path, articles: list[dict], spec: EncoderSpec, **kw) -> tuple[Path, list[dict]]:
    rows = write_passages(root / "passages", articles)
    embed_passages(Location(root / "passages"), Location(root / "embeddings"), spec, progress=False, **kw)
    return root, rows


def test_reuse_encodes_only_changed_passages(tmp_path, spec):
    articles = make_articles(30, seed=3)
    v1, rows1 = _version_root(tmp_path / "v1", articles, spec, precision="fp32")
    # 2 of 30 articles change (one edit at the end of the text, one new title), one new article arrives.
    changed = [dict(a) for a in articles]
    changed[4]["text"] += " fishing boat"
    changed[17]["title"] = "renamed article"
    changed.append({"page_id": 999, "rev_id": 5, "title": "new page", "text": "a brand new page about chess"})
    rows2 = write_passages(tmp_path / "v2" / "passages", changed)
    old = {r["content_hash"] for r in rows1}
    fresh = [r for r in rows2 if r["content_hash"] not in old]
    assert 0 < len(fresh) < len(rows2) // 5

    counter = Counter()
    summary = embed_passages(Location(tmp_path / "v2" / "passages"), Location(tmp_path / "v2" / "embeddings"), spec,
                             reuse_from=[Location(v1)], progress=False, encoder_calls=counter, precision="fp32")
    assert counter.passages == summary["encoded"] == len(fresh)
    assert summary["reused"] == len(rows2) - len(fresh)
    vectors2 = load_vectors(tmp_path / "v2" / "embeddings")
    vectors1 = load_vectors(v1 / "embeddings")
    where1 = {r["content_hash"]: r["row_id"] for r in rows1}
    for r in rows2:
        if r["content_hash"] in where1:
            np.testing.assert_array_equal(vectors2[r["row_id"]], vectors1[where1[r["content_hash"]]])
    encoder = load_document_encoder(spec, precision="fp32")
    np.testing.assert_allclose(vectors2[[r["row_id"] for r in fresh]],
                               encoder.encode([r["title"] for r in fresh], [r["text"] for r in fresh]), atol=2e-5)

    # Vectors made by another encoder are never reused.
    other = EncoderSpec(str(save_tiny_dpr_encoder(tmp_path / "other", "ctx", seed=5)))
    counter = Counter()
    summary = embed_passages(Location(tmp_path / "v2" / "passages"), Location(tmp_path / "v3"), other,
                             reuse_from=[Location(v1)], progress=False, encoder_calls=counter)
    assert counter.passages == len(rows2) and summary["reused"] == 0


def test_reuse_reads_rows_from_s3(tmp_path, spec, moto_server, s3_bucket):
    import s3fs

    articles = make_articles(8, seed=11)
    v1, rows1 = _version_root(tmp_path / "v1", articles, spec)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_server})
    fs.put(str(v1) + "/", f"{s3_bucket}/v1/", recursive=True)
    changed = [dict(a) for a in articles]
    changed[2]["text"] = "completely different words about music"
    rows2 = write_passages(tmp_path / "v2" / "passages", changed)
    counter = Counter()
    out = Location(f"s3://{s3_bucket}/v2/embeddings", moto_server)
    summary = embed_passages(Location(tmp_path / "v2" / "passages"), out, spec,
                             reuse_from=[Location(f"s3://{s3_bucket}/v1", moto_server)], progress=False,
                             encoder_calls=counter)
    assert counter.passages == 1 and summary["reused"] == len(rows2) - 1
    got = []
    for shard in summary["shards"]:
        with fs.open(f"{s3_bucket}/v2/embeddings/{shard['name']}", "rb") as f:
            got.append(np.load(f))
    vectors2, vectors1 = np.concatenate(got), load_vectors(v1 / "embeddings")
    where1 = {r["content_hash"]: r["row_id"] for r in rows1}
    reused = [(r["row_id"], where1[r["content_hash"]]) for r in rows2 if r["content_hash"] in where1]
    assert len(reused) == len(rows2) - 1
    np.testing.assert_array_equal(vectors2[[a for a, _ in reused]], vectors1[[b for _, b in reused]])


def test_find_reuse_sources_picks_newest_ready_versions_with_the_same_fingerprint(tmp_path, spec):
    store = IndexStore(str(tmp_path / "store"))
    fp = fingerprint_of(spec)
    other = fp.model_copy(update={"weights_sha256": "0" * 64})
    made = []
    for fingerprint, status in [(fp, "ready"), (fp, "rejected"), (other, "ready"), (fp, "ready"), (fp, "ready")]:
        vid = store.begin_version("enwiki", "20240101")
        source = SourceDump(wiki="enwiki", dump_date="20240101")
        store.commit_version(Manifest(version=vid, status=status, source=source, encoder=fingerprint,
                                      index=IndexInfo(spec="flat", factory="Flat", dim=32)))
        made.append(vid)
    assert find_reuse_sources(store, fp, limit=2) == [store.at(made[4]), store.at(made[3])]
    assert find_reuse_sources(store, fp) == [store.at(v) for v in (made[4], made[3], made[0])]
    assert find_reuse_sources(store, other.model_copy(update={"weights_sha256": "1" * 64})) == []


# -- bad input ---------------------------------------------------------------------------------------------


def _no_output(directory: Path) -> bool:
    """Nothing a later step could read, and no temp file left behind either."""
    return not directory.exists() or not os.listdir(directory)


def test_empty_shard_is_refused(tmp_path, spec):
    (tmp_path / "p").mkdir()
    pq.write_table(PASSAGE_SCHEMA.empty_table(), tmp_path / "p" / "part-00000.parquet")
    with pytest.raises(RagindexError, match=r"part-00000.parquet is empty"):
        embed_shard(Location(tmp_path / "p" / "part-00000.parquet"), Location(tmp_path / "out"), spec)
    assert _no_output(tmp_path / "out")


def test_wrong_schema_is_refused(tmp_path, spec):
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"row_id": [0], "title": ["a"], "body": ["b"]}), tmp_path / "p" / "part-00000.parquet")
    with pytest.raises(RagindexError, match=r"wrong schema: no column 'text'"):
        embed_passages(Location(tmp_path / "p"), Location(tmp_path / "out"), spec, progress=False)
    pq.write_table(pa.table({"row_id": ["0"], "title": ["a"], "text": ["b"], "content_hash": ["c"]}),
                   tmp_path / "p" / "part-00000.parquet")
    with pytest.raises(RagindexError, match=r"column 'row_id' is string, expected int64"):
        embed_passages(Location(tmp_path / "p"), Location(tmp_path / "out"), spec, progress=False)
    (tmp_path / "p" / "part-00000.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(RagindexError, match=r"not a readable Parquet file"):
        embed_passages(Location(tmp_path / "p"), Location(tmp_path / "out"), spec, progress=False)
    assert _no_output(tmp_path / "out")


def test_missing_or_unsupported_model_is_refused_before_any_output(tmp_path, tiny_dpr):
    write_passages(tmp_path / "p", make_articles(3))
    with pytest.raises(RagindexError, match=r"encoder model not found: .*nope"):
        embed_passages(Location(tmp_path / "p"), Location(tmp_path / "out"), EncoderSpec(str(tmp_path / "nope")))
    with pytest.raises(RagindexError, match=r"not a DPRContextEncoder"):
        embed_passages(Location(tmp_path / "p"), Location(tmp_path / "out"), EncoderSpec(str(tiny_dpr.question_dir)))
    with pytest.raises(RagindexError, match=r"passages directory not found: .*nothing"):
        embed_passages(Location(tmp_path / "nothing"), Location(tmp_path / "out"), EncoderSpec(str(tiny_dpr.ctx_dir)))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(RagindexError, match=r"no passage shards"):
        embed_passages(Location(tmp_path / "nothing"), Location(tmp_path / "out"), EncoderSpec(str(tiny_dpr.ctx_dir)))
    assert _no_output(tmp_path / "out")


def test_dimension_disagreeing_with_earlier_shards_is_refused(tmp_path, spec):
    write_passages(tmp_path / "p", make_articles(6), shard_rows=4)
    projected = EncoderSpec(str(save_tiny_dpr_encoder(tmp_path / "proj", "ctx", seed=3, projection_dim=16)))
    first = embed_shard(Location(tmp_path / "p" / "part-00000.parquet"), Location(tmp_path / "out"), spec,
                        progress=False)
    second = embed_shard(Location(tmp_path / "p" / "part-00001.parquet"), Location(tmp_path / "out"), projected,
                         progress=False)
    assert (first["dim"], second["dim"]) == (32, 16)
    with pytest.raises(RagindexError, match=r"part-00001.npy has dim 16, but part-00000.npy has 32"):
        write_embeddings_summary(Location(tmp_path / "out"), spec, [first, second], None, 1.0)
    assert not (tmp_path / "out" / "embeddings.json").exists()


def test_cli_embeds_and_reports_bad_input_as_one_line(tmp_path, tiny_dpr, capsys):
    from cli.main import main

    write_passages(tmp_path / "p", make_articles(4))
    main(["embed", "--passages", str(tmp_path / "p"), "--out", str(tmp_path / "out"), "--encoder",
          str(tiny_dpr.ctx_dir), "--encoder-kind", "dpr", "--batch-size", "3", "--threads", "1",
          "--precision", "fp32", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["encoded"] == summary["rows"] > 0 and summary["dim"] == 32

    shutil.rmtree(tmp_path / "out")
    with pytest.raises(SystemExit) as exc:
        main(["embed", "--passages", str(tmp_path / "p"), "--out", str(tmp_path / "out"),
              "--encoder", str(tmp_path / "missing-model")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: encoder model not found")
    assert _no_output(tmp_path / "out")


def test_cli_embed_compile_writes_the_eager_vectors(tmp_path, tiny_dpr, capsys):
    from cli.main import main

    write_passages(tmp_path / "p", make_articles(4))
    common = ["embed", "--passages", str(tmp_path / "p"), "--encoder", str(tiny_dpr.ctx_dir), "--encoder-kind",
              "dpr", "--batch-size", "3", "--precision", "fp32", "--json"]
    main([*common, "--out", str(tmp_path / "eager")])
    main([*common, "--out", str(tmp_path / "compiled"), "--compile"])
    capsys.readouterr()
    for eager in sorted((tmp_path / "eager").glob("part-*.npy")):
        np.testing.assert_allclose(np.load(tmp_path / "compiled" / eager.name), np.load(eager), atol=1e-5)
    with pytest.raises(SystemExit) as exc:
        main([*common, "--out", str(tmp_path / "ray"), "--compile", "--ray-address", "local"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compile is for a local embed" in err[0]
    assert _no_output(tmp_path / "ray")


def test_cli_reuses_vectors_from_a_store(tmp_path, spec, capsys):
    from cli.main import main

    store = IndexStore(str(tmp_path / "store"))
    vid = store.begin_version("enwiki", "20240101")
    root = Path(store.version_path(vid))
    articles = make_articles(6, seed=5)
    _version_root(root, articles, spec)
    store.commit_version(Manifest(version=vid, status="ready", source=SourceDump(wiki="enwiki", dump_date="20240101"),
                                  encoder=fingerprint_of(spec), index=IndexInfo(spec="flat", factory="Flat", dim=32)))
    articles[0]["text"] = "the only article that changed"
    rows = write_passages(tmp_path / "p2", articles)
    main(["embed", "--passages", str(tmp_path / "p2"), "--out", str(tmp_path / "out"), "--encoder", spec.model,
          "--chunker", "dpr", "--reuse-store", str(tmp_path / "store"), "--json"])  # write_passages cuts as dpr
    summary = json.loads(capsys.readouterr().out)
    assert (summary["encoded"], summary["reused"]) == (1, len(rows) - 1)


def test_the_measured_precision_choice_reaches_the_summary_and_the_manifest(tmp_path, tiny_dpr):
    from tasks import assemble_version

    spec = EncoderSpec(str(save_tiny_dpr_encoder(tmp_path / "enc", "ctx", seed=11)))  # not cached yet
    write_passages(tmp_path / "p", make_articles(6))
    summary = embed_passages(Location(tmp_path / "p"), Location(tmp_path / "emb"), spec, progress=False,
                             precision="auto")
    choice = summary["precision"]
    assert choice["requested"] == "auto"
    assert list(choice["passages_per_s"]) == ["fp32", "fp32-packed", "bf16", "bf16-autocast", "int8"]  # all measured
    assert choice["chosen"] in choice["passages_per_s"] and choice["cosines"]["fp32"] == 1.0
    # The fingerprint (and so reuse) does not depend on the choice.
    assert summary["fingerprint"] == fingerprint_of(spec).model_dump(mode="json")
    assert "precision" not in json.loads((tmp_path / "emb" / "part-00000.json").read_text())
    fp32 = embed_passages(Location(tmp_path / "p"), Location(tmp_path / "fp32"), spec, progress=False, precision="fp32")
    assert fp32["precision"] is None  # nothing was measured
    store = IndexStore(str(tmp_path / "store"))
    vid = store.begin_version("enwiki", "20240101")
    passages_summary = {"source": {"wiki": "enwiki", "dump_date": "20240101"}, "passages": summary["rows"]}
    summaries = ((layout.PASSAGES_SUMMARY_PATH, passages_summary), (layout.EMBEDDINGS_SUMMARY_PATH, summary))
    for relpath, record in summaries:
        target = Path(store.version_path(vid, relpath))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(record))
    draft = assemble_version.draft_manifest(store, vid, index=IndexInfo(spec="flat", factory="Flat", dim=32),
                                            timings={}, parent=None)
    assert draft.precision is not None and draft.precision.chosen == choice["chosen"]
    assert Manifest.model_validate_json(draft.to_json()).precision == draft.precision


def test_cli_embed_takes_normalisation_from_the_model(tmp_path, minilm_dir, capsys):
    from cli.main import main

    write_passages(tmp_path / "p", make_articles(3))
    main(["embed", "--passages", str(tmp_path / "p"), "--out", str(tmp_path / "out"), "--encoder", str(minilm_dir),
          "--encoder-kind", "mean", "--precision", "fp32", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["fingerprint"]["normalize"] is True and summary["fingerprint"]["max_length"] == 256
    np.testing.assert_allclose(np.linalg.norm(load_vectors(tmp_path / "out"), axis=1), 1.0, atol=1e-5)


def test_a_planted_passage_under_its_original_content_hash_is_encoded_not_reused(tmp_path, spec):
    """A work unit's file with one sentence edited and the original passage's content_hash kept (its record
    names the file's sha256, so it passes as the unit's output): assembly recomputes the hash from title and
    text, so the edited passage gets its own vector, never the original's. A shard whose hashes were changed
    after assembly is refused by embed."""
    v1, rows1 = _version_root(tmp_path / "v1", make_articles(12, seed=4), spec, precision="fp32")
    planted = [{k: v for k, v in r.items() if k != "row_id"} for r in rows1]
    victim = 5
    planted[victim]["text"] = "The treaty was never signed. " + planted[victim]["text"]
    unit = tmp_path / "work" / "unit-000000.parquet"
    unit.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(planted, schema=UNIT_SCHEMA), unit)
    record = UnitRecord(unit={"url": str(tmp_path / "enwiki-20240101-pages-articles.xml.bz2"), "ordinal": 0},
                        options="planted", ordinal=0, path=str(unit),
                        sha256=hashlib.sha256(unit.read_bytes()).hexdigest(), seen=12, kept=12,
                        passages=len(planted), words=sum(len(p["text"].split()) for p in planted), seconds=0.1)
    out = tmp_path / "v2" / "passages"
    assemble([record.dump()], Location(out), SourceDump(wiki="enwiki", dump_date="20240101", location=str(unit)))

    rows2 = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))]).to_pylist()
    assert [r["content_hash"] for r in rows2] == [content_hash(r["title"], r["text"]) for r in rows2]
    assert rows2[victim]["content_hash"] != rows1[victim]["content_hash"]
    counter = Counter()
    summary = embed_passages(Location(out), Location(tmp_path / "v2" / "embeddings"), spec, reuse_from=[Location(v1)],
                             progress=False, encoder_calls=counter, precision="fp32")
    assert counter.passages == summary["encoded"] == 1 and summary["reused"] == len(rows2) - 1
    vectors1, vectors2 = load_vectors(v1 / "embeddings"), load_vectors(tmp_path / "v2" / "embeddings")
    encoder = load_document_encoder(spec, precision="fp32")
    np.testing.assert_allclose(vectors2[victim], encoder.encode([rows2[victim]["title"]], [rows2[victim]["text"]])[0],
                               atol=2e-5)
    assert not np.allclose(vectors2[victim], vectors1[victim])

    shard = sorted(out.glob("part-*.parquet"))[0]
    table = pq.read_table(shard)
    hashes = table.column("content_hash").to_pylist()
    hashes[victim] = rows1[victim]["content_hash"]  # the original's hash put back after assembly
    pq.write_table(table.set_column(table.schema.get_field_index("content_hash"), "content_hash",
                                    pa.array(hashes, pa.string())), shard)
    with pytest.raises(RagindexError, match="content_hash that is not the hash of their title and text") as exc:
        embed_passages(Location(out), Location(tmp_path / "v3"), spec, reuse_from=[Location(v1)], progress=False)
    assert "\n" not in str(exc.value) and f"row {victim} " in str(exc.value)
