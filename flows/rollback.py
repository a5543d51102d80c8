"""The `rollback-index` flow: point CURRENT back at an earlier ready version."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.report import emit_promoted
from flows.settings import load_settings, open_store
from tasks.promote import rollback_version


@flow(name="rollback-index", log_prints=True, validate_parameters=True)
def rollback_index(version: str | None = None, store_url: str | None = None, reason: str | None = None) -> dict:
    """Roll serving back to `version` (default: the version before CURRENT).

    A missing or rejected version is refused and CURRENT stays as it was. The version left is held:
    no automatic refresh promotes anything until `ragindex resume` (or refresh-index `resume=true`).
    """
    store = open_store(store_url, load_settings())
    before = store.current()
    pointer = rollback_version(store, version, actor="rollback-index", reason=reason or "rollback-index flow")
    emit_promoted(pointer, store.url, rollback=True)
    create_markdown_artifact(
        "\n".join([
            "# rollback-index",
            "",
            f"- **from**: `{before.version if before else None}`",
            f"- **to**: `{pointer.version}`",
            f"- **generation**: {pointer.generation}",
            f"- **store**: `{store.url}`",
            *([f"- **hold**: {pointer.hold.describe()}; automatic refreshes promote nothing until "
               "`ragindex resume`"] if pointer.hold else []),
        ]),
        key="rollback-index-report",
        description=f"rolled back to {pointer.version}",
    )
    print(f"rollback-index: CURRENT is now {pointer.version} (generation {pointer.generation})")
    if pointer.hold:
        print(f"rollback-index: {pointer.hold.describe()}; automatic refreshes promote nothing until `ragindex resume`")
    return pointer.model_dump(mode="json")
