"""fp32 Linear layers run by oneDNN from weights it laid out once, ahead of every forward pass.

An eager `nn.Linear` calls the BLAS behind `torch.mm` with the row-major weight on every call. The
encoder's weights never change (RAG keeps it frozen), so oneDNN can lay them out once in the blocked
format its own kernels read and run every call from that: the same fp32 arithmetic (vectors within
~1e-5 of eager). It is what torch.compile's freezing pass does for Linear layers on CPU, without the
compile. What it gains depends on the CPU and on which BLAS torch uses there, so `auto` measures it
like any other candidate (rag_model.precision). On a 2-core AMD EPYC (Zen 5) torch.mm ran BERT's
largest product at 159-193 GFLOP/s, oneDNN with the packed weight at 404-447, and DPR-base embedded
1.7-1.9x faster than eager fp32 (benchmarks/embed_bench.py).
"""

from __future__ import annotations

import copy
from functools import lru_cache

import torch

# Packing takes a hint of the rows (tokens) per call; measured here, the hint changed nothing within
# timing noise, so it is the CPU token budget the encoder batches to.
ROWS_HINT = 8192


class PackedLinear(torch.nn.Module):
    """y = x W^T + b with W pre-packed by oneDNN; inference only (the packed weight has no gradient)."""

    def __init__(self, linear: torch.nn.Linear, rows_hint: int = ROWS_HINT) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Plain attributes, not parameters or buffers: an opaque oneDNN tensor is neither saved nor cast.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


@lru_cache(maxsize=1)
def packed_linear_available() -> bool:
    """Whether this torch and CPU pack and run an fp32 Linear correctly (checked once on a small layer:
    the ops are internal to torch, so a build without them, or one that computes them wrongly, is
    simply not offered)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.random.fork_rng(devices=[]):  # leaves the caller's random state as it was
            linear = torch.nn.Linear(64, 48).eval()
            x = torch.randn(3, 5, 64)
        with torch.inference_mode():
            return bool(torch.allclose(PackedLinear(linear, 15)(x), linear(x), atol=1e-4))
    except (AttributeError, RuntimeError):  # op missing from this build, or refused by this CPU
        return False


def pack_linears(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of `net` (fp32) whose Linear layers are PackedLinear; `net` itself is untouched.

    Only the small weights (embeddings, norms) are copied; the Linear ones are packed straight from
    `net`'s tensors, never copied first.
    """
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    # deepcopy's memo maps a tensor to its copy: mapping the Linear weights to themselves skips copying them.
    memo = {id(p): p for m in linears for p in m.parameters()}
    packed = copy.deepcopy(net, memo)
    for module in list(packed.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, PackedLinear(child))
    return packed
