"""One index-spec grammar: `ragindex build` and the refresh flow's parameters accept and refuse the same specs."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.params import RefreshParams
from flows.settings import Settings
from storage.errors import Rejected
from storage.location import Location
from storage.store import IndexStore
from tasks.build_index import build_index
from tests.fixtures.versions import clustered_vectors, fingerprint_for, random_passages, write_version_inputs

ACCEPTED = ["auto", "flat", "hnsw", "hnsw:M=16", "hnsw:M=8,efConstruction=40", "ivfsq:bits=8", "ivfpq:m=4,nbits=4",
            "IVF4,Flat", "HNSW16", "Flat"]
REFUSED = ["bogus", "hnsw:M=x", "hnsw:M", "hnsw:M=16,ef=3", "flat:x=1", "ivfsq:bits=5", "ivfpq:foo=1", "auto:x=1"]


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> tuple[IndexStore, str]:
    store = IndexStore(str(tmp_path_factory.mktemp("store")))
    vid = store.begin_version("enwiki", "20240101")
    write_version_inputs(store, vid, random_passages(400), clustered_vectors(400, 16), fingerprint_for(16))
    return store, vid


def flow_accepts(spec: str, tmp_path) -> bool:
    try:
        RefreshParams.from_flow(Settings(), index_spec=spec, store_url=str(tmp_path / "store"))
    except ValidationError as exc:
        assert "index spec" in str(exc)
        return False
    return True


def build_accepts(spec: str, embeddings, tmp_path) -> bool:
    store, vid = embeddings
    try:
        build_index(store.at(vid, "embeddings"), Location(str(tmp_path / "index.faiss")), spec=spec, progress=False)
    except Rejected as exc:
        assert "index spec" in str(exc) and "\n" not in str(exc)
        return False
    return True


@pytest.mark.parametrize("spec", ACCEPTED + REFUSED)
def test_build_and_refresh_agree_on_every_spec(spec, embeddings, tmp_path):
    expected = spec in ACCEPTED
    assert flow_accepts(spec, tmp_path) is expected
    assert build_accepts(spec, embeddings, tmp_path) is expected
