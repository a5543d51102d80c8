"""Frozen document and question encoders: DPR (pooler output) and symmetric mean-pooling encoders.

The document encoder is never trained here: RAG keeps it frozen, so the vectors of a passage depend
only on the passage and the exact weights. That is what the fingerprint records, and what lets a
new index plug into an already-trained question encoder and generator, and lets later versions reuse
earlier vectors by content hash.

The kind (`dpr` or `mean`) always comes from configuration; nothing is guessed from a model's name.

A little over ~450 lines: the question side (its loader and `question_encoder_for`, the one way to get
the question encoder a version's vectors are asked with) stays beside the document side whose
fingerprint it must match; model files, batching and precision are already modules of their own.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rag_model import precision as _precision
from rag_model.batching import default_threads, largest_fitting, prefetch, token_budget_batches
from rag_model.encoder_files import (
    EncoderError,
    EncoderSpec,
    check_model_config,
    fingerprint_of,
    load_model_config,
    output_dim,
    paired_question_encoder,
    resolve_model_dir,
    weights_signature,
)
from rag_model.packed_linear import pack_linears
from rag_model.precision import MIN_PRECISION_COSINE, PRECISIONS, Timer
from rag_model.st_config import SentenceTransformerConfig, read_st_config
from storage.errors import RagindexError, first_line
from storage.manifest import EncoderFingerprint, PrecisionChoice

log = logging.getLogger(__name__)

__all__ = ["MIN_PRECISION_COSINE", "PRECISIONS", "DocumentEncoder", "EncoderSpec", "QuestionEncoder",
           "fingerprint_of", "load_document_encoder", "load_question_encoder", "paired_question_encoder",
           "question_encoder_for"]

# Padded tokens per forward pass on CPU: big enough for efficient matmuls, small enough that the
# attention scores of a long batch stay in cache-friendly sizes; a GPU measures its own.
CPU_TOKEN_BUDGET = 8192
TOKENIZE_GROUP = 512  # rows tokenized at once by the prefetch thread

# Short, varied English text: enough to exercise attention over real lengths at load time.
_PROBE = [
    ("Paris", "Paris is the capital and most populous city of France, on the river Seine."),
    ("Photosynthesis", "Plants use light, water and carbon dioxide to make sugars and release oxygen."),
    ("Jazz", "Jazz is a music genre that originated in New Orleans in the late 19th century."),
    ("Mount Everest", "Mount Everest is the highest mountain above sea level, in the Himalayas."),
    ("Python", "Python is a programming language that emphasises readable code and indentation."),
    ("Rome", "The Roman Empire ruled the Mediterranean for centuries before its western half fell."),
    ("Moon", "The Moon orbits the Earth about every 27 days and causes the ocean tides."),
    ("Chess", "Chess is a board game for two players played on a checkered board of 64 squares. " * 3),
]


# -- running a model ---------------------------------------------------------------------------


def _load_tokenizer(directory: Path, model: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as exc:  # a missing or broken tokenizer surfaces as many exception types
        raise EncoderError(f"encoder model {model}: cannot load its tokenizer ({first_line(exc)})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise EncoderError(f"encoder model {model}: needs a fast tokenizer (tokenizer.json or vocab.txt)")
    return tokenizer


def _load_weights(cls: Any, directory: Path, model: str) -> torch.nn.Module:
    try:
        net, info = cls.from_pretrained(directory, output_loading_info=True, dtype=torch.float32)
    except Exception as exc:
        raise EncoderError(f"encoder model {model}: cannot load weights ({first_line(exc)})") from None
    # Missing weights mean random vectors that look fine; refuse instead (e.g. a question encoder
    # directory loaded as a context encoder). A pooler the mean kind does not use may be absent.
    missing = [k for k in info.get("missing_keys", ()) if "pooler" not in k]
    if missing:
        raise EncoderError(f"encoder model {model}: {len(missing)} weights missing (e.g. {missing[0]}); "
                           "not a model of the expected kind")
    net.eval()
    net.requires_grad_(False)
    return net


_CAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_AUTOCAST = {"bf16-autocast": torch.bfloat16, "fp16-autocast": torch.float16}


def _compiled(net: torch.nn.Module) -> torch.nn.Module:
    """The network through torch.compile (inductor, dynamic shapes) with its weights frozen into the
    graph: the encoder is never trained, so the compiler may pre-pack and fold them."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # read when a graph compiles, so it must stay set for recompiles too
    return torch.compile(net, dynamic=True)


