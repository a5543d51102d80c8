"""`ragindex versions` fits the terminal it prints to: 80 columns hold what an operator acts on, with
every version id whole; a wider terminal shows more."""

from __future__ import annotations

import pytest
from rich.cells import cell_len

from flows.settings import load_settings
from storage.fs import atomic_write
from storage.store import IndexStore
from tests.fixtures.versions import commit_delta
from tests.test_cli_store import run
from tests.test_store import commit_stub


@pytest.fixture
def listed(tmp_path, monkeypatch):
    """A store holding every kind of row: CURRENT (a delta), previous, pinned, rejected and corrupt."""
    url = str(tmp_path / "store")
    monkeypatch.setenv("RAGINDEX_STORE_URL", url)
    load_settings.cache_clear()
    store = IndexStore(url)
    full, rejected, unreadable = commit_stub(store), commit_stub(store, status="rejected"), commit_stub(store)
    delta = commit_delta(store, full, ["20240102", "20240103", "20240104"], passages=3)
    with atomic_write(store.fs, store.version_path(unreadable, "manifest.json")) as f:
        f.write(b"[1, 2")
    store.promote(full)
    store.promote(delta)
    store.pin(full)
    yield {"full": full, "rejected": rejected, "corrupt": unreadable, "delta": delta}
    load_settings.cache_clear()


def versions_at(width: int, monkeypatch, capsys) -> list[str]:
    monkeypatch.setenv("COLUMNS", str(width))
    code, out, err = run(["versions"], capsys)
    assert code == 0, err
    return out.splitlines()


def row_of(lines: list[str], version: str) -> str:
    """The one line that holds `version`, whole (a wrapped or cut id would not be found)."""
    found = [line for line in lines if version in line.split()]
    assert len(found) == 1, (version, "\n".join(lines))
    return found[0]


@pytest.mark.parametrize("width", [80, 100])
def test_an_80_column_terminal_gets_the_essential_columns_with_whole_ids(listed, monkeypatch, capsys, width):
    lines = versions_at(width, monkeypatch, capsys)
    assert max(cell_len(line) for line in lines) <= width, "\n".join(lines)
    header = next(line for line in lines if "version" in line.split())
    assert header.split() == ["version", "status", "passages", "mode", "size"]
    delta = row_of(lines, listed["delta"])
    assert delta.startswith("CURRENT") and {"ready", "delta"} <= set(delta.split()) and "3 (3 own)" in delta
    full = row_of(lines, listed["full"])
    assert full.startswith("previous") and {"ready", "1", "full"} <= set(full.split())
    assert "pinned" in "\n".join(lines)
    assert "rejected" in row_of(lines, listed["rejected"]).split()
    assert "corrupt" in row_of(lines, listed["corrupt"]).split()
    assert any("manifest unreadable" in line for line in lines)  # and where, below the table


def test_a_wider_terminal_shows_more_columns(listed, monkeypatch, capsys):
    lines = versions_at(120, monkeypatch, capsys)
    assert max(cell_len(line) for line in lines) <= 120, "\n".join(lines)
    header = next(line for line in lines if "version" in line.split()).split()
    assert header == ["version", "status", "passages", "mode", "index", "size", "shared", "created"]
    assert "flat" in row_of(lines, listed["full"])

    lines = versions_at(200, monkeypatch, capsys)
    assert max(cell_len(line) for line in lines) <= 200, "\n".join(lines)
    assert "lineage" in next(line for line in lines if "version" in line.split()).split()
    assert f"delta of {listed['full']} (base 20240101" in row_of(lines, listed["delta"])
