"""Nothing executable in the store: persisted Prefect task results are plain JSON, and a planted
pickle (or any record that is not plain JSON) is a cache miss that runs nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect.results import ResultRecord, ResultRecordMetadata, ResultStore
from prefect.serializers import JSONSerializer, PickleSerializer

from flows.results import UnsafeResult
from tests.fixtures.mirror import sample_pages


class _Planted:
    """Unpickling this creates the marker file: proof that code from the store ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def planted_pickle(key: str, marker: Path) -> bytes:
    """A result record exactly as Prefect's pickle serializer writes one, carrying a payload."""
    record = ResultRecord(metadata=ResultRecordMetadata(storage_key=key, serializer=PickleSerializer()),
                          result=_Planted(str(marker)))
    return record.serialize()


def _results_storage(store):
    """The storage `RefreshParams.result_storage` gives the flow, unsaved: this test talks to storage only."""
    from flows.results import JsonOnlyLocalResults, JsonOnlyRemoteResults

    base = store.path("prefect-results")
    if store.s3_endpoint_url is None:
        return JsonOnlyLocalResults(basepath=base)
    settings = {"client_kwargs": {"endpoint_url": store.s3_endpoint_url}}
    return JsonOnlyRemoteResults(basepath=f"s3://{base}", settings=settings)


def test_result_store_reads_json_records_and_never_a_planted_pickle(store, tmp_path):
    storage = _results_storage(store)
    results = ResultStore(result_storage=storage, serializer=JSONSerializer(), cache_result_in_memory=False)
    results.write(key="genuine", obj={"name": "part-00000.npy", "rows": 6})
    raw = json.loads(store.fs.cat_file(store.path("prefect-results", "genuine")))
    assert raw["metadata"]["serializer"]["type"] == "json"
    assert results.read("genuine").result == {"name": "part-00000.npy", "rows": 6}

    marker = tmp_path / "pwned"
    planted = {
        "pickle": planted_pickle("pickle", marker),
        "class-hint": ResultRecord(metadata=ResultRecordMetadata(storage_key="class-hint", serializer=JSONSerializer()),
                                   result={"x": {"__class__": "os.system", "data": "true"}}).serialize(),
        "garbage": b"\x80\x04not a record",
    }
    for key, data in planted.items():
        with store.fs.open(store.path("prefect-results", key), "wb") as f:
            f.write(data)
        assert not results.exists(key)  # a cache miss: the task would simply run again
        with pytest.raises(UnsafeResult):
            results.read(key)
    assert not marker.exists()


def test_a_planted_pickle_runs_nothing_and_the_resumed_refresh_succeeds(prefect_api, mirror, tiny_dpr, tmp_path,
                                                                       monkeypatch):
    import tasks.embed
    from flows.refresh import StepFailed, refresh_index
    from storage.store import IndexStore

    mirror.add_run("eswiki", "20240101", sample_pages(14), parts=2)
    common = dict(store_url=str(tmp_path / "store"), encoder=str(tiny_dpr.ctx_dir), encoder_kind="dpr",
                  index_spec="flat", shard_rows=6, allow_count_change=True)
    real_embed_shard = tasks.embed.embed_shard

    def dies_in_third_shard(shard_url, *args, **kwargs):
        if str(shard_url).endswith("part-00002.parquet"):
            raise RuntimeError("worker lost in the third shard")
        return real_embed_shard(shard_url, *args, **kwargs)

    monkeypatch.setattr(tasks.embed, "embed_shard", dies_in_third_shard)
    with pytest.raises(StepFailed):
        refresh_index(wiki="eswiki", dump_date="latest", mirror=mirror.url, **common)
    monkeypatch.setattr(tasks.embed, "embed_shard", real_embed_shard)

    store = IndexStore(common["store_url"])
    records = sorted(Path(store.path("prefect-results")).iterdir())
    assert records, "the crashed run persisted its finished shards' results"
    assert {json.loads(r.read_bytes())["metadata"]["serializer"]["type"] for r in records} == {"json"}
    marker = tmp_path / "pwned"
    for r in records:  # whoever can write the store replaces every cached result
        r.write_bytes(planted_pickle(r.name, marker))

    resumed = refresh_index(wiki="eswiki", dump_date="latest", mirror=mirror.url, **common)
    assert not marker.exists()
    assert resumed["status"] == "promoted" and resumed["counts"]["shards_resumed"] == 0  # misses, not loads
    assert store.current().version == resumed["version"]
