"""Locating an encoder model, checking its configuration, and fingerprinting its weights.

Everything `fingerprint_of` needs, without loading a network: the fingerprint names the exact
vectors a document encoder produces (model, revision, sha256 of the weights, dim, pooling,
normalisation, max length), so reuse, the up-to-date check and serving's swap check can compare
encoders before any weights are read. Running the model lives in `rag_model.encoders`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from fsspec.implementations.local import LocalFileSystem

from rag_model.st_config import read_st_config, resolve
from storage.errors import RagindexError, first_line
from storage.fs import file_digest
from storage.manifest import EncoderFingerprint

PAIR_FILE = "ragindex_pair.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


class EncoderError(RagindexError):
    """A model that cannot be loaded as the requested kind of encoder."""


@dataclass(frozen=True)
class EncoderSpec:
    model: str  # HF id or local directory
    kind: Literal["dpr", "mean"] = "dpr"
    # None: the model's own sentence-transformers config (mean kind), else False / 256.
    normalize: bool | None = None  # L2-normalise
    max_length: int | None = None
    revision: str | None = None
    chunker: str = "dpr"  # how the passages were cut (tasks.chunk): recorded in the fingerprint, never mixed


# -- locating a model and hashing its weights ---------------------------------------------------


def _looks_like_path(model: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else that is not a directory is a missing path."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


def resolve_model_dir(model: str, revision: str | None) -> tuple[Path, str | None]:
    """Local directory holding config, tokenizer and weights, and the revision it stands for.

    A local directory is used as is. An HF id goes through the hub cache (offline here), fetching
    only what loading needs: no TF/Flax weights.
    """
    if not model:
        raise EncoderError("no encoder model given")
    local = Path(model).expanduser()
    if local.is_dir():
        return local.resolve(), revision
    if local.exists() or _looks_like_path(model):
        raise EncoderError(f"encoder model not found: {model} (not a directory with a saved model)")
    return _hub_snapshot(model, revision)


@lru_cache(maxsize=16)
def _hub_snapshot(model: str, revision: str | None) -> tuple[Path, str | None]:
    """Once per process: every shard asks, and the hub need not be asked every time."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        snap = Path(snapshot_download(model, revision=revision,
                                      allow_patterns=["*.json", "*.txt", "*.safetensors"]))
        if not _weight_files(snap):
            snap = Path(snapshot_download(model, revision=revision,
                                          allow_patterns=["*.json", "*.txt", "pytorch_model*.bin"]))
    except HFValidationError:
        raise EncoderError(f"encoder model not found: {model} (neither a directory nor a model id)") from None
    except Exception as exc:  # offline, unknown repo, network: all mean "cannot get this model"
        raise EncoderError(f"cannot load encoder model {model!r}: {first_line(exc)}") from None
    return snap, snap.name  # hub snapshots are named by their commit


def _weight_files(directory: Path) -> list[Path]:
    files = [p for p in directory.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
             and not p.name.startswith(("training_args", "optimizer", "scheduler"))]
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    return sorted(safetensors or files)


def weights_signature(directory: Path) -> tuple:
    """Cheap identity of the weights on disk: a rewrite changes it, so caches reload."""
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in _weight_files(directory))


@lru_cache(maxsize=64)
def _sha256_files(paths: tuple[str, ...], signature: tuple) -> str:
    if len(paths) == 1:
        return _sha256_file(paths[0])
    digest = hashlib.sha256()
    for p in paths:  # sharded checkpoints: a hash of the per-file hashes, in name order
        digest.update(f"{os.path.basename(p)}:{_sha256_file(p)}\n".encode())
    return digest.hexdigest()


def _sha256_file(path: str) -> str:
    return file_digest(LocalFileSystem(), path)


def load_model_config(directory: Path, model: str) -> Any:
    from transformers import AutoConfig

    if not (directory / "config.json").is_file():
        raise EncoderError(f"encoder model {model}: no config.json, not a saved transformers model")
    try:
        return AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError, OSError) as exc:
        raise EncoderError(f"encoder model {model}: unreadable config ({first_line(exc)})") from None


