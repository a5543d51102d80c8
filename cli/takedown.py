"""`ragindex takedown`: take a page out of the served index in seconds, lift a takedown, list them."""

from __future__ import annotations

import json

import typer

from cli.options import StoreOption
from flows.settings import open_store
from storage import denylist
from storage.errors import NotFound, Rejected

app = typer.Typer()


@app.command("takedown")
def takedown(
    page: str = typer.Argument(None, help="Page id, or the exact title CURRENT serves (with --lift: a page id)."),
    reason: str | None = typer.Option(None, "--reason", help="Why (required to take down): kept in the "
                                                             "deny-list and the history."),
    lift: bool = typer.Option(False, "--lift", help="Lift PAGE's takedown: the next build holding it serves it."),
    list_all: bool = typer.Option(False, "--list", help="List every takedown, lifted ones included."),
    store_url: StoreOption = None,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Deny-list a page and make a version of CURRENT without it CURRENT at once (validated, promoted by
    compare-and-swap, recorded in the history with the reason); every later build leaves it out."""
    from tasks.takedown import lift as lift_takedown
    from tasks.takedown import take_down

    store = open_store(store_url, must_exist=True)
    if list_all:
        _print_list(store, as_json)
        return
    if not page:
        raise Rejected("give the page to take down: a page id or its exact title (or --list)")
    if lift:
        if not page.strip().isdigit():
            raise Rejected(f"--lift takes a page id, not {page!r} (see `ragindex takedown --list`)")
        lifted = lift_takedown(store, int(page), reason=reason)
        print(json.dumps(lifted.model_dump(mode="json"), indent=2) if as_json else
              f"lifted: {lifted.describe()}; the next build that holds the page serves it again")
        return
    result = take_down(store, page, reason or "")
    print(json.dumps(result.to_json(), indent=2) if as_json else f"taken down: {result.describe()} "
          f"in {result.seconds:.1f}s")


def _print_list(store, as_json: bool) -> None:
    pointer = store.current()
    if pointer is None:
        raise NotFound(f"{store.url} has no CURRENT version")
    wiki = store.manifest(pointer.version).source.wiki
    records = denylist.takedowns(store, wiki, include_lifted=True)
    if as_json:
        print(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
        return
    if not records:
        print(f"no takedowns in {wiki}")
    for r in records:
        lifted = f"; lifted by {r.lifted_by} at {r.lifted_at:%Y-%m-%d %H:%M:%S}Z" if r.lifted_at else ""
        print(f"{'active' if r.active else 'lifted'}  {r.describe()}{lifted}")