def _int8_dynamic(net: torch.nn.Module) -> torch.nn.Module:
    """A copy whose Linear layers run int8 (weights quantized per output channel, activations per
    batch at run time; fbgemm's VNNI kernels where the CPU has them). Everything else stays fp32."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    # torch.ao.quantization warns that it moves to torchao; it is what torch 2.13 (our pin) runs fast.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(copy.deepcopy(net), {torch.nn.Linear: per_channel_dynamic_qconfig})


class _Encoder:
    """Tokenize (fast, batched, in a prefetch thread), length-sort, pad per token-budget batch,
    forward, pool; output in input order."""

    _pairs = True  # documents are (title, text) pairs; questions single sequences
    dim: int

    def __init__(self, net: torch.nn.Module, tokenizer: Any, pooling: str, normalize: bool, max_length: int,
                 device: str) -> None:
        self.net = net
        self.tokenizer = tokenizer
        self.pooling = pooling  # pooler (DPR) / mean / cls / max
        self.normalize = normalize
        self.max_length = max_length
        self.device = torch.device(device)
        # fp32 | fp32-packed (CPU) | bf16 / fp16 (weights and activations cast) | bf16-autocast |
        # fp16-autocast | int8 (CPU)
        self.precision = "fp32"
        self._autocast: torch.dtype | None = None
        self.precision_cosine: float | None = None
        self.precision_choice: PrecisionChoice | None = None  # the measurements, when candidates were timed
        self.max_tokens = CPU_TOKEN_BUDGET
        self.passages_encoded = 0  # how many inputs went through the network: lets callers count work
        self.compile_s: float | None = None  # seconds torch.compile took, when the network was compiled
        self._lock = threading.Lock()  # the counter is shared by serving threads

    def _tokenize(self, first: Sequence[str], second: Sequence[str] | None) -> dict[str, list[list[int]]]:
        # truncation=True is longest_first, what DPR itself used: the (longer) text gets cut, the title
        # kept; unlike only_second it cannot fail on a pathological title longer than max_length.
        if second is None:
            return self.tokenizer(list(first), truncation=True, max_length=self.max_length)
        return self.tokenizer(list(first), list(second), truncation=True, max_length=self.max_length)

    def _forward(self, net: torch.nn.Module, autocast: torch.dtype | None, ids: torch.Tensor,
                 mask: torch.Tensor, padded: bool = True) -> torch.Tensor:
        # No token_type_ids: the model's default, all zeros, is what DPR was trained with (its
        # generate_dense_embeddings passes zero segments) and what single-sequence sentence encoders saw.
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=autocast or torch.float32,
                                                    enabled=autocast is not None):
            # An all-ones mask changes nothing but keeps attention off its unmasked fast path.
            out = net(input_ids=ids, attention_mask=mask if padded else None)
            if self.pooling == "pooler":
                vec = out.pooler_output.float()
            else:
                hidden = out.last_hidden_state.float()
                m = mask.unsqueeze(-1).to(hidden.dtype)
                if self.pooling == "cls":
                    vec = hidden[:, 0]
                elif self.pooling == "max":  # sentence-transformers: padding set to -1e9 first
                    vec = hidden.masked_fill(m == 0, -1e9).max(1).values
                else:
                    vec = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
            if self.normalize:
                vec = torch.nn.functional.normalize(vec, dim=-1)
        return vec

    def _batches(self, first: Sequence[str], second: Sequence[str] | None,
                 max_rows: int) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """(row indices, ids, mask) per batch, longest first.

        Rows are ordered by character length (cheap, before tokenizing), then tokenized a group at a
        time and cut into token-budget batches by their true token lengths, so tokenizing the next
        group can overlap the forward pass of this one.
        """
        chars = np.fromiter((len(a) + (len(b) if second is not None else 0)
                             for a, b in zip(first, second if second is not None else first, strict=True)),
                            dtype=np.int64, count=len(first))
        order = np.argsort(-chars, kind="stable")
        pad_id = self.tokenizer.pad_token_id or 0
        pin = self.device.type == "cuda"
        for start in range(0, len(order), TOKENIZE_GROUP):
            group = order[start:start + TOKENIZE_GROUP]
            input_ids = self._tokenize([first[i] for i in group],
                                       [second[i] for i in group] if second is not None else None)["input_ids"]
            lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(group))
            for idx in token_budget_batches(lengths, max_rows, self.max_tokens):
                width = int(lengths[idx[0]])
                ids = np.full((len(idx), width), pad_id, dtype=np.int64)
                mask = np.zeros((len(idx), width), dtype=np.int64)
                for r, i in enumerate(idx):
                    ids[r, :lengths[i]] = input_ids[i]
                    mask[r, :lengths[i]] = 1
                ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
                if pin:  # page-locked host memory: the copy to the GPU runs asynchronously
                    ids_t, mask_t = ids_t.pin_memory(), mask_t.pin_memory()
                yield group[idx], ids_t, mask_t

    def _run(self, first: Sequence[str], second: Sequence[str] | None, batch_size: int,
             on_batch: Callable[[int], None] | None = None,
             variant: tuple[torch.nn.Module, torch.dtype | None] | None = None) -> np.ndarray:
        net, autocast = variant or (self.net, self._autocast)
        always_mask = isinstance(net, torch._dynamo.eval_frame.OptimizedModule)
        n = len(first)
        out = np.empty((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        if batch_size < 1:
            raise RagindexError(f"batch size must be at least 1, got {batch_size}")
        # On a GPU the measured token budget alone sets the batch: the largest that fits.
        max_rows = batch_size if self.device.type != "cuda" else self.max_tokens
        for idx, ids, mask in prefetch(self._batches(first, second, max_rows)):
            # A compiled network always gets the mask: one graph for every batch, not a second for unpadded ones.
            vec = self._forward(net, autocast, ids.to(self.device, non_blocking=True),
                                mask.to(self.device, non_blocking=True),
                                padded=always_mask or bool((mask == 0).any()))
            out[idx] = vec.cpu().numpy()
            with self._lock:
                self.passages_encoded += len(idx)
            if on_batch is not None:
                on_batch(len(idx))
        return out

    def _variant(self, name: str) -> tuple[torch.nn.Module, torch.dtype | None]:
        if name == "int8":
            return _int8_dynamic(self.net), None
        if name == "fp32-packed":
            return pack_linears(self.net), None
        if name in _CAST:
            return copy.deepcopy(self.net).to(_CAST[name]), None
        return self.net, _AUTOCAST.get(name)

    def with_precision(self, name: str) -> _Encoder:
        """A copy running variant `name` (fp32, bf16, bf16-autocast, ...) as is, unmeasured: for
        benchmarks that compare the variants. Call it on an fp32 encoder."""
        if self.precision != "fp32":
            raise RagindexError(f"with_precision needs an fp32 encoder, this one runs {self.precision}")
        other = copy.copy(self)
        other.net, other._autocast = self._variant(name)
        other.precision, other.precision_cosine, other.precision_choice = name, None, None
        other._lock = threading.Lock()
        return other

    def choose_precision(self, requested: str, timer: Timer | None = None, compiling: bool = False) -> None:
        """Run in the fastest precision whose probe vectors stay within tolerance of fp32.

        Every candidate (fp32; fp32-packed, bf16 cast, bf16 autocast and int8 on CPU; fp16 cast,
        fp16 and bf16 autocast on CUDA) is timed on the probe batch after a warm-up pass; `timer`
        replaces the wall clock (tests inject timings through it). `compiling`: the chosen variant
        goes through torch.compile next (which packs weights itself: fp32-packed is not measured).
        """
        cuda = self.device.type == "cuda"
        names = _precision.candidates(requested, self.device.type,
                                      cuda_bf16=cuda and torch.cuda.is_bf16_supported(), compiling=compiling)
        if len(names) > 1:
            built: dict[str, tuple[torch.nn.Module, torch.dtype | None]] = {}

            def probe(name: str, rows: int = len(_PROBE)) -> np.ndarray:
                if name not in built:
                    built[name] = self._variant(name)
                return self._probe(built[name], rows)

            choice = _precision.choose(requested, names, probe, len(_PROBE), timer or _precision.wall_clock,
                                       warm_up=probe)
            self.net, self._autocast = built[choice.chosen]
            self.precision, self.precision_cosine, self.precision_choice = choice.chosen, choice.cosine, choice
            built.clear()  # drop the variants not chosen
        if cuda:
            self.max_tokens = largest_fitting(self._try_tokens, start=1 << 17, floor=self.max_length * 8)
            log.info("GPU token budget: %d tokens per forward pass", self.max_tokens)

    def compile(self) -> None:
        """Run the chosen variant through torch.compile from now on, paying the compile here: on the
        probe batch and on a single row (batch size 1 is a graph of its own), so encoding never stops
        to compile. For big jobs, and not by much: on a 2-core EPYC DPR-base took 42-63 s to compile, then
        ran fp32 within -1%..+15% of auto's fp32-packed (the compiler packs the same weights, fuses a little more)."""
        started = time.perf_counter()
        self.net = _compiled(self.net)
        for rows in (len(_PROBE), 1):
            self._probe((self.net, self._autocast), rows)
        self.compile_s = round(time.perf_counter() - started, 3)
        log.info("document encoder compiled in %.1fs", self.compile_s)

    def _try_tokens(self, tokens: int) -> None:
        """One forward pass of `tokens` tokens at full width, with 20% headroom for fragmentation."""
        rows = max(1, int(tokens * 1.2) // self.max_length)
        ids = torch.full((rows, self.max_length), self.tokenizer.pad_token_id or 0, dtype=torch.long,
                         device=self.device)
        self._forward(self.net, self._autocast, ids, torch.ones_like(ids))
        torch.cuda.synchronize(self.device)

    def _probe(self, variant: tuple[torch.nn.Module, torch.dtype | None], rows: int = len(_PROBE)) -> np.ndarray:
        """Vectors of a fixed probe batch (its first `rows`) under one precision variant (not counted as work)."""
        titles = [t for t, _ in _PROBE[:rows]]
        texts = [x for _, x in _PROBE[:rows]]
        first, second = (titles, texts) if self._pairs else ([f"{t}. {x}" for t, x in _PROBE[:rows]], None)
        vectors = self._run(first, second, batch_size=len(_PROBE), variant=variant)
        with self._lock:
            self.passages_encoded -= rows
        return vectors


class DocumentEncoder(_Encoder):
    """The frozen passage encoder: (title, text) pairs -> float32 vectors, in input order."""

    def __init__(self, spec: EncoderSpec, fingerprint: EncoderFingerprint, net: torch.nn.Module, tokenizer: Any,
                 device: str) -> None:
        # The fingerprint holds the conventions as resolved (flags over the model's own config).
        super().__init__(net, tokenizer, fingerprint.pooling, fingerprint.normalize, fingerprint.max_length, device)
        self.spec = spec
        self.fingerprint = fingerprint
        self.dim = fingerprint.dim

    def encode(self, titles: Sequence[str], texts: Sequence[str], batch_size: int = 64,
               on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """float32 [n, dim]: row i is passage i, whatever order the batches ran in.

        Both kinds see the tokenizer's pair encoding, `[CLS] title [SEP] text [SEP]` for BERT.
        """
        if len(titles) != len(texts):
            raise RagindexError(f"{len(titles)} titles but {len(texts)} texts")
        return self._run(titles, texts, batch_size, on_batch)


class QuestionEncoder(_Encoder):
    """The question side: questions -> float32 vectors comparable with the document vectors."""

    _pairs = False

    def __init__(self, model_id: str, kind: str, net: torch.nn.Module, tokenizer: Any, dim: int,
                 normalize: bool, max_length: int, device: str, pooling: str | None = None) -> None:
        pooling = pooling or ("pooler" if kind == "dpr" else "mean")
        super().__init__(net, tokenizer, pooling, normalize, max_length, device)
        self.model_id = model_id
        self.dim = dim

    @property
    def model(self) -> torch.nn.Module:
        """For dpr, the DPRQuestionEncoder itself (what RAG uses as its question_encoder)."""
        return self.net

    def encode(self, questions: Sequence[str], batch_size: int = 64) -> np.ndarray:
        return self._run(list(questions), None, batch_size)


def _set_threads(threads: int | None) -> None:
    """Intra-op threads as given, else the physical cores: a hyperthread sibling shares the core's
    vector units, so matmuls gain nothing from it and lose to the extra synchronisation."""
    if threads is None:
        threads = default_threads(torch.get_num_threads())
    if threads < 1:
        raise RagindexError(f"threads must be at least 1, got {threads}")
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise RagindexError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RagindexError(f"device {device!r} asked for, but no CUDA GPU is available")


def load_document_encoder(spec: EncoderSpec, device: str = "cpu", precision: str = "auto",
                          threads: int | None = None, timer: Timer | None = None,
                          compile: bool = False) -> DocumentEncoder:
    """Load (once per process and weights on disk) the frozen document encoder for `spec`.

    `timer` replaces the wall clock that times the precision candidates; an encoder loaded with
    one is not cached (it is for tests of the choice). `compile` runs the chosen variant through
    torch.compile (`DocumentEncoder.compile`): a one-time cost that big jobs earn back.
    """
    _set_threads(threads)
    _check_device(device)
    if precision not in PRECISIONS:
        raise RagindexError(f"unsupported precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    fingerprint = fingerprint_of(spec)  # validates the model first; cheap after the first call
    if timer is not None:
        return _build_document_encoder(spec, device, precision, fingerprint, timer, compile)
    return _cached_document_encoder(spec, device, precision, fingerprint, compile)


@lru_cache(maxsize=4)
def _cached_document_encoder(spec: EncoderSpec, device: str, precision: str,
                             fingerprint: EncoderFingerprint, compile: bool) -> DocumentEncoder:
    return _build_document_encoder(spec, device, precision, fingerprint, None, compile)


def _build_document_encoder(spec: EncoderSpec, device: str, precision: str, fingerprint: EncoderFingerprint,
                            timer: Timer | None, compile: bool) -> DocumentEncoder:
    directory, _ = resolve_model_dir(spec.model, spec.revision)
    tokenizer = _load_tokenizer(directory, spec.model)
    if spec.kind == "dpr":
        from transformers import DPRContextEncoder as cls
    else:
        from transformers import AutoModel as cls
    net = _load_weights(cls, directory, spec.model).to(device)
    encoder = DocumentEncoder(spec, fingerprint, net, tokenizer, device)
    encoder.choose_precision(precision, timer, compiling=compile)
    if compile:
        encoder.compile()
    log.info("document encoder %s: dim %d, %s on %s", fingerprint.model_id, encoder.dim, encoder.precision,
             device)
    return encoder


def load_question_encoder(model: str, kind: str = "dpr", normalize: bool | None = None, max_length: int | None = None,
                          device: str = "cpu") -> QuestionEncoder:
    """Load (once per process and weights on disk) the question encoder; fp32, questions are few.

    Callers pass the document side's fingerprint values; None means the model's own
    sentence-transformers config (mean kind), else no normalisation and 256 tokens.
    """
    _check_device(device)
    directory, _ = resolve_model_dir(model, None)
    return _cached_question_encoder(model, kind, normalize, max_length, device, weights_signature(directory))


def question_encoder_for(fingerprint: EncoderFingerprint, model: str | None = None,
                         kind: str | None = None) -> QuestionEncoder:
    """The question encoder that asks a version's vectors: `model` if named, else the one trained with its
    document encoder (a symmetric `mean` encoder is its own pair), normalised and cut as the document side."""
    fp = fingerprint
    chosen = model or paired_question_encoder(fp.model_id, fp.kind)
    return load_question_encoder(chosen, kind or fp.kind, normalize=fp.normalize, max_length=fp.max_length)


@lru_cache(maxsize=4)
def _cached_question_encoder(model: str, kind: str, normalize: bool | None, max_length: int | None, device: str,
                             signature: tuple) -> QuestionEncoder:
    directory, _ = resolve_model_dir(model, None)
    config = load_model_config(directory, model)
    check_model_config(config, kind, model, "question")
    tokenizer = _load_tokenizer(directory, model)
    if kind == "dpr":
        from transformers import DPRQuestionEncoder as cls
    else:
        from transformers import AutoModel as cls
    net = _load_weights(cls, directory, model).to(device)
    model_id = str(directory) if Path(model).expanduser().is_dir() else model
    # The question side of a symmetric encoder pools as the model declares, and defaults to its
    # declared normalisation and length; no warning here, the document side warned already.
    declared = read_st_config(directory) if kind == "mean" else SentenceTransformerConfig()
    pooling = declared.pooling
    normalize = bool(declared.normalize) if normalize is None else normalize
    max_length = max_length or declared.max_length or 256
    return QuestionEncoder(model_id, kind, net, tokenizer, output_dim(config, kind), normalize, max_length, device,
                           pooling=pooling)
