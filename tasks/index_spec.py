"""The index-spec grammar, in one parser that `ragindex build` and the refresh flow's parameters share.

    auto | flat | hnsw[:M=32,efConstruction=100] | ivfpq[:nlist=..,m=..,nbits=8,opq=0]
         | ivfsq[:nlist=..,bits=8] | any faiss factory string (inner-product metric)

`plan_index` turns a spec into a concrete `Plan` for n vectors of a dimension; `check_index_spec`
refuses what no build could accept, before any work starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import faiss

from storage.errors import Rejected
from storage.sizes import format_size

# What an index may take in memory when nobody says (settings: RAGINDEX_MEMORY_BUDGET).
DEFAULT_MEMORY_BUDGET = 16 * 2**30

NAMED_SPECS = ("auto", "flat", "hnsw", "ivfpq", "ivfsq")
CHECK_DIM = 768  # DPR's dimension: every common factory component divides it
CHECK_ROWS = 1_000_000


@dataclass
class Plan:
    spec: str
    factory: str
    metric: str  # "ip" | "l2" (hnsw trick)
    dim: int  # stored dimension
    params: dict[str, Any]
    in_memory_bytes: int | None = None  # known up front for flat / hnsw


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """`name:key=value,...` -> (lower-case name, options)."""
    name, _, rest = spec.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise Rejected(f"index spec {spec!r}: expected key=value after ':', got {item!r}")
        opts[key.strip()] = value.strip()
    return name.strip().lower(), opts


def check_index_spec(spec: str) -> str:
    """`spec` if a build could accept it (planned for DPR-sized data), else `Rejected` with one line."""
    plan_index(spec, CHECK_ROWS, CHECK_DIM)
    return spec


def _int_opt(opts: dict[str, str], key: str, default: int, spec: str) -> int:
    try:
        return int(opts.pop(key, default))
    except ValueError:
        raise Rejected(f"index spec {spec!r}: {key} must be an integer") from None


def _no_more(opts: dict[str, str], spec: str) -> None:
    if opts:
        raise Rejected(f"index spec {spec!r}: unknown option(s) {', '.join(sorted(opts))}")


def default_nlist(n: int) -> int:
    """About 4*sqrt(n) lists, a power of two, with at least ~39 training points per list."""
    target = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    cap = max(1, n // 39)
    return int(max(1, min(target, 2 ** int(math.log2(cap)))))


# From this many lists on, the coarse quantizer is an HNSW graph over the centroids instead of a flat scan:
# assigning a vector costs ~log(nlist) distances instead of nlist, which keeps the add step linear in n
# while nlist grows with sqrt(n) (the faiss guideline for 1M+ vectors). Below it a flat scan is as fast.
HNSW_COARSE_MIN_NLIST = 8192


def ivf_prefix(nlist: int) -> str:
    """The factory prefix of an inverted file of nlist lists: `IVF<nlist>`, or `IVF<nlist>_HNSW32` when large."""
    return f"IVF{nlist}_HNSW32" if nlist >= HNSW_COARSE_MIN_NLIST else f"IVF{nlist}"


def _pq_m(dim: int, target: int) -> int:
    divisors = [m for m in range(1, dim + 1) if dim % m == 0]
    return min(divisors, key=lambda m: (abs(m - target), -m))


def hnsw_bytes(n: int, dim: int, m: int) -> int:
    # vectors + level-0 links (2M) + upper levels (~M/ (M-1) share) + per-node bookkeeping
    return int(n * ((dim + 1) * 4 + 2 * m * 4 * 1.1 + 16))


def plan_index(spec: str, n: int, dim: int) -> Plan | None:
    """Turn a spec into a concrete factory string and parameters for n vectors of dimension dim.

    None for `auto`, which tasks.build_index plans while building (it measures candidates).
    """
    name, opts = parse_spec(spec)
    if name == "auto":
        _no_more(opts, spec)
        return None
    if name == "flat" and not opts:
        return Plan(spec, "Flat", "ip", dim, {}, in_memory_bytes=n * dim * 4)
    if name == "hnsw":
        m = _int_opt(opts, "M", 32, spec)
        efc = _int_opt(opts, "efConstruction", 100, spec)
        _no_more(opts, spec)
        return Plan(spec, f"HNSW{m},Flat", "l2", dim + 1, {"M": m, "efConstruction": efc},
                    in_memory_bytes=hnsw_bytes(n, dim, m))
    if name in ("ivfpq", "ivfsq"):
        nlist = _int_opt(opts, "nlist", default_nlist(n), spec)
        if name == "ivfpq":
            m = _int_opt(opts, "m", _pq_m(dim, max(1, dim // 8)), spec)
            nbits = _int_opt(opts, "nbits", 8, spec)
            opq = _int_opt(opts, "opq", 0, spec)
            _no_more(opts, spec)
            if dim % m:
                raise Rejected(f"index spec {spec!r}: m={m} must divide the dimension {dim}")
            # Fewer training points than 2^nbits centroids per sub-quantizer cannot train PQ.
            nbits = max(1, min(nbits, int(math.log2(max(2, n // 39)))))
            factory = f"{ivf_prefix(nlist)},PQ{m}x{nbits}"
            if opq:
                factory = f"OPQ{m}_{dim},{factory}"
            return Plan(spec, factory, "ip", dim, {"nlist": nlist, "m": m, "nbits": nbits, "opq": bool(opq)})
        bits = _int_opt(opts, "bits", 8, spec)
        _no_more(opts, spec)
        if bits not in (4, 6, 8, 16):
            raise Rejected(f"index spec {spec!r}: bits must be 4, 6, 8 or 16")
        code = "SQfp16" if bits == 16 else f"SQ{bits}"
        return Plan(spec, f"{ivf_prefix(nlist)},{code}", "ip", dim, {"nlist": nlist, "code": code})
    try:
        probe = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown"
        raise Rejected(
            f"unknown index spec {spec!r}: neither {'/'.join(NAMED_SPECS)} nor a faiss factory string ({first})"
        ) from None
    in_memory = n * dim * 4 if isinstance(probe, faiss.IndexFlat) else None
    return Plan(spec, spec, "ip", dim, {}, in_memory_bytes=in_memory)


def refuse_if_over(what: str, need: int, budget: int, n: int, dim: int) -> None:
    if need > budget:
        raise Rejected(
            f"index {what} needs about {format_size(need)} for {n:,} x {dim} vectors but the memory budget is "
            f"{format_size(budget)}: use --index-spec auto (compressed) or raise --memory-budget"
        )
