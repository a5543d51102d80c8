"""Choosing the precision the document encoder runs in: the fastest variant whose vectors stay close to fp32.

Whether a CPU "supports" bf16 says nothing about speed: a CPU without native bf16 instructions runs
it emulated, several times slower than fp32. So `auto` measures every candidate on a probe batch
(after a warm-up pass) and keeps the fastest one within the cosine tolerance; fp32 always qualifies.
On CPU the candidates include int8 (dynamically quantized Linear layers): on a CPU with VNNI it can
run several times faster than fp32, and the same tolerance decides whether its vectors are kept. And
fp32 with its Linear weights pre-packed (fp32-packed): exact, and often the fastest where neither bf16
nor int8 is kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from storage.errors import RagindexError
from storage.manifest import PrecisionChoice

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
# A reduced precision is used only if its vectors stay this close to fp32 (mean cosine on a probe).
MIN_PRECISION_COSINE = 0.999
# ... and only if it is measurably faster: a gain within timing noise is not worth inexact vectors
# (nor a choice that flips from one process to the next).
MIN_SPEEDUP = 1.05

# Runs one variant on the probe batch and returns its vectors; a timer returns (vectors, seconds).
ProbeRun = Callable[[], np.ndarray]
Timer = Callable[[str, ProbeRun], tuple[np.ndarray, float]]


def wall_clock(name: str, run: ProbeRun, min_seconds: float = 0.2, max_runs: int = 5) -> tuple[np.ndarray, float]:
    """The fastest of a few probe passes (one for a big model, up to `max_runs` for a tiny one)."""
    best, spent, runs = float("inf"), 0.0, 0
    while runs < max_runs and (runs == 0 or spent < min_seconds):
        started = time.perf_counter()
        vectors = run()
        seconds = time.perf_counter() - started
        best, spent, runs = min(best, seconds), spent + seconds, runs + 1
    return vectors, best


def int8_available() -> bool:
    """Whether this torch has a quantized engine for dynamic int8 Linear layers on this CPU."""
    import torch

    try:
        from torch.ao.quantization import quantize_dynamic  # noqa: F401
    except ImportError:  # removed from torch in favour of torchao: no int8 candidate then
        return False
    return bool({"x86", "fbgemm", "qnnpack"} & set(torch.backends.quantized.supported_engines))


def candidates(requested: str, device_type: str, cuda_bf16: bool = False, compiling: bool = False) -> list[str]:
    """Variants worth measuring, fp32 (the reference) first. Only fp32: fp32 without a probe.

    `fp32` asked for by name is the reference itself, the model's own kernels. `auto` also measures
    fp32-packed on CPU (the same arithmetic with pre-packed weights, rag_model.packed_linear), except
    for a network about to be compiled: the compiler packs the weights itself.
    """
    if requested not in PRECISIONS:
        raise RagindexError(f"unsupported precision {requested!r}: use one of {', '.join(PRECISIONS)}")
    if requested == "fp32":
        return ["fp32"]
    if device_type == "cuda":
        reduced = ["fp16", "fp16-autocast", *(["bf16-autocast"] if cuda_bf16 else [])]
    else:
        from rag_model.packed_linear import packed_linear_available

        # fp16 on CPU has no fast kernels at all; bf16 may (AMX, AVX512-BF16) or may not, int8 may
        # (VNNI) or may not, packed weights gain more or less by BLAS: measure.
        packed = requested == "auto" and not compiling and packed_linear_available()
        reduced = [*(["fp32-packed"] if packed else []), "bf16", "bf16-autocast",
                   *(["int8"] if int8_available() else [])]
    if requested != "auto":
        reduced = [r for r in reduced if r.startswith(requested)]
        if not reduced:
            log.warning("precision %s not supported on %s; using fp32", requested, device_type)
    return ["fp32", *reduced]


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))


def pick(requested: str, names: Sequence[str], speed: dict[str, float], cosines: dict[str, float],
         tolerance: float = MIN_PRECISION_COSINE) -> str:
    """The rule `choose` applies to its measurements (see there); `names` must include fp32."""
    within = [n for n in names if cosines[n] >= tolerance and (requested == "auto" or n != "fp32")]
    if not within:
        log.warning("no %s variant within tolerance of fp32; using fp32", requested)
        within = ["fp32"]
    chosen = max(within, key=lambda n: speed[n])
    if requested == "auto" and speed[chosen] < MIN_SPEEDUP * speed["fp32"]:
        chosen = "fp32"
    return chosen


def choose(requested: str, names: Sequence[str], probe: Callable[[str], np.ndarray], n_probe: int,
           timer: Timer = wall_clock, tolerance: float = MIN_PRECISION_COSINE,
           warm_up: Callable[[str], object] | None = None) -> PrecisionChoice:
    """Measure every variant in `names` (fp32 first) on the probe and pick one.

    `warm_up(name)` runs first, untimed: a pass over the probe that pays a variant's one-time costs (oneDNN
    primitive creation, weight packing, allocator growth), which would otherwise favour whichever
    variant runs later.

    `auto` keeps the fastest variant within `tolerance`; fp32 unless one is `MIN_SPEEDUP` faster. An explicit reduced
    precision keeps its fastest variant within tolerance, however it compares with fp32; none
    within tolerance means fp32, with a warning.
    """
    if not names or names[0] != "fp32":
        raise ValueError("fp32 must be measured first: it is the reference")
    if warm_up is not None:
        warm_up("fp32")
    reference, seconds = timer("fp32", lambda: probe("fp32"))
    speed = {"fp32": n_probe / max(seconds, 1e-9)}
    cosines = {"fp32": 1.0}
    for name in names[1:]:
        if warm_up is not None:
            warm_up(name)
        vectors, seconds = timer(name, lambda name=name: probe(name))
        speed[name] = n_probe / max(seconds, 1e-9)
        cosines[name] = _mean_cosine(reference, vectors)
        if cosines[name] < tolerance:
            # Refusing a candidate is auto's normal work (the choice is in the manifest); a precision the
            # user asked for by name is worth a warning.
            level = logging.INFO if requested == "auto" else logging.WARNING
            log.log(level, "%s vectors too far from fp32 (mean cosine %.5f < %s)", name, cosines[name], tolerance)
    chosen = pick(requested, names, speed, cosines, tolerance)
    log.info("precision %s -> %s (%s)", requested, chosen,
             ", ".join(f"{n} {speed[n]:.1f}/s cos {cosines[n]:.5f}" for n in names))
    return PrecisionChoice(requested=requested, chosen=chosen, cosine=round(cosines[chosen], 6),
                           passages_per_s={n: round(v, 3) for n, v in speed.items()},
                           cosines={n: round(c, 6) for n, c in cosines.items()})