def check_model_config(config: Any, kind: str, model: str, role: Literal["document", "question"]) -> None:
    """Refuse anything but the encoder the configuration asked for, before any weights load."""
    if kind not in ("dpr", "mean"):
        raise EncoderError(f"unsupported encoder kind {kind!r}: use 'dpr' or 'mean'")
    model_type = getattr(config, "model_type", "?")
    archs = list(getattr(config, "architectures", None) or [])
    if kind == "dpr":
        if model_type != "dpr":
            raise EncoderError(f"encoder model {model} is a {model_type!r} model, not a DPR encoder "
                               "(use --encoder-kind mean for sentence encoders)")
        want = "DPRContextEncoder" if role == "document" else "DPRQuestionEncoder"
        if archs and want not in archs:
            raise EncoderError(f"encoder model {model} is a {'/'.join(archs)}, not a {want}")
        return
    if getattr(config, "is_encoder_decoder", False):
        raise EncoderError(f"encoder model {model} is an encoder-decoder ({model_type!r}) model, "
                           "not a supported sentence encoder")
    decoderish = ("CausalLM", "LMHeadModel", "ForConditionalGeneration", "Seq2Seq")
    if getattr(config, "is_decoder", False) or any(a.endswith(decoderish) for a in archs):
        raise EncoderError(f"encoder model {model} is a decoder ({'/'.join(archs) or model_type}), "
                           "not a supported sentence encoder")
    if model_type == "dpr":
        raise EncoderError(f"encoder model {model} is a DPR encoder: use --encoder-kind dpr")
    if not getattr(config, "hidden_size", None):
        raise EncoderError(f"encoder model {model} ({model_type!r}) has no hidden_size: not an encoder")


def output_dim(config: Any, kind: str) -> int:
    if kind == "dpr" and getattr(config, "projection_dim", 0):
        return int(config.projection_dim)
    return int(config.hidden_size)


def _model_id(spec: EncoderSpec, directory: Path) -> str:
    return str(directory) if Path(spec.model).expanduser().is_dir() else spec.model


@lru_cache(maxsize=64)
def model_conventions(directory: Path, kind: str, model: str, normalize: bool | None,
                 max_length: int | None) -> tuple[str, bool, int]:
    """(pooling, normalize, max_length): for the mean kind the model's sentence-transformers config
    gives the defaults (pooling has no flag); DPR uses its pooler output. Cached: every shard asks,
    and a contradicting flag is worth one warning, not one per shard."""
    if kind == "dpr":
        return "pooler", bool(normalize), max_length or 256
    declared = read_st_config(directory)
    pooling = declared.pooling or "mean"
    if pooling not in ("mean", "cls", "max"):
        raise EncoderError(f"encoder model {model}: pooling {pooling!r} in its sentence-transformers config "
                           "is not supported (mean, cls or max)")
    return (pooling, *resolve(declared, model, normalize, max_length))


def fingerprint_of(spec: EncoderSpec) -> EncoderFingerprint:
    """The fingerprint of the vectors `spec` would produce, without running (or loading) the model."""
    directory, revision = resolve_model_dir(spec.model, spec.revision)
    config = load_model_config(directory, spec.model)
    check_model_config(config, spec.kind, spec.model, "document")
    pooling, normalize, max_length = model_conventions(directory, spec.kind, spec.model, spec.normalize,
                                                  spec.max_length)
    weights = _weight_files(directory)
    if not weights:
        raise EncoderError(f"encoder model {spec.model}: no weight files (*.safetensors / *.bin)")
    return EncoderFingerprint(
        model_id=_model_id(spec, directory),
        revision=revision,
        weights_sha256=_sha256_files(tuple(str(p) for p in weights), weights_signature(directory)),
        dim=output_dim(config, spec.kind),
        pooling=pooling,
        normalize=normalize,
        max_length=max_length,
        kind=spec.kind,
        chunker=spec.chunker,
    )


def paired_question_encoder(document_model: str, kind: str) -> str:
    """The question encoder trained with `document_model`.

    A symmetric (mean) encoder is its own pair. A DPR context encoder's pair is named by a
    `ragindex_pair.json` ({"question_encoder": id-or-path}) in its directory, or for hub ids by the
    DPR naming convention (ctx_encoder -> question_encoder).
    """
    if kind == "mean":
        return document_model
    if kind != "dpr":
        raise EncoderError(f"unsupported encoder kind {kind!r}: use 'dpr' or 'mean'")
    local = Path(document_model).expanduser()
    pair_file = local / PAIR_FILE
    if pair_file.is_file():
        try:
            named = json.loads(pair_file.read_text())["question_encoder"]
        except (ValueError, KeyError, TypeError):
            raise EncoderError(f"{pair_file}: expected {{\"question_encoder\": \"<id or path>\"}}") from None
        if not os.path.isabs(named) and (local / named).exists():
            return os.path.normpath(os.path.join(document_model, named))
        return named
    if "ctx_encoder" in document_model:
        return document_model.replace("ctx_encoder", "question_encoder")
    raise EncoderError(f"cannot tell which question encoder pairs with {document_model}: "
                       f"give --question-encoder, or put a {PAIR_FILE} in the model directory")
