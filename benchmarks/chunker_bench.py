"""Chunker benchmark over the real enwiki excerpt in the gensim wheel: for each chunker (`tasks.chunk.CHUNKERS`),
passages per article, passages re-embedded per single edit, and hit@1/hit@5/answer hit@5 on
`benchmarks/data/excerpt_questions.jsonl` with the offline MiniLM encoder the demo uses. Checks the issue's
floor: the `sections` chunker re-embeds at most 25% of what DPR-exact chunking re-embeds per edit, with hit@5
no lower.

An edit is made on an article's cleaned text (what the chunker sees): one sentence inserted before, deleted at,
or replaced at a random sentence of a random article (seeded); a passage is re-embedded when its content_hash
is not among the article's passages before the edit. The same edits are applied under every chunker.

    .venv/bin/python benchmarks/chunker_bench.py --edits 300
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flows.demo import gensim_excerpt, minilm_dir  # noqa: E402
from storage.location import Location  # noqa: E402
from tasks.chunk import CHUNKERS, chunk_article  # noqa: E402
from tasks.clean import CleanOptions, clean_wikitext, is_disambiguation  # noqa: E402
from tasks.parse import iter_pages  # noqa: E402

QUESTIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "excerpt_questions.jsonl")
_SENTENCE_END = re.compile(r"(?<=[.!?]) +")


def articles() -> dict[str, tuple[int, list[list[list[str]]]]]:
    """title -> (page_id, sections -> paragraphs -> sentences) of every article a build keeps."""
    options = CleanOptions.for_wiki("enwiki")
    kept = {}
    for page in iter_pages(Location(str(gensim_excerpt()))):
        if page.ns != 0 or page.redirect or page.model != "wikitext" or is_disambiguation(page.title, page.text,
                                                                                          options):
            continue
        sections = [[_SENTENCE_END.split(line) for line in body.split("\n")]
                    for _, body in clean_wikitext(page.text, options)]
        if sections:
            kept[page.title] = (page.page_id, sections)
    return kept


def text_of(sections: list[list[list[str]]]) -> str:
    """What `tasks.clean.clean_article` returns for these sections: paragraphs by lines, sections by blank lines."""
    return "\n\n".join("\n".join(" ".join(s) for s in paras if s) for paras in sections if any(paras))


def edited(sections: list[list[list[str]]], rng: random.Random, donor: str) -> tuple[str, list[list[list[str]]]]:
    """One edit at a random sentence: insert `donor` before it, delete it, or replace it with `donor`."""
    places = [(i, j, k) for i, paras in enumerate(sections) for j, sents in enumerate(paras)
              for k in range(len(sents))]
    i, j, k = rng.choice(places)
    kind = rng.choice(("insert", "delete", "replace"))
    copy = [[list(sents) for sents in paras] for paras in sections]
    sents = copy[i][j]
    if kind == "insert":
        sents.insert(k, donor)
    elif kind == "delete":
        del sents[k]
    else:
        sents[k] = donor
    return kind, copy


def hashes(page_id: int, title: str, text: str, chunker: str) -> list[str]:
    return [p["content_hash"] for p in chunk_article(page_id, 1, title, text, chunker=chunker)]


def retrieval(chunker: str, corpus: dict, questions: list[dict]) -> tuple[dict[str, float], int, float]:
    """hit@1 and hit@5 by title (a passage of the answering article among the top k), and answer hit@5 (one of
    the top 5 is of that article and holds the question's `evidence` words): the title is encoded with every
    passage, so the title hits alone hardly tell chunkers apart."""
    from rag_model.encoders import EncoderSpec, load_document_encoder, load_question_encoder

    titles, texts = [], []
    for title, (page_id, sections) in corpus.items():
        for p in chunk_article(page_id, 1, title, text_of(sections), chunker=chunker):
            titles.append(title)
            texts.append(p["text"])
    model = str(minilm_dir())
    start = time.perf_counter()
    doc = load_document_encoder(EncoderSpec(model=model, kind="mean", normalize=True), precision="fp32")
    vectors = doc.encode(titles, texts, batch_size=64)
    seconds = time.perf_counter() - start
    queries = load_question_encoder(model, "mean", normalize=True).encode([q["question"] for q in questions])
    top = np.argsort(-(queries @ vectors.T), axis=1)[:, :5]
    pairs = list(zip(questions, top, strict=True))
    scores = {
        "hit@1": np.mean([titles[row[0]] == q["title"] for q, row in pairs]),
        "hit@5": np.mean([any(titles[r] == q["title"] for r in row) for q, row in pairs]),
        "answer hit@5": np.mean([any(titles[r] == q["title"] and q["evidence"].lower() in texts[r].lower()
                                     for r in row) for q, row in pairs]),
    }
    return scores, len(texts), seconds


def compare(edit_count: int = 300, seed: int = 25, with_retrieval: bool = True) -> dict[str, dict[str, float]]:
    """Print the report (`main`'s) and return, per chunker: passages, per_article and per_edit (means), the
    retrieval scores (`with_retrieval`) and the number of questions they are over."""
    corpus = articles()
    with open(QUESTIONS, encoding="utf-8") as f:
        questions = [json.loads(line) for line in f if line.strip()]
    missing = sorted({q["title"] for q in questions} - corpus.keys())
    if missing:
        raise SystemExit(f"questions name articles the excerpt does not keep: {missing}")
    print(f"excerpt: {gensim_excerpt().name}: {len(corpus)} articles kept; {len(questions)} questions")

    rng = random.Random(seed)
    names = sorted(corpus)
    all_sentences = [s for _, sections in corpus.values() for paras in sections for sents in paras for s in sents
                     if len(s.split()) >= 8]
    edits = []
    for _ in range(edit_count):
        title = rng.choice(names)
        kind, after = edited(corpus[title][1], rng, rng.choice(all_sentences))
        edits.append((title, kind, after))

    results = {}
    for chunker in CHUNKERS:
        counts = [len(hashes(pid, t, text_of(s), chunker)) for t, (pid, s) in corpus.items()]
        per_edit, by_kind = [], {}
        for title, kind, after in edits:
            page_id, before = corpus[title]
            old = set(hashes(page_id, title, text_of(before), chunker))
            new = sum(1 for h in hashes(page_id, title, text_of(after), chunker) if h not in old)
            per_edit.append(new)
            by_kind.setdefault(kind, []).append(new)
        results[chunker] = {"per_edit": statistics.mean(per_edit), "per_article": statistics.mean(counts),
                            "passages": sum(counts), "questions": len(questions)}
        print(f"\n[{chunker}] passages {sum(counts)}; per article mean {statistics.mean(counts):.1f}, "
              f"median {statistics.median(counts):.0f}, max {max(counts)}")
        print(f"[{chunker}] re-embedded per edit over {len(edits)} edits: mean {statistics.mean(per_edit):.2f}, "
              f"median {statistics.median(per_edit):.0f}, p90 {np.percentile(per_edit, 90):.0f}; by kind: "
              + ", ".join(f"{k} {statistics.mean(v):.2f} (n={len(v)})" for k, v in sorted(by_kind.items())))
        if with_retrieval:
            scores, n, seconds = retrieval(chunker, corpus, questions)
            results[chunker].update(scores)
            print(f"[{chunker}] " + "; ".join(f"{k} {v:.3f} ({round(v * len(questions))}/{len(questions)})"
                                              for k, v in scores.items())
                  + f"; {n} passages embedded in {seconds:.1f} s")

    ratio = results["sections"]["per_edit"] / results["dpr"]["per_edit"]
    print(f"\nsections re-embeds {ratio:.1%} of dpr's passages per edit (floor: <= 25%)")
    if with_retrieval:
        for k in ("hit@5", "answer hit@5", "hit@1"):
            print(f"{k}: sections {results['sections'][k]:.3f} vs dpr {results['dpr'][k]:.3f}"
                  + (" (floor: no lower)" if k == "hit@5" else ""))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=300)
    ap.add_argument("--seed", type=int, default=25)
    ap.add_argument("--skip-retrieval", action="store_true")
    args = ap.parse_args()
    compare(args.edits, args.seed, not args.skip_retrieval)


if __name__ == "__main__":
    main()
