"""Input edges: names, atomic writes on S3, oversized passages, XML encodings, dump sources, downloads."""

from __future__ import annotations

import pytest

from storage import names
from storage.errors import InvalidName
from storage.fs import atomic_write


@pytest.mark.parametrize("bad", [".", "..", "enwiki-20240101-20240101t000000z\n", "x\n", "a\nb"])
def test_version_and_file_names_match_the_whole_string(bad):
    with pytest.raises(InvalidName):
        names.check_version_id(bad)
    with pytest.raises(InvalidName):
        names.check_file_name(bad)


@pytest.mark.parametrize("check, bad", [(names.check_wiki, "enwiki\n"), (names.check_dump_date, "20240101\n")])
def test_wiki_and_date_refuse_a_trailing_newline(check, bad):
    with pytest.raises(InvalidName):
        check(bad)


def test_atomic_write_leaves_nothing_when_the_writer_raises(store):
    path = store.path("downloads", "half.bin")
    with pytest.raises(RuntimeError), atomic_write(store.fs, path) as f:
        f.write(b"x" * 1000)
        raise RuntimeError("writer died")
    assert not store.fs.exists(path)
    with atomic_write(store.fs, path) as f:
        f.write(b"whole")
    assert store.fs.cat_file(path) == b"whole"
