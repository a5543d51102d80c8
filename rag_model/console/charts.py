"""The console's charts: SVG drawn by matplotlib from the catalogue (no chart code of our own).

`matplotlib.figure.Figure` with the Agg canvas, never pyplot: no global figure state, so request threads
can draw at once. Text stays text in the SVG (`svg.fonttype` none): smaller, and readable by a test."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib
from matplotlib.figure import Figure

from storage.catalog import Catalog, VersionEntry

matplotlib.use("Agg")

CHART_VERSIONS = 60  # the newest versions a chart shows: more bars stop being readable


def chart_versions(catalog: Catalog) -> list[VersionEntry]:
    """The newest readable versions, oldest first (the catalogue lists them newest first)."""
    readable = [v for v in catalog.versions if v.lineage is not None]
    return list(reversed(readable[:CHART_VERSIONS]))


def chart_key(versions: Sequence[VersionEntry]) -> str:
    """Changes whenever what a chart draws changes: the image's cache key."""
    return format(hash(tuple((v.version, v.own_bytes, v.shared_bytes, v.recall, v.canary_hit_rate)
                             for v in versions)) & 0xFFFFFFFF, "08x")


def _svg(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "ragindex"}):
        figure.savefig(buffer, format="svg", bbox_inches="tight")
    return buffer.getvalue()


def _labels(versions: Sequence[VersionEntry]) -> list[str]:
    return [f"{v.version[-16:]}{' ★' if v.current else ''}" for v in versions]


def bytes_chart(versions: Sequence[VersionEntry]) -> bytes:
    """Own vs shared bytes per version, stacked: what each stores and what it serves from its ancestors."""
    figure = Figure(figsize=(9, 3.2))
    axes = figure.subplots()
    x = range(len(versions))
    own = [v.own_bytes / 2**20 for v in versions]
    shared = [(v.shared_bytes or 0) / 2**20 for v in versions]
    axes.bar(x, own, label="own (stored by the version)", color="#3b6ea5")
    axes.bar(x, shared, bottom=own, label="shared (ancestors' segments)", color="#a8c4e0")
    axes.set_ylabel("MiB")
    axes.set_title("Bytes per version: own vs shared")
    _version_axis(axes, versions)
    axes.legend(loc="upper left", fontsize=8)
    return _svg(figure)


def quality_chart(versions: Sequence[VersionEntry]) -> bytes:
    """Validation recall@10 and the canary hit rate per version: is quality drifting?"""
    figure = Figure(figsize=(9, 3.2))
    axes = figure.subplots()
    x = list(range(len(versions)))
    for values, label, marker in (([v.recall for v in versions], "recall@10", "o"),
                                  ([v.canary_hit_rate for v in versions], "canary hit rate", "s")):
        points = [(i, value) for i, value in zip(x, values, strict=True) if value is not None]
        if points:
            axes.plot([i for i, _ in points], [value for _, value in points], marker=marker, label=label)
    axes.set_ylim(0, 1.05)
    axes.set_title("Validation over time")
    _version_axis(axes, versions)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower left", fontsize=8)
    else:
        axes.text(0.5, 0.5, "no validation numbers recorded", ha="center", transform=axes.transAxes)
    return _svg(figure)


def _version_axis(axes, versions: Sequence[VersionEntry]) -> None:
    axes.set_xticks(range(len(versions)), _labels(versions), rotation=60, ha="right", fontsize=7)
    axes.set_xlim(-0.6, max(len(versions), 1) - 0.4)


CHARTS = {"bytes": bytes_chart, "quality": quality_chart}
