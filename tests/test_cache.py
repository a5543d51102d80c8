"""The one local cache (storage.cache): content-keyed, verified once, bounded LRU that spares served
files, private to its user. Hashes are counted through the cache's `hasher` seam, not timed."""

from __future__ import annotations

import gc
import os
import stat

import pytest

from rag_model.index import VersionIndex
from storage.cache import FileCache, sha256_of_path
from storage.errors import Corrupt, RagindexError
from storage.store import IndexStore
from tests.fixtures.rag import TOPICS_A, TOPICS_B, build_version


class CountingHasher:
    def __init__(self) -> None:
        self.paths: list[str] = []

    def __call__(self, path: str) -> str:
        self.paths.append(path)
        return sha256_of_path(path)


def test_a_second_open_of_unchanged_files_hashes_nothing(store, tiny_question_encoder, tmp_path):
    served = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000, promote=True)
    hasher = CountingHasher()
    cache = FileCache.for_store(store.url, base=str(tmp_path / "cache"), hasher=hasher)
    first = VersionIndex.open(store, served.version, cache=cache, with_embeddings=True)
    files = len(hasher.paths)
    assert files >= 4  # index.faiss, passages.arrow, embeddings.json, a .npy shard: each hashed once
    second = VersionIndex.open(store, served.version, cache=cache, with_embeddings=True)
    assert len(hasher.paths) == files  # verified records trusted: nothing re-read
    assert second.size == first.size
    # A fresh cache object over the same directory (a restarted server) trusts the same records.
    again = FileCache.for_store(store.url, base=str(tmp_path / "cache"), hasher=hasher)
    VersionIndex.open(store, served.version, cache=again, with_embeddings=True)
    assert len(hasher.paths) == files
    if store.s3_endpoint_url:
        blobs = {name for _, name, _ in cache.blobs()}
        assert blobs == {store.manifest(served.version).files[r] for r in
                         ("index.faiss", "passages.arrow", "embeddings/embeddings.json", "embeddings/part-00000.npy")}


def test_a_changed_file_is_hashed_again_and_refused(tmp_path, tiny_question_encoder):
    store = IndexStore(str(tmp_path / "store"))
    served = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000, promote=True)
    hasher = CountingHasher()
    cache = FileCache.for_store(store.url, base=str(tmp_path / "cache"), hasher=hasher)
    VersionIndex.open(store, served.version, cache=cache)
    before = len(hasher.paths)
    path = store.version_path(served.version, "index.faiss")
    with open(path, "rb") as f:
        data = bytearray(f.read())
    st = os.stat(path)
    data[len(data) // 2] ^= 0x01
    with open(path, "r+b") as f:  # in place, same size, and the old mtime put back: only ctime tells
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(Corrupt, match="index.faiss"):
        VersionIndex.open(store, served.version, cache=cache)
    assert hasher.paths[before:] == [path]


def test_lru_eviction_beyond_the_bound_spares_served_files(tmp_path, moto_server, tiny_question_encoder):
    from tests.fixtures.s3 import make_bucket

    store = IndexStore(f"s3://{make_bucket(moto_server)}/store", s3_endpoint_url=moto_server)
    a = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000, promote=True)
    b = build_version(store, tiny_question_encoder, TOPICS_B, 2000, 6000)
    c = build_version(store, tiny_question_encoder, TOPICS_A[:4], 3000, 7000)
    cache = FileCache.for_store(store.url, base=str(tmp_path / "cache"), max_bytes=1)  # everything is over
    files = ("index.faiss", "passages.arrow")

    def digests(v: str) -> set[str]:
        m = store.manifest(v)
        return {m.files[r] for r in files}

    served_a = VersionIndex.open(store, a.version, cache=cache)
    opened_b = VersionIndex.open(store, b.version, cache=cache)
    cached = {name for _, name, _ in cache.blobs()}
    assert digests(a.version) | digests(b.version) <= cached  # both served: neither evicted, though over
    del opened_b
    gc.collect()  # b's last user is gone: its files are no longer pinned
    VersionIndex.open(store, c.version, cache=cache)
    cached = {name for _, name, _ in cache.blobs()}
    assert digests(a.version) <= cached and not digests(b.version) & cached
    assert served_a.search(tiny_question_encoder.encode(["paris"]), 1)[0]

    # Least recently used goes first: with room for about one version, the older of two unpinned goes.
    del served_a
    gc.collect()
    size_a = sum(size for _, name, size in cache.blobs() if name in digests(a.version))
    roomy = FileCache(cache.root, max_bytes=size_a + 16)
    VersionIndex.open(store, a.version, cache=roomy)  # a used last
    roomy.evict()
    cached = {name for _, name, _ in roomy.blobs()}
    assert digests(a.version) <= cached and not digests(c.version) & cached

    # Another live process serving a's files pins them for this one too; a dead one's pin is cleared.
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    index_sha = store.manifest(a.version).files["index.faiss"]
    arrow_sha = store.manifest(a.version).files["passages.arrow"]
    (tmp_path / "cache" / os.path.basename(cache.root) / "pins").mkdir(exist_ok=True)
    pins = os.path.join(cache.root, "pins")
    open(os.path.join(pins, f"{index_sha}.1"), "w").close()  # pid 1 is alive in any container
    open(os.path.join(pins, f"{arrow_sha}.{dead.pid}"), "w").close()
    tight = FileCache(cache.root, max_bytes=1)
    assert tight.evict() == [arrow_sha]
    assert {name for _, name, _ in tight.blobs()} == {index_sha}
    assert os.listdir(pins) == [f"{index_sha}.1"]


def test_cache_dirs_are_private_and_another_users_is_refused(tmp_path):
    cache = FileCache.for_store("s3://bucket/store", base=str(tmp_path / "base"))
    assert stat.S_IMODE(os.stat(cache.root).st_mode) == 0o700
    assert FileCache.for_store("s3://bucket/store", base=str(tmp_path / "base")).root == cache.root
    assert FileCache.for_store("s3://other/store", base=str(tmp_path / "base")).root != cache.root  # per store
    planted = tmp_path / "planted"
    planted.mkdir(mode=0o777)
    os.chown(planted, 4242, 4242)  # the tests run as root: a directory another user made
    with pytest.raises(RagindexError, match="owned by uid 4242"):
        FileCache(str(planted))
    with pytest.raises(RagindexError, match="owned by uid 4242"):
        FileCache.for_store("s3://bucket/store", base=str(planted))
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "base")
    with pytest.raises(RagindexError, match="not a plain directory"):
        FileCache(str(link))
