"""`ragindex embed`: passage shards -> embedding shards with the frozen document encoder."""

from __future__ import annotations

import json
from functools import partial
from typing import Annotated, Literal

import typer

from flows.settings import load_settings, open_store
from storage.errors import RagindexError
from storage.location import Location

app = typer.Typer()


@app.command("embed")
def embed(
    passages: Annotated[str, typer.Option("--passages", help="Passage shards directory (path, file:// or s3://).")],
    out: Annotated[str, typer.Option("--out", help="Output directory for the embedding shards.")],
    encoder: Annotated[str | None, typer.Option("--encoder", help="Document encoder: HF id or local directory.",
                                                show_default="settings: RAGINDEX_ENCODER")] = None,
    encoder_kind: Annotated[Literal["dpr", "mean"] | None, typer.Option(
        "--encoder-kind", help="dpr (pooler output) or mean (mean pooling).",
        show_default="settings: RAGINDEX_ENCODER_KIND")] = None,
    chunker: Annotated[Literal["dpr", "sections"] | None, typer.Option(
        "--chunker", help="How the passages were cut (recorded in the fingerprint; reuse only from its own).",
        show_default="settings: RAGINDEX_CHUNKER")] = None,
    normalize: Annotated[bool | None, typer.Option(
        "--normalize/--no-normalize", help="L2-normalise (default: the model's own config).")] = None,
    max_length: Annotated[int | None, typer.Option(
        "--max-length", min=8, help="Tokens per passage (default: the model's max_seq_length, else 256).")] = None,
    question_encoder: Annotated[str | None, typer.Option(
        "--question-encoder", help="Question encoder to record (default: the document encoder's pair).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Most passages per forward pass.")] = 64,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")] = "cpu",
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="Torch CPU threads.")] = None,
    precision: Annotated[Literal["auto", "fp32", "bf16", "fp16", "int8"], typer.Option(
        "--precision", help="auto: the fastest variant measured within tolerance of fp32.")] = "auto",
    compile_: Annotated[bool, typer.Option(
        "--compile", help="torch.compile the encoder first (DPR-base on 2 cores: 42-63 s, then fp32 ran "
        "within -1%..+15% of auto's fp32-packed): for big jobs.")] = False,
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="Encode as one Ray Data job on this cluster: auto, host:port, ray://host:port, "
        "or local (a GPU per actor where the cluster has GPUs).")] = None,
    reuse_store: Annotated[str | None, typer.Option(
        "--reuse-store", help="Reuse vectors of unchanged passages from this store's versions.")] = None,
    reuse_from: Annotated[list[str] | None, typer.Option(
        "--reuse-from", help="Reuse vectors from this version root (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Embed every passage shard; finished shards are skipped, unchanged passages reused."""
    from rag_model.encoders import EncoderSpec, fingerprint_of
    from tasks.embed import embed_passages, find_reuse_sources
    from tasks.embed_ray import embed_passages_ray

    settings = load_settings()
    spec = EncoderSpec(model=encoder or settings.encoder, kind=encoder_kind or settings.encoder_kind,
                       normalize=normalize, max_length=max_length, chunker=chunker or settings.chunker)
    sources = [Location(root, settings.s3_endpoint_url, settings.cache_config) for root in reuse_from or []]
    if reuse_store:
        store = open_store(reuse_store, settings)
        sources += find_reuse_sources(store, fingerprint_of(spec))
    if compile_ and ray_address:
        raise RagindexError("--compile is for a local embed; Ray actors load the encoder as it is")
    run = partial(embed_passages_ray, ray_address=ray_address) if ray_address else partial(embed_passages,
                                                                                         compile=compile_)
    summary = run(
        Location(passages, settings.s3_endpoint_url), Location(out, settings.s3_endpoint_url), spec,
        reuse_from=sources, question_encoder=question_encoder or settings.question_encoder, batch_size=batch_size,
        device=device, precision=precision, threads=threads, progress=True,
    )
    if as_json:
        print(json.dumps(summary))
        return
    typer.echo(
        f"embedded {summary['rows']} passages into {len(summary['shards'])} shards at {out}: "
        f"{summary['encoded']} encoded, {summary['reused']} reused, {summary['skipped_shards']} shards "
        f"already done; dim {summary['dim']}, {summary['timings']['embed_s']:.1f}s"
    )
