"""One question answered by two versions side by side: which passages entered the top k and which left.

A passage is the same on both sides when its page, revision and passage id are: an edited page's
passage is a new one (it entered) and the old revision's left."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rag_model.index import Hit


def _identity(hit: Hit) -> tuple[int, int, str]:
    return hit.page_id, hit.rev_id, hit.passage_id


@dataclass(frozen=True)
class Comparison:
    query: str
    a: str
    b: str
    hits_a: list[Hit]
    hits_b: list[Hit]

    @property
    def left(self) -> set[tuple[int, int, str]]:
        """Passages in a's top k that b's lacks."""
        return {_identity(h) for h in self.hits_a} - {_identity(h) for h in self.hits_b}

    @property
    def entered(self) -> set[tuple[int, int, str]]:
        """Passages in b's top k that a's lacks."""
        return {_identity(h) for h in self.hits_b} - {_identity(h) for h in self.hits_a}

    def rows(self) -> list[tuple[dict[str, Any] | None, dict[str, Any] | None]]:
        """Rank by rank, each side's hit as JSON with its mark ("left" / "entered" / None)."""
        left, entered = self.left, self.entered

        def marked(hits: list[Hit], i: int, moved: set, label: str) -> dict[str, Any] | None:
            if i >= len(hits):
                return None
            return hits[i].to_dict() | {"mark": label if _identity(hits[i]) in moved else None}

        n = max(len(self.hits_a), len(self.hits_b))
        return [(marked(self.hits_a, i, left, "left"), marked(self.hits_b, i, entered, "entered")) for i in range(n)]

    def to_json(self) -> dict[str, Any]:
        return {"query": self.query, "a": self.a, "b": self.b,
                "rows": [{"rank": i, "a": ra, "b": rb} for i, (ra, rb) in enumerate(self.rows(), 1)],
                "entered": len(self.entered), "left": len(self.left)}

